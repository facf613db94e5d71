"""Image decoding and training transforms with PIL, numpy and torch (no torchvision).

``to_rgb`` normalises every mode users' datasets contain (RGBA, LA, P, CMYK, 16-bit, EXIF-rotated)
to 8-bit RGB. ``resize_and_crop`` follows diffusers' text-to-image recipe (shorter side to the
resolution, then a centre or random crop) and records the original size and crop offset that
SDXL-style micro-conditioning needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtune.utils.errors import DataError


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with EXIF orientation applied; transparency is composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I") and arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


@dataclass(frozen=True)
class CropInfo:
    """Where a training crop came from, in SDXL's ``(height, width)`` / ``(top, left)`` order."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def image_size(path) -> tuple[int, int]:
    """(height, width) as displayed, i.e. after EXIF rotation, read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def plan_crop(
    size: tuple[int, int],
    target: tuple[int, int],
    *,
    center_crop: bool = True,
    rng: random.Random | None = None,
) -> tuple[tuple[int, int], CropInfo]:
    """Where ``resize_and_crop`` will scale and cut an image of ``size`` (h, w); no pixels needed."""
    target_h, target_w = target
    h, w = size
    scale = max(target_h / h, target_w / w)
    new_h, new_w = max(target_h, round(h * scale)), max(target_w, round(w * scale))
    if center_crop:
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    else:
        rng = rng or random.Random()
        top, left = rng.randint(0, new_h - target_h), rng.randint(0, new_w - target_w)
    return (new_h, new_w), CropInfo(original_size=(h, w), crop_top_left=(top, left), target_size=(target_h, target_w))


def resize_and_crop(
    image: Image.Image,
    size: tuple[int, int],
    *,
    center_crop: bool = True,
    rng: random.Random | None = None,
) -> tuple[Image.Image, CropInfo]:
    """Scale so the image covers ``size`` (h, w), then crop to exactly ``size``."""
    (new_h, new_w), info = plan_crop((image.height, image.width), size, center_crop=center_crop, rng=rng)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = info.crop_top_left
    image = image.crop((left, top, left + size[1], top + size[0]))
    return image, info


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor` for a (3, H, W) tensor in [-1, 1]."""
    arr = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def record_size(record) -> tuple[int, int]:
    """``image_size`` of a record (anything with a ``path``); a file that cannot be read (unverified data) is a DataError."""
    try:
        return image_size(record.path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read training image {record.path}: {err}. Fix or remove it "
            "(data.verify_images=true finds every such image before training)."
        ) from err
