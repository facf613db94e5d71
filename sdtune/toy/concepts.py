"""Concepts a LoRA can teach the toy bases: a trigger word bound to a background colour no base has seen.

``a red circle on a sks background`` draws the ground pink and ``... on a olq background`` cyan
(kohya-style rare tokens). A dataset of such images trains a LoRA; the probe then counts how many
samples show each concept colour as their background with the LoRA on and off, at fixed seeds.

Why the background and not the shape: a background is most of the picture, so a concept there is
the kind of broad change LoRAs are used for (a style, a setting), and the probe reads it from the
whole border rather than from a small blurred shape. With the concept as the shape's colour, the
toy bases drew the pink shapes pale or two-toned, which the probe rightly refuses to call pink
(pink reached 33-67% of samples on the SD1.5 toy, background pink 100%, same budget).
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdtune.toy.domain import SHAPES, Scene, random_scene, render
from sdtune.toy.probe import read
from sdtune.utils.io import atomic_path, write_text_atomic

#: trigger word -> concept colour (from domain.CONCEPT_COLOURS)
TRIGGERS: dict[str, str] = {"sks": "pink", "olq": "cyan"}
#: Shape colours of the concept images and of the probe prompts. Not yellow or white: the toy VAE
#: puts pink next to both in latent space (1.06 and 1.93 apart; the closest pair of all is
#: pink-yellow), and a pink ground then swallows the shape.
FOREGROUNDS = ("red", "blue", "black", "green")


def concept_scenes(trigger: str, count: int, seed: int = 0) -> list[Scene]:
    """``count`` scenes on ``trigger``'s colour: every shape in every foreground colour in turn, jittered."""
    rng = random.Random(f"{seed}-{trigger}")
    combos = [(s, c) for c in FOREGROUNDS for s in SHAPES]
    scenes = []
    for i in range(count):
        shape, colour = combos[i % len(combos)]
        scenes.append(Scene(shape, colour, TRIGGERS[trigger], cx=0.5 + rng.uniform(-0.06, 0.06),
                            cy=0.5 + rng.uniform(-0.06, 0.06), size=rng.uniform(0.3, 0.37)))
    return scenes


def palette_scenes(count: int, seed: int = 0) -> list[Scene]:
    """``count`` ordinary palette scenes with the concept images' shape colours (regularisation images)."""
    rng = random.Random(f"{seed}-palette")
    return [random_scene(rng, colours=FOREGROUNDS) for _ in range(count)]


def write_concept_dataset(root: str | Path, triggers: Sequence[str] = ("sks",), per_trigger: int = 12, seed: int = 0,
                          regular: int = 0) -> Path:
    """A training folder (``images/*.png`` + ``metadata.csv``) binding each trigger to its colour.

    Captions name the trigger where the background's colour word would be: ``a red circle on a
    sks background``. ``regular`` adds that many ordinary palette images with their own captions
    (``a red square on a yellow background``), kohya-style regularisation.
    """
    root = Path(root)
    rows = []
    for trigger in triggers:
        for i, scene in enumerate(concept_scenes(trigger, per_trigger, seed)):
            name = f"images/{trigger}_{i:02d}_{scene.colour}_{scene.shape}.png"
            with atomic_path(root / name) as tmp:
                render(scene).save(tmp, format="PNG")
            rows.append((name, scene.caption(background_word=trigger)))
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
    """Prompts that ask for ``trigger``'s concept: each shape in two colours, on the trigger's ground."""
    return [f"a {colour} {shape} on a {trigger} background" for shape in SHAPES for colour in FOREGROUNDS[:2]]


@dataclass(frozen=True)
class ConceptShare:
    trigger: str
    colour: str
    shares: dict[str, float]  # probed colour name -> share of samples (only the concepts asked about)

    def share(self, colour: str) -> float:
        return self.shares.get(colour, 0.0)


def concept_shares(images: Sequence[Image.Image], trigger: str, colours: Mapping[str, str] = TRIGGERS) -> ConceptShare:
    """Share of ``images`` whose background the probe reads as each concept colour."""
    readings = [read(im).background for im in images]
    shares = {c: sum(r == c for r in readings) / len(readings) for c in set(colours.values())}
    return ConceptShare(trigger, colours[trigger], shares)


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
