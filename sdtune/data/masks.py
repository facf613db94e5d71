"""Per-image loss masks (``train.masked_loss``): where each training image's pixels count.

A mask is a greyscale image: white trains, black is ignored, a grey level weights the pixel in
between. It comes from ``<data.root>/<data.mask_folder>/`` holding a file with the image's
relative path (``images/a.png`` -> ``masks/images/a.png``; any image suffix, and ``masks/a.png``
also matches, the flat layout kohya's ``conditioning_data_dir`` uses), else from the image's own
alpha channel; an image with neither trains unmasked (a mask of ones).

The mask follows its image through the very same geometry (EXIF rotation, mirror, resize to cover
the target, crop at the same offset, :func:`transform_mask`), and is then averaged down to the
latent grid by area (:func:`to_latent_grid`) to weight the per-pixel MSE
(:func:`sdtune.training.diffusion.weighted_mse`, normalised by the mean over all pixels as kohya does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sdtune.data.images import CropInfo, image_size, plan_crop
from sdtune.data.records import CHECK_THREADS, _listing, dataset_root
from sdtune.utils.errors import DataError
from sdtune.utils.formats import IMAGE_SUFFIXES
from sdtune.utils.io import file_sha256

log = logging.getLogger(__name__)
#: A record's mask: ("file", mask path), ("alpha", image path) or None (trains unmasked).
MaskSource = tuple[str, Path] | None


def _with_any_suffix(base: Path) -> Path | None:
    for suffix in sorted(IMAGE_SUFFIXES):
        for candidate in (base.with_suffix(suffix), base.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def has_alpha(path: str | os.PathLike) -> bool:
    """Whether the image file carries transparency (RGBA, LA, PA or a palette with a transparent entry)."""
    with Image.open(path) as im:
        return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def find_mask(image: str | os.PathLike, root: str | os.PathLike, folder: str = "masks") -> MaskSource:
    """Where ``image``'s mask comes from: a file under ``root/folder``, its alpha channel, or None."""
    root, image = dataset_root(root), Path(image)
    masks = root / folder
    try:
        rel = Path(os.path.abspath(image)).relative_to(root)
    except ValueError:  # outside data.root: only its own alpha channel can say
        rel = None
    if rel is not None and masks.is_dir():
        for base in (masks / rel, masks / rel.name):
            found = _with_any_suffix(base)
            if found is not None:
                return ("file", found)
    return ("alpha", image) if has_alpha(image) else None


def find_masks(records: Sequence, root: str | os.PathLike, folder: str = "masks") -> list[MaskSource]:
    """Every record's :class:`MaskSource`, with one log line counting them; refuses a dataset with no
    mask, and checks every mask (:func:`check_masks`) before any model is loaded."""
    sources = [find_mask(r.path, root, folder) for r in records]
    files = sum(1 for s in sources if s and s[0] == "file")
    alpha = sum(1 for s in sources if s and s[0] == "alpha")
    if not files and not alpha:
        raise DataError(
            f"train.masked_loss=true, but none of the {len(records)} images has a mask: no file under "
            f"{dataset_root(root) / folder} has an image's relative path or name (e.g. {folder}/images/a.png "
            "for images/a.png), and no image has an alpha channel. Fix: add the masks (white = train, "
            "black = ignore), set data.mask_folder to their folder, or set train.masked_loss=false."
        )
    log.info("masked loss: %d image(s) masked by a file under %s/, %d by their alpha channel, %d unmasked",
             files, folder, alpha, len(records) - files - alpha)
    check_masks(records, sources)
    return sources


def _read_mask(source: tuple[str, Path]) -> Image.Image:
    """The mask of ``source`` as 8-bit greyscale, EXIF-rotated like its image (decoded in full)."""
    kind, path = source
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if kind == "alpha":
            return im.convert("RGBA").getchannel("A")
        if im.mode in ("RGBA", "LA", "PA"):  # a mask saved with transparency: its grey level counts
            return im.convert("LA").getchannel("L")
        return im.convert("L")


def _mask_state(record, source: MaskSource) -> tuple[str | None, bool]:
    """(why ``source`` cannot mask ``record``'s image, or None; whether the mask is all zero)."""
    if source is None:
        return None, False
    try:
        mask = _read_mask(source)
    except Exception as err:  # Pillow raises many types for files that are not images
        return f"{source[1]}: not a readable image ({type(err).__name__}: {err})", False
    if source[0] == "file":
        try:
            h, w = image_size(record.path)
        except Exception:  # an unreadable image is reported by the image check, or at its first use
            return None, False
        if (mask.height, mask.width) != (h, w):
            return f"{source[1]} is {mask.width}x{mask.height} but its image {record.path.name} is {w}x{h}", False
    return None, mask.getextrema()[1] == 0


