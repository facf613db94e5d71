"""How well a model draws the shape domain, measured with the probe at fixed prompts and seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from sdtune.families import ModelFamily, ModelParts
from sdtune.inference.sampling import make_grid, render
from sdtune.toy.domain import COLOURS, SHAPES
from sdtune.toy.probe import Reading, read


@dataclass
class Score:
    """Shares of images whose probed shape / colour match the prompt."""

    shape: float
    colour: float
    both: float
    readings: list[tuple[str, Reading]] = field(default_factory=list)


def palette_prompts() -> list[tuple[str, str, str]]:
    """(prompt, shape, colour): every shape in every colour, each on a fixed other background."""
    names = list(COLOURS)
    out = []
    for i, colour in enumerate(names):
        background = names[(i + 2) % len(names)]
        for shape in SHAPES:
            out.append((f"a {colour} {shape} on a {background} background", shape, colour))
    return out


def score(images: Sequence[Image.Image], expected: Sequence[tuple[str, str]]) -> Score:
    readings = [read(im) for im in images]
    n = len(readings)
    shape = sum(r.shape == s for r, (s, _) in zip(readings, expected)) / n
    colour = sum(r.colour == c for r, (_, c) in zip(readings, expected)) / n
    both = sum(r.shape == s and r.colour == c for r, (s, c) in zip(readings, expected)) / n
    return Score(shape, colour, both)


def evaluate_pipeline(pipe, family: ModelFamily, seeds: Sequence[int] = (0, 1), *, steps: int = 20,
                      guidance: float = 2.0, size: int = 64, parts: ModelParts | None = None) -> tuple[Score, Image.Image]:
    """Probe accuracy over every palette prompt at ``seeds`` drawn by ``family``'s ``pipe``, and the
    grid of what was drawn; ``parts`` (the pipe's) lets the family set its call as training encoded
    the prompts (e.g. the T5 length)."""
    cases = palette_prompts()
    prompts = [p for p, _, _ in cases for _ in seeds]
    all_seeds = [s for _ in cases for s in seeds]
    images = render(pipe, prompts, all_seeds, steps=steps, size=size, call_kwargs=family.pipeline_call_kwargs(guidance, None, parts))
    result = score(images, [(s, c) for _, s, c in cases for _ in seeds])
    per_row = len(SHAPES) * len(seeds)
    rows = [images[i : i + per_row] for i in range(0, len(images), per_row)]
    grid = make_grid(rows, list(COLOURS), [f"{s} seed {sd}" for s in SHAPES for sd in seeds], min_tile=64)
    return result, grid
