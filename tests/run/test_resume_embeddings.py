"""Exact resume of a pivotal-tuning run (embedding rows and UNet LoRA) after SIGKILL."""

from __future__ import annotations

import os
import signal

import pytest
from safetensors.torch import load_file

from sdtune.training.checkpointing import load_checkpoint
from tests.helpers.cli import kill_when_written, run_cli
from tests.helpers.paths import QUICKSTART

pytestmark = pytest.mark.slow
# Every source of randomness on; 12 images in batches of 4, so step 5 is mid-epoch.
ARGS = ["experiment=quickstart", "embedding=pivotal", "embedding.tokens=[sks]", "embedding.init=shape",
        "embedding.num_vectors=2", "trainer.max_steps=9", "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0", "data.random_flip=true",
        "data.caption_dropout=0.2", "train.noise_offset=0.05", f"data.root={QUICKSTART}"]


def test_sigkill_then_resume_gives_the_same_embedding_and_lora_bit_for_bit(tmp_path):
    """Catches: new rows missing from checkpoints (a resume would restart them from the init word),
    their optimizer state not restored, or the text cache switched back on by a resume."""
    whole = tmp_path / "whole"
    proc = run_cli(*ARGS, f"hydra.run.dir={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text-embedding cache off: embedding trains new token embeddings" in proc.stderr + proc.stdout

    run = tmp_path / "killed"
    code = kill_when_written([*ARGS, f"hydra.run.dir={run}"], run / "checkpoints" / "step000005.ckpt")
    assert code == -signal.SIGKILL and not (run / "sks.safetensors").exists()
    killed_at = load_checkpoint(max(run.joinpath("checkpoints").glob("*.ckpt"), key=os.path.getmtime))
    assert 5 <= killed_at["global_step"] < 9 and set(killed_at["state_dict"]) >= {"embeddings.rows.0"}

    resumed = run_cli(*ARGS, f"hydra.run.dir={run}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("sks.safetensors", "lora.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(whole / name))
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), name  # bit-identical on the CPU
    start = load_file(str(whole / "sks.safetensors"))["emb_params"]
    first = killed_at["state_dict"]["embeddings.rows.0"]
    assert (start - first).abs().max() > 0  # the rows kept training after the checkpoint


def test_resume_refuses_another_embedding_setup(tmp_path):
    """Catches: resuming with other tokens or vector counts silently dropping the saved rows."""
    run = tmp_path / "run"
    proc = run_cli(*ARGS, "trainer.max_steps=5", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = run_cli(*ARGS, "embedding.num_vectors=1", f"hydra.run.dir={run}", "ckpt_path=last")
    assert again.returncode != 0
    assert "cannot resume: the checkpoint was trained with embedding=" in again.stderr
    assert "'num_vectors': 2" in again.stderr
