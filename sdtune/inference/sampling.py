"""Render fixed prompts and seeds with a pipeline, and lay results out as a labelled grid PNG."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from sdtune.data.latent_fill import encode_batch_size

log = logging.getLogger(__name__)
#: Noto Sans CJK SC (SIL Open Font License), installed with sdtune through the mplfonts package:
#: Pillow's built-in font has no CJK glyphs, so Chinese prompts would be drawn as empty boxes.
CJK_FONT = ("mplfonts", "fonts/NotoSansCJKsc-Regular.otf")
LABEL_SIZE = 12


def sample_batch_size(size: int) -> int:
    """Pictures per pipeline call when a training run draws its samples at ``size``²: at most 1 megapixel
    (8 at 256², 4 at 512², 1 from 725²), so the VAE's decode of the batch stays small beside the
    weights, LoRA and optimizer state still on the card (the memory planner counts the same call)."""
    return encode_batch_size(size, size)


@torch.no_grad()
def render(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    size: int,
    call_kwargs: Mapping[str, Any],
    negative_prompt: str | Sequence[str | None] | None = None,
    batch_size: int = 8,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair; the same seeds give the same starting noise on any device.

    Pairs are drawn ``batch_size`` at a time with one generator per image, so an image's starting
    noise depends on its seed alone, not on what else shares its batch. ``negative_prompt`` is
    one for all, or one per prompt. ``call_kwargs`` are the family's guidance and LoRA-scale
    arguments (:meth:`sdtune.families.base.ModelFamily.pipeline_call_kwargs`).
    """
    images: list[Image.Image] = []
    prompts, seeds = list(prompts), list(seeds)
    negatives = [negative_prompt] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
    if len(prompts) != len(seeds):
        raise ValueError(f"render: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    for i in range(0, len(prompts), max(1, batch_size)):
        chunk = prompts[i : i + max(1, batch_size)]
        out = pipe(
            prompt=chunk,
            negative_prompt=None if negative_prompt is None else [n or "" for n in negatives[i : i + len(chunk)]],
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + len(chunk)]],
            **call_kwargs,
        )
        images.extend(out.images)
    return images


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    min_tile: int = 160,
) -> Image.Image:
    """Images in a table with row and column captions; small tiles are enlarged to ``min_tile``."""
    tile_w = max(min_tile, max(im.width for row in rows for im in row))
    tile_h = max(min_tile, max(im.height for row in rows for im in row))
    label_w, label_h, pad = 120, 34, 4
    width = label_w + len(col_labels) * (tile_w + pad)
    height = label_h + len(rows) * (tile_h + pad)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = label_font()
    for c, text in enumerate(col_labels):
        draw.text((label_w + c * (tile_w + pad) + 2, 4), _clip(draw, text, tile_w - 4, font), fill="black", font=font)
    for r, row in enumerate(rows):
        y = label_h + r * (tile_h + pad)
        draw.text((4, y + tile_h // 2 - 6), _clip(draw, row_labels[r], label_w - 6, font), fill="black", font=font)
        for c, im in enumerate(row):
            if im.size != (tile_w, tile_h):
                im = im.resize((tile_w, tile_h), Image.Resampling.NEAREST)
            grid.paste(im, (label_w + c * (tile_w + pad), y))
    return grid


@functools.cache
def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The CJK-capable label font, or Pillow's default (with a warning, once) when it is missing."""
    import importlib.resources

    package, name = CJK_FONT
    try:
        return ImageFont.truetype(str(importlib.resources.files(package) / name), LABEL_SIZE)
    except (ImportError, OSError) as err:
        log.warning("no CJK font for sample labels (%s: %s); Chinese text in them shows as boxes. Fix: pip install "
                    "mplfonts (part of sdtune's install). The prompts are also written beside each grid.", package, err)
        return ImageFont.load_default()


def has_cjk_font() -> bool:
    return isinstance(label_font(), ImageFont.FreeTypeFont)


def _clip(draw: ImageDraw.ImageDraw, text: str, width_px: int, font) -> str:
    """``text`` cut (with an ellipsis) to fit ``width_px`` in ``font``."""
    if draw.textlength(text, font=font) <= width_px:
        return text
    while text and draw.textlength(text + "…", font=font) > width_px:
        text = text[:-1]
    return text + "…"
