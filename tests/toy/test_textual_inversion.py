"""Learning: textual inversion alone teaches a new word a colour the toy SD1.5 base can draw.

Twelve images of shapes on a green ground are captioned ``a red circle on a olq background``;
``olq`` is a new word, initialised from ``blue``. Only its embedding trains (no LoRA). The run's
``olq.safetensors`` is then loaded into a fresh diffusers pipeline of the base, which draws the
probe prompts at fixed seeds: with ``olq`` >= 80% of the backgrounds must read green, and with the
init word in its place (what the token meant before training) <= 10%. An embedding that never
trains, trains the wrong rows, is exported from the wrong rows or in a layout diffusers reads
differently leaves the backgrounds blue or random, and fails.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import run_main

pytestmark = pytest.mark.slow

STEPS = 120
ARGS = ["experiment=quickstart", "model=toy", "embedding=ti", "embedding.tokens=[olq]", "embedding.init=blue",
        "embedding.lr=3e-2", f"trainer.max_steps={STEPS}", "callbacks.concept_probe=null", "callbacks.samples=null",
        "data.val_images=0"]
SEEDS = (0, 1)


def write_green_dataset(root: Path) -> Path:
    """12 toy scenes on a green ground (a colour the base knows), captioned with the new word ``olq``."""
    from sdtune.toy.domain import SHAPES, Scene, render

    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        scene = Scene(SHAPES[i % 3], ("red", "blue", "black", "yellow")[i // 3], "green", cx=0.5 + rng.uniform(-0.06, 0.06),
                      cy=0.5 + rng.uniform(-0.06, 0.06), size=rng.uniform(0.3, 0.37))
        name = f"images/olq_{i:02d}.png"
        render(scene).save(root / name)
        rows.append((name, scene.caption(background_word="olq")))
    with open(root / "metadata.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file_name", "text"), *rows])
    return root


def green_share(pipe, word: str) -> float:
    """Share of the probe prompts (``a <red|black> <shape> on a <word> background``) drawn on green.

    Red and black shapes: neither is the init word's colour (a blue shape on a blue ground is a
    contradiction the base resolves at random, green a third of the time)."""
    from sdtune.inference.sampling import render
    from sdtune.toy.concepts import concept_shares
    from sdtune.toy.domain import SHAPES

    probe = [f"a {colour} {shape} on a {word} background" for shape in SHAPES for colour in ("red", "black")]
    prompts = [p for p in probe for _ in SEEDS]
    seeds = [s for _ in probe for s in SEEDS]
    images = render(pipe, prompts, seeds, steps=20, size=64, call_kwargs={"guidance_scale": 2.0})
    return concept_shares(images, word, {word: "green"}).share("green")


def test_textual_inversion_alone_teaches_a_new_word_a_known_colour(capsys, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    data = write_green_dataset(tmp_path / "data")
    run = tmp_path / "run"
    code, err = run_main(capsys, *ARGS, f"data.root={data}", f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    assert not (run / "lora.safetensors").exists()
    assert json.loads((run / "summary.json").read_text())["trainable_params"] == 32  # one 32-d vector, nothing else

    base = Path(__file__).resolve().parents[2] / "models" / "toy" / "sd15"
    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    before = green_share(pipe, "blue")  # the init word: what olq meant when training began
    pipe.load_textual_inversion(str(run / "olq.safetensors"), token="olq")
    after = green_share(pipe, "olq")
    print(f"green backgrounds: init word {before:.0%}, trained olq {after:.0%}")
    assert before <= 0.1 and after >= 0.8, (before, after)
