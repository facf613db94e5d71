"""Learning with DoRA, LoHa and LoKr: each teaches the toy SD1.5 base the quickstart's pink ``sks`` ground.

One quickstart run per variant (``lora.use_dora=true``, ``lora.type=loha``, ``lora.type=lokr``),
shortened to 150 steps at the quickstart's lr 2e-3 (measured: each then draws 100% pink on and 0%
off; so do 150 steps at lr 4e-3 for DoRA and 6e-3 for LoHa/LoKr, and DoRA's full 300 steps).
The concept probe reads the samples of the trigger's prompts at fixed seeds: with the adapter on
at least 80% must be pink, with it off at most 10%. An adapter whose extra tensors are not
trained (a trainable-parameter filter that knows only ``lora_A``/``lora_B`` freezes LoHa and LoKr
entirely) or are lost before the probe fails here; the run's own file must also read back as
the variant it trained, with its rank and alpha, and ``sdtune.export`` of the run's last checkpoint
must write the same tensors (a DoRA ``dora_scale`` then comes from the base weights at ``model.path``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdtune.lora.files import read_lora
from sdtune.toy.concepts import TRIGGERS
from tests.helpers.cli import run_cli

pytestmark = pytest.mark.slow

VARIANTS = {"dora": ["lora.use_dora=true"], "loha": ["lora.type=loha"], "lokr": ["lora.type=lokr"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_learns_the_trigger(variant, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("experiment=quickstart", "callbacks.samples=null", "data.val_images=0", "trainer.max_steps=150", *VARIANTS[variant],
                   f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "summary.json").read_text())["concept_probe"]["sks"]
    colour = TRIGGERS["sks"]
    on, off = report["lora_on"][colour], report["lora_off"][colour]
    assert on >= 0.8 and off <= 0.1, f"{variant}: {colour} {off:.0%} without the adapter, {on:.0%} with it"
    lora = read_lora(run / "lora.safetensors")
    assert (lora.format, lora.spec.kind, lora.spec.rank, lora.spec.alpha) == ("kohya", variant, 4, 4.0)
    exported = tmp_path / "exported.safetensors"
    proc = run_cli(str(run / "checkpoints" / "last.ckpt"), "--out", str(exported), module="sdtune.export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = load_file(str(run / "lora.safetensors")), load_file(str(exported))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=1e-6)
