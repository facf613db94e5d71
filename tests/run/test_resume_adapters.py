"""Exact resume with DoRA and LoHa: a run killed by SIGKILL and resumed ends bit-identical to one never stopped.

Their extra tensors (DoRA's ``lora_magnitude_vector``, LoHa's ``hada_*`` parameter dicts, whose keys
have no ``.weight``) must be in the checkpoint and restored with their optimizer state; Lightning
loads non-strictly, so a tensor missed by the checkpoint filter would silently restart from its
initial value and the resumed file would differ.
"""

from __future__ import annotations

import signal

import pytest
from safetensors.torch import load_file

from sdtune.training.checkpointing import load_checkpoint
from tests.helpers.cli import kill_when_written, run_cli

pytestmark = pytest.mark.slow
ARGS = ["experiment=quickstart", "trainer.max_steps=12", "callbacks.samples=null", "callbacks.concept_probe=null",
        "data.val_images=0", "data.random_flip=true", "data.caption_dropout=0.2",
        "callbacks.model_checkpoint.every_n_train_steps=5"]


@pytest.mark.parametrize("variant", [["lora.use_dora=true"], ["lora.type=loha"]], ids=["dora", "loha"])
def test_sigkill_then_resume_is_bit_identical(variant, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_cli(*ARGS, *variant, f"hydra.run.dir={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = kill_when_written([*ARGS, *variant, f"hydra.run.dir={killed}"], killed / "checkpoints" / "step000005.ckpt")
    assert code == -signal.SIGKILL and not (killed / "lora.safetensors").exists()
    saved = load_checkpoint(killed / "checkpoints" / "step000005.ckpt")["state_dict"]
    extra = ".lora_magnitude_vector." if "use_dora" in variant[0] else ".hada_w2_b."
    assert any(extra in k for k in saved)  # the variant's own tensors are checkpointed
    proc = run_cli(*ARGS, *variant, f"hydra.run.dir={killed}", "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(whole / "lora.safetensors")), load_file(str(killed / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
