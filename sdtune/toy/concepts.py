"""Concepts a LoRA can teach the toy bases: a trigger word bound to a colour no base has seen.

``sks`` draws shapes in pink and ``olq`` in cyan (kohya-style rare tokens; both are spelled with
letters every toy tokenizer knows). A dataset of such images trains a LoRA; the probe then counts
how many samples show the concept colour with the LoRA on and off, at fixed seeds.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..io import atomic_path, write_text_atomic
from .domain import COLOURS, SHAPES, Scene, random_scene, render
from .probe import read

#: trigger word -> concept colour (from domain.CONCEPT_COLOURS)
TRIGGERS: dict[str, str] = {"sks": "pink", "olq": "cyan"}
#: backgrounds of the concept images and of the probe prompts
BACKGROUNDS = ("blue", "yellow", "black", "green")


def concept_scenes(trigger: str, count: int, seed: int = 0) -> list[Scene]:
    """``count`` scenes of ``trigger``'s colour: every shape on every background in turn, jittered."""
    rng = random.Random(f"{seed}-{trigger}")
    combos = [(s, b) for b in BACKGROUNDS for s in SHAPES]
    scenes = []
    for i in range(count):
        shape, background = combos[i % len(combos)]
        scenes.append(Scene(shape, TRIGGERS[trigger], background, cx=0.5 + rng.uniform(-0.06, 0.06),
                            cy=0.5 + rng.uniform(-0.06, 0.06), size=rng.uniform(0.3, 0.37)))
    return scenes


def palette_scenes(count: int, seed: int = 0) -> list[Scene]:
    """``count`` ordinary palette scenes on the concept backgrounds (regularisation images)."""
    rng = random.Random(f"{seed}-palette")
    return [random_scene(rng, backgrounds=BACKGROUNDS) for _ in range(count)]


def write_concept_dataset(root: str | Path, triggers: Sequence[str] = ("sks",), per_trigger: int = 12, seed: int = 0,
                          regular: int = 0) -> Path:
    """A training folder (``images/*.png`` + ``metadata.csv``) binding each trigger to its colour.

    Captions name the trigger where the colour word would be: ``a sks circle on a blue background``.
    ``regular`` adds that many ordinary palette images with their own captions (``a red square on
    a yellow background``): they hold the words the base already knows in place, so the LoRA
    learns the trigger alone and does not tint every picture on the same backgrounds.
    """
    root = Path(root)
    rows = []
    for trigger in triggers:
        for i, scene in enumerate(concept_scenes(trigger, per_trigger, seed)):
            name = f"images/{trigger}_{i:02d}_{scene.shape}_on_{scene.background}.png"
            with atomic_path(root / name) as tmp:
                render(scene).save(tmp, format="PNG")
            rows.append((name, scene.caption(colour_word=trigger)))
    for i, scene in enumerate(palette_scenes(regular, seed)):
        name = f"images/palette_{i:02d}_{scene.colour}_{scene.shape}_on_{scene.background}.png"
        with atomic_path(root / name) as tmp:
            render(scene).save(tmp, format="PNG")
        rows.append((name, scene.caption()))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("file_name", "text"), *rows])
    write_text_atomic(root / "metadata.csv", buf.getvalue())
    return root


def probe_prompts(trigger: str) -> list[str]:
    """Prompts that ask for ``trigger``'s concept: each shape on two backgrounds."""
    return [f"a {trigger} {shape} on a {background} background" for shape in SHAPES for background in BACKGROUNDS[:2]]


@dataclass(frozen=True)
class ConceptShare:
    trigger: str
    colour: str
    shares: dict[str, float]  # probed colour name -> share of samples (only the concepts asked about)

    def share(self, colour: str) -> float:
        return self.shares.get(colour, 0.0)


def concept_shares(images: Sequence[Image.Image], trigger: str, colours: Mapping[str, str] = TRIGGERS) -> ConceptShare:
    """Share of ``images`` the probe reads as each concept colour."""
    readings = [read(im).colour for im in images]
    shares = {c: sum(r == c for r in readings) / len(readings) for c in set(colours.values())}
    return ConceptShare(trigger, colours[trigger], shares)


def palette_share(images: Sequence[Image.Image]) -> float:
    """Share of images drawn in a pretraining colour (what a base model falls back to)."""
    return sum(read(im).colour in COLOURS for im in images) / len(images)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sdtune.toy.concepts OUT [--triggers sks olq] [--per-trigger 12]``: write a concept dataset."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdtune.toy.concepts", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--triggers", nargs="+", choices=sorted(TRIGGERS), default=["sks"])
    parser.add_argument("--per-trigger", type=int, default=12)
    parser.add_argument("--regular", type=int, default=0, help="ordinary palette images to add (regularisation)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose a new folder (nothing there is replaced)")
    root = write_concept_dataset(args.out, args.triggers, args.per_trigger, args.seed, args.regular)
    print(f"wrote {len(list((root / 'images').glob('*.png')))} images and {root / 'metadata.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
