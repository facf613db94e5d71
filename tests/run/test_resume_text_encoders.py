"""Text-encoder LoRA survives a SIGKILL: ``ckpt_path=last`` resumes it bit-identically on the CPU.

The text encoders are not part of the UNet, so their LoRA tensors (and their optimizer state) must
be saved in every checkpoint and restored on resume; a resume that restarted them from their
initial values, or lost their Adam moments, would end on a different file.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from sdtune.training.checkpointing import load_checkpoint
from tests.helpers.cli import QUICKSTART_ARGS, kill_when_written, run_cli

pytestmark = pytest.mark.slow
ARGS = (*QUICKSTART_ARGS, "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0",
        "lora.text_encoder={rank: 2, alpha: 4, lr: 1e-3}")


def test_sigkill_then_resume_gives_the_same_text_encoder_lora(tmp_path):
    whole = tmp_path / "whole"
    proc = run_cli(*ARGS, f"hydra.run.dir={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text-embedding cache off: lora.text_encoder trains the text encoders" in proc.stdout
    assert "cached text embeddings" not in proc.stdout

    run = tmp_path / "killed"
    code = kill_when_written([*ARGS, f"hydra.run.dir={run}"], run / "checkpoints" / "step000020.ckpt", timeout=400)
    assert code == -signal.SIGKILL and not (run / "lora.safetensors").exists()
    killed = load_checkpoint(max(run.joinpath("checkpoints").glob("*.ckpt"), key=os.path.getmtime))
    assert killed["global_step"] < 30 and killed["global_step"] % 3 != 0  # mid-epoch
    te_keys = [k for k in killed["state_dict"] if k.startswith("text_encoders.0.")]
    assert te_keys and len(killed["optimizer_states"][0]["param_groups"]) == 2

    resumed = run_cli(*ARGS, f"hydra.run.dir={run}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(run / "lora.safetensors")), load_file(str(whole / "lora.safetensors"))
    te = [k for k in a if k.startswith("lora_te_")]
    assert te and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, text encoder included
    start = load_checkpoint(run / "checkpoints" / "step000020.ckpt")["state_dict"]
    end = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(start[k], end[k]) for k in te_keys)  # the encoders did train after the resume


def test_resume_refuses_a_checkpoint_trained_without_the_text_encoder_lora(quickstart_run, tmp_path):
    """A checkpoint of a UNet-only run resumed with lora.text_encoder on would silently restart the
    encoders' LoRA (and break the optimizer's param groups): refused, naming the setting."""
    from sdtune.run.train import train
    from sdtune.utils.errors import ConfigError
    from tests.helpers.config import compose_cfg

    cfg = compose_cfg(*QUICKSTART_ARGS, "lora.text_encoder={rank: 2}", f"ckpt_path={quickstart_run}", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"cannot resume from .*text_encoder: checkpoint None, config \{'rank': 2"):
        train(cfg, tmp_path)