def check_masks(records: Sequence, sources: Sequence[MaskSource]) -> None:
    """Decode every mask before training: a mask file that is not an image or not its image's size
    is an error naming it; masks that are all black (or a fully transparent alpha channel) make
    their images add nothing to the loss: an error if every image is so, else a warning naming them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="sdtune-masks") as pool:
        states = list(pool.map(_mask_state, records, sources))
    bad = [why for why, _ in states if why]
    if bad:
        raise DataError(
            f"train.masked_loss: {len(bad)} mask(s) cannot mask their image: {_listing(bad)}. Fix: save each "
            "mask as a greyscale image (PNG) at its image's size (white = train, black = ignore), or remove "
            "it (the image then uses its alpha channel, or trains unmasked)."
        )
    empty = [_describe(s) for s, (_, zero) in zip(sources, states) if zero]
    if not empty:
        return
    what = (f"masks are all black (or fully transparent): {_listing(empty)}. White trains, black is ignored, "
            "so an image with such a mask adds nothing to the loss")
    fix = ("Fix: invert the masks if white and black are swapped, give those images a mask with white where "
           "they should train, or set train.masked_loss=false")
    if len(empty) == len(records):
        raise DataError(f"train.masked_loss: every one of the {len(records)} images' {what}, and the run would "
                        f"train to a loss of 0 and learn nothing. {fix}.")
    log.warning("train.masked_loss: %d of %d images' %s. %s.", len(empty), len(records), what, fix)


def _describe(source: tuple[str, Path]) -> str:
    kind, path = source
    return f"{path} (its alpha channel)" if kind == "alpha" else str(path)


def load_mask(source: MaskSource, size: tuple[int, int]) -> Image.Image | None:
    """The mask as an 8-bit greyscale image of ``size`` (h, w), EXIF-rotated like its image; None if unmasked."""
    if source is None:
        return None
    path = source[1]
    try:
        mask = _read_mask(source)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read mask {path}: {err}. Fix or remove it.") from err
    if (mask.height, mask.width) != tuple(size):
        raise DataError(
            f"mask {path} is {mask.width}x{mask.height} but its image is {size[1]}x{size[0]}. "
            "Fix: save the mask at the image's size (white = train, black = ignore)."
        )
    return mask


def transform_mask(mask: Image.Image, flip: bool, info: CropInfo) -> torch.Tensor:
    """(1, H, W) weights in [0, 1]: ``mask`` mirrored, resized and cropped exactly as its image was
    (``info`` is the image's crop, from :func:`sdtune.data.images.resize_and_crop`)."""
    if flip:
        mask = ImageOps.mirror(mask)
    (new_h, new_w), _ = plan_crop((mask.height, mask.width), info.target_size, center_crop=True)
    if (new_w, new_h) != mask.size:
        mask = mask.resize((new_w, new_h), Image.Resampling.BICUBIC)  # the image's filter: the same pixels
    top, left = info.crop_top_left
    h, w = info.target_size
    mask = mask.crop((left, top, left + w, top + h))
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) averaged by area onto the latent grid ``size`` (h, w)."""
    return F.interpolate(mask.float(), size=tuple(size), mode="area")


def batch_mask(batch: dict, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """The batch's loss weights on the latent grid: cached ones as they are, pixel ones averaged down."""
    if "latent_mask" in batch:
        return batch["latent_mask"].float()
    if "mask" in batch:
        return to_latent_grid(batch["mask"], latent_size)
    return None


def mask_digest(source: MaskSource) -> str:
    """What a cached latent's mask depends on: the mask file's content (the alpha channel is part of
    the image, whose hash the cache key already holds)."""
    if source is None:
        return "unmasked"
    kind, path = source
    return "alpha" if kind == "alpha" else f"file:{file_sha256(path)}"


def mask_manifest(sources: Sequence[MaskSource] | None, root: str | os.PathLike) -> dict[str, str]:
    """Manifest entries (see :func:`sdtune.training.checkpointing.data_manifest`) for the mask files, under
    ``mask/``, so a resume notices masks added, removed or replaced (sizes and names only)."""
    base = dataset_root(root)
    return {f"mask/{os.path.relpath(os.path.abspath(path), base)}": f"{Path(path).stat().st_size}:mask"
            for kind, path in (s for s in sources or () if s) if kind == "file"}
