"""Read back what a toy-domain image shows: its shape, its colour and its background.

Pixel statistics, no network: the background is the median colour of the image's border, the
foreground is every pixel clearly unlike it, the colour is the palette entry nearest the
foreground's median, and the shape is the template (circle, square, triangle fitted to the
foreground's bounding box) that overlaps the foreground best. Exact on the generator's own
images; on generated ones it measures what a person would say the picture shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtune.toy.domain import ALL_COLOURS, SHAPES

#: A pixel belongs to the foreground when its colour is this far (L2, 0-255 RGB) from the background.
FOREGROUND_DISTANCE = 70.0
#: Below this share of the image the picture shows no shape at all.
MIN_FOREGROUND = 0.04
#: A shape is one colour: if the foreground's pixels are typically this far from their median, it is not.
MAX_SPREAD = 60.0


@dataclass(frozen=True)
class Reading:
    shape: str | None  # None: no clear foreground
    colour: str | None
    background: str
    foreground: float  # share of pixels in the foreground
    shape_score: float  # IoU of the best template, 0-1


def _nearest(rgb: np.ndarray) -> str:
    names = list(ALL_COLOURS)
    table = np.array([ALL_COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape filling an ``h`` x ``w`` box, as the generator draws it."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (x + 0.5) / w, (y + 0.5) / h  # 0-1 within the box
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    square = np.ones((h, w), dtype=bool)
    triangle = np.abs(u - 0.5) <= 0.5 * v  # apex at the top, base at the bottom
    return {"circle": circle, "square": square, "triangle": triangle}


def read(image: Image.Image | np.ndarray) -> Reading:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    # A decoder's outermost pixels are its least reliable (padding); read the ground just inside them.
    m = max(1, arr.shape[0] // 20)
    ring = np.zeros(arr.shape[:2], dtype=bool)
    ring[m : 3 * m] = ring[-3 * m : -m] = True
    ring[:, m : 3 * m] = ring[:, -3 * m : -m] = True
    ring[:m] = ring[-m:] = False
    ring[:, :m] = ring[:, -m:] = False
    bg = np.median(arr[ring], axis=0)
    mask = np.sqrt(((arr - bg) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE
    mask[:m] = mask[-m:] = False
    mask[:, :m] = mask[:, -m:] = False
    share = float(mask.mean())
    background = _nearest(bg)
    if share < MIN_FOREGROUND:
        return Reading(None, None, background, share, 0.0)
    fg = np.median(arr[mask], axis=0)
    if np.median(np.sqrt(((arr[mask] - fg) ** 2).sum(axis=1))) > MAX_SPREAD:
        return Reading(None, None, background, share, 0.0)  # no one colour: noise, not a shape
    colour = _nearest(fg)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = mask[top:bottom, left:right]
    scores = {}
    for name, template in _templates(bottom - top, right - left).items():
        inter = np.logical_and(box, template).sum()
        union = np.logical_or(box, template).sum() + (mask.sum() - box.sum())
        scores[name] = float(inter / union) if union else 0.0
    shape = max(SHAPES, key=lambda s: scores[s])
    return Reading(shape, colour, background, share, scores[shape])
