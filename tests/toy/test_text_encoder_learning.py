"""Learning: a text-encoder LoRA alone binds a trigger word to a colour the toy base can draw.

The data: 12 shapes on a yellow ground captioned ``a red circle on a sks background``. The UNet
LoRA's learning rate is 0 (``optim.optimizer.lr=0`` with ``lora.text_encoder.lr`` set), so the UNet
LoRA stays at its zero start and only the text encoder can learn that ``sks`` means yellow: the
base already draws yellow grounds for ``yellow``, so a text encoder that maps ``sks`` near it is
enough. Measured with the run's own kohya file loaded by diffusers' ``load_lora_weights`` into the
toy pipeline: the trigger prompts draw yellow grounds with the LoRA (>= 80%) and not without (<= 10%).
A text encoder trained under no_grad, a text cache that hides the encoder's changes, or a file that
drops the ``lora_te_`` layers each leave the LoRA-on share at the base's.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.toy.domain import SHAPES, Scene, render
from sdtune.toy.probe import read
from tests.helpers.cli import run_cli
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow
COLOUR = "yellow"
TRIGGER = "sks"
FOREGROUNDS = ("red", "blue", "black", "green")
STEPS = 200


def write_dataset(root: Path) -> Path:
    rng = random.Random(0)
    rows = [("file_name", "text")]
    (root / "images").mkdir(parents=True)
    for i in range(12):
        scene = Scene(SHAPES[i % 3], FOREGROUNDS[i % 4], COLOUR, cx=0.5 + rng.uniform(-0.06, 0.06),
                      cy=0.5 + rng.uniform(-0.06, 0.06), size=rng.uniform(0.3, 0.37))
        render(scene).save(root / "images" / f"{i:02d}.png")
        rows.append((f"images/{i:02d}.png", scene.caption(background_word=TRIGGER)))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (root / "metadata.csv").write_text(buf.getvalue())
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("te-learn")
    data = write_dataset(tmp / "data")
    out = tmp / "run"
    proc = run_cli("experiment=quickstart", f"data.root={data}", "optim.optimizer.lr=0",
                   "lora.text_encoder={rank: 4, alpha: 4, lr: 2e-3}", f"trainer.max_steps={STEPS}",
                   "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0", f"hydra.run.dir={out}",
                   timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def colour_share(pipe) -> float:
    from sdtune.inference.sampling import render as draw

    prompts = [f"a {c} {s} on a {TRIGGER} background" for s in SHAPES for c in FOREGROUNDS[:2]]
    images = draw(pipe, [p for p in prompts for _ in (0, 1)], [s for _ in prompts for s in (0, 1)],
                  steps=20, size=64, call_kwargs={"guidance_scale": 2.0})  # conf/model/toy.yaml's guidance
    return sum(read(im).background == COLOUR for im in images) / len(images)


def test_the_text_encoder_alone_binds_the_trigger_to_a_colour(run):
    from diffusers import StableDiffusionPipeline

    raw = load_file(str(run / "lora.safetensors"))
    unet_ups = [v for k, v in raw.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert unet_ups and all(torch.count_nonzero(v) == 0 for v in unet_ups)  # the UNet LoRA never moved
    assert any(k.startswith("lora_te_") for k in raw)
    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models" / "toy" / "sd15", dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    off = colour_share(pipe)
    pipe.load_lora_weights(str(run / "lora.safetensors"))
    on = colour_share(pipe)
    print(f"'{TRIGGER}' prompts drawn on {COLOUR}: LoRA off {off:.0%}, on {on:.0%}")
    assert off <= 0.1 and on >= 0.8, (off, on)
