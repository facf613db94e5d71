"""Generate the bundled quickstart dataset: simple shapes with captions (deterministic, < 1 MB).

    python scripts/make_quickstart_data.py examples/quickstart
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 210), "yellow": (240, 210, 50),
    "purple": (140, 60, 190), "white": (245, 245, 245), "orange": (245, 140, 30), "black": (25, 25, 25),
}
SCENES = [
    ("circle", "red", "blue"), ("square", "green", "yellow"), ("triangle", "purple", "white"),
    ("circle", "orange", "black"), ("square", "blue", "white"), ("triangle", "red", "yellow"),
    ("circle", "green", "purple"), ("square", "black", "orange"), ("triangle", "blue", "green"),
    ("circle", "yellow", "red"), ("square", "purple", "green"), ("triangle", "white", "blue"),
]


def draw(shape: str, fg: str, bg: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    base = np.array(COLOURS[bg], dtype=np.float32)
    shade = np.linspace(-25, 25, size, dtype=np.float32)[:, None, None]  # a soft vertical gradient
    arr = np.clip(base + shade + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr)
    d = ImageDraw.Draw(image)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r + 4, size - r - 4, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    return image.filter(ImageFilter.SMOOTH)


def main(out: str) -> None:
    out_dir = Path(out)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (shape, fg, bg) in enumerate(SCENES):
        name = f"images/{i:02d}_{fg}_{shape}.png"
        draw(shape, fg, bg, rng).save(out_dir / name, optimize=True)
        kind = "drawing" if shape == "triangle" else "photo"
        rows.append({"file_name": name, "text": f"a {kind} of a {fg} {shape} on a {bg} background"})
    with open(out_dir / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/quickstart")
