"""What ``python -m sdtune.morph`` is given, checked before any model loads: two images, their
prompts (one for both, or each image's own caption), two LoRA files or ``train=true``, frames.

Every mistake is a :class:`ConfigError` naming the key, the value and the fix. The user's images
are only read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from sdtune.config.values import integer
from sdtune.config.values import path as check_path
from sdtune.data.folders import read_caption
from sdtune.data.images import load_rgb, resize_and_crop
from sdtune.data.metadata import find_metadata, read_rows
from sdtune.utils.errors import ConfigError, DataError

USAGE = "python -m sdtune.morph 'images=[a.png,b.png]' 'loras=[a.safetensors,b.safetensors]' prompt=\"...\""


@dataclass(frozen=True)
class MorphInputs:
    images: list[Path]
    lora_paths: list[str]  # empty with train=true
    train: bool
    frames: int
    steps: int


def _pair(cfg: DictConfig, key: str) -> list[str]:
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key} is not set. Fix: {USAGE}")
    value = cfg.get(key)
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple, ListConfig)):
        raise ConfigError(f"{key} must be a list of two files, got {value!r}. Fix: {USAGE}")
    return [str(v) for v in value]


def _positive(cfg: DictConfig, key: str, example: str) -> int:
    return integer(key, cfg.get(key), ge=1, full=True, kind="a whole number", fix=f"e.g. {key}={example}.")


def check_inputs(cfg: DictConfig) -> MorphInputs:
    """The two images and LoRAs (or train=true), frames and steps, or the first problem with them."""
    images = _pair(cfg, "images")
    if len(images) != 2:
        raise ConfigError(f"images needs exactly two image files (the start and the end), got {len(images)}: "
                          f"{images}. Fix: {USAGE}")
    for i, image in enumerate(images):
        check_path(f"images[{i}]", image, must="file", fix="give the path of an existing image.")
    loras, train = _pair(cfg, "loras"), bool(cfg.get("train"))
    if train and loras:
        raise ConfigError(f"loras={loras} and train=true both given: morph either uses two LoRA files or trains "
                          "its own. Fix: drop loras=[...] or train=true.")
    if not train and len(loras) != 2:
        raise ConfigError(f"loras needs exactly two LoRA files, one per image (lora 0 for images[0]), got "
                          f"{len(loras)}: {loras}. Fix: 'loras=[a.safetensors,b.safetensors]', or train=true to "
                          "train one single-image LoRA per image first.")
    for i, lora in enumerate(loras):
        check_path(f"loras[{i}]", lora, must="file", fix="give the path of a .safetensors LoRA.")
    frames = _positive(cfg, "frames", "10")
    steps = _positive(cfg, "inversion_steps", "50")
    return MorphInputs(images=[Path(p) for p in images], lora_paths=loras, train=train, frames=frames, steps=steps)


def load_image(path: Path, size: int) -> Image.Image:
    """``path`` as RGB, scaled to cover ``size`` x ``size`` and centre-cropped (a copy: the file stays as it is)."""
    try:
        image = load_rgb(path)
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"cannot read the image {str(path)!r}: {err}. Fix: give a PNG/JPEG/WebP file.") from None
    return resize_and_crop(image, (size, size))[0]


def _caption_of(path: Path) -> str | None:
    """The caption beside ``path`` (``a.txt``), else its row in a metadata.csv/jsonl of its folder or the one above."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return read_caption(sidecar) or None  # the training data's own sidecar rules (UTF-8, BOM, errors)
    target = path.resolve()
    for folder in (path.parent, path.parent.parent):
        try:
            meta = find_metadata(folder)
            rows = read_rows(meta) if meta else []
        except DataError as err:
            raise ConfigError(f"prompt=null reads the caption of {path} from {folder}'s metadata, which is "
                              f"unusable: {err}") from None
        for _, row in rows:
            if (folder / str(row.get("file_name", ""))).resolve() == target:
                text = row.get("text")
                text = text[0] if isinstance(text, (list, tuple)) and text else text
                return (str(text).strip() or None) if text is not None else None
    return None


def resolve_prompts(prompt: Any, images: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(prompt of each image, where it came from). ``prompt``: one text for both, a list of two,
    or null for each image's own caption."""
    if isinstance(prompt, str):
        return [prompt, prompt], ["prompt", "prompt"]
    if isinstance(prompt, (list, tuple, ListConfig)):
        if len(prompt) != 2 or not all(isinstance(p, str) for p in prompt):
            raise ConfigError(f"prompt as a list needs two texts (one per image), got {list(prompt)!r}. "
                              "Fix: prompt=\"...\" for both, or 'prompt=[\"...\",\"...\"]'.")
        return [str(p) for p in prompt], ["prompt[0]", "prompt[1]"]
    if prompt is not None:
        raise ConfigError(f"prompt must be a text, a list of two texts or null, got {prompt!r}.")
    prompts, sources = [], []
    for path in images:
        caption = _caption_of(path)
        if caption is None:
            raise ConfigError(
                f"prompt=null but {path} has no caption: no {path.with_suffix('.txt').name} beside it and no "
                f"metadata.csv/metadata.jsonl row naming it in {path.parent}{os.sep} or the folder above. "
                f"Fix: pass prompt=\"...\" (used for both images), or write the caption into "
                f"{path.with_suffix('.txt')}.")
        prompts.append(caption)
        sources.append("caption")
    return prompts, sources
