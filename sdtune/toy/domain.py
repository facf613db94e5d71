"""The procedural image domain the toy base models are pretrained on: plain shapes on plain grounds.

Every image is one filled circle, square or triangle of one colour on a background of another,
captioned like ``a red circle on a blue background``. The domain needs no download, can be drawn
in any amount, and is simple enough that pixel statistics (:mod:`sdtune.toy.probe`) tell which
shape and colour an image holds. Two extra colours, absent from pretraining, are the concepts a
LoRA can be taught (backgrounds bound to trigger words): what a base model cannot draw, a LoRA
visibly adds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
#: The pretraining palette: every foreground and background colour the base models know.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: Colours no pretraining image has; each LoRA concept draws shapes in one of them.
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (250, 120, 200),
    "cyan": (40, 220, 220),
}
ALL_COLOURS = {**COLOURS, **CONCEPT_COLOURS}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float = 0.5  # centre, as a fraction of the side
    cy: float = 0.5
    size: float = 0.34  # half the shape's extent, as a fraction of the side

    def caption(self, colour_word: str | None = None, background_word: str | None = None) -> str:
        """``a red circle on a blue background``; a ``*_word`` (a trigger word) replaces that colour's name."""
        return f"a {colour_word or self.colour} {self.shape} on a {background_word or self.background} background"


def random_scene(rng: random.Random, *, colours=tuple(COLOURS), shapes=SHAPES, backgrounds=tuple(COLOURS)) -> Scene:
    colour = rng.choice(colours)
    background = rng.choice([b for b in backgrounds if b != colour])
    return Scene(
        shape=rng.choice(shapes),
        colour=colour,
        background=background,
        cx=0.5 + rng.uniform(-0.08, 0.08),
        cy=0.5 + rng.uniform(-0.08, 0.08),
        size=rng.uniform(0.28, 0.38),
    )


def render(scene: Scene, side: int = 64, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` at ``side`` pixels (drawn larger and downsampled, for clean edges)."""
    return draw_shape(scene.shape, ALL_COLOURS[scene.colour], ALL_COLOURS[scene.background],
                      scene.cx, scene.cy, scene.size, side=side, supersample=supersample)


def draw_shape(shape: str, fill, background, cx: float, cy: float, size: float, *, side: int = 64,
               supersample: int = 4) -> Image.Image:
    """One ``shape`` in RGB ``fill`` on ``background``; centre and half-extent as fractions of the side."""
    big = side * supersample
    image = Image.new("RGB", (big, big), tuple(background))
    draw = ImageDraw.Draw(image)
    cx, cy, r = cx * big, cy * big, size * big
    fill = tuple(fill)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9  # about the circle's area
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        h = r * math.sqrt(3)
        draw.polygon([(cx, cy - r * 1.05), (cx - h * 0.6, cy + r * 0.75), (cx + h * 0.6, cy + r * 0.75)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image.resize((side, side), Image.Resampling.LANCZOS)


def random_colour_image(rng: random.Random, side: int = 64, named_share: float = 0.7) -> Image.Image:
    """A shape on a background, each a named colour (palette or concept) with ``named_share``
    probability and any RGB colour otherwise: what the toy VAE learns to encode, so it carries the
    colours the UNet never saw in pretraining (the LoRA concepts) as well as the palette."""
    def colour():
        if rng.random() < named_share:
            return ALL_COLOURS[rng.choice(list(ALL_COLOURS))]
        return tuple(rng.randrange(256) for _ in range(3))

    fill, background = colour(), colour()
    while sum((a - b) ** 2 for a, b in zip(fill, background)) < 60**2:
        background = colour()
    return draw_shape(rng.choice(SHAPES), fill, background, 0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12),
                      rng.uniform(0.2, 0.42), side=side)
