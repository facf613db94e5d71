"""Catalogue, config values: each bad value stops `python -m sdtune` with exit 2 and one message that
names the key, the value and the fix, before any model loads; nothing in the data folder changes."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers.cli import run_cli, run_main
from tests.helpers.files import snapshot
from tests.helpers.paths import QUICKSTART

BASE = ["experiment=quickstart", "callbacks.samples=null", "data.val_images=0"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.max_steps=0"], r"trainer.max_steps must be a positive integer, or -1 for no limit, got 0"),
    (["trainer.max_steps=-5"], r"trainer.max_steps must be a positive integer, or -1 for no limit, got -5"),
    (["trainer.max_steps=-1"], r"trainer.max_steps=-1 and trainer.max_epochs=-1: the run would never end. Fix: set one"),
    (["trainer.max_epochs=0"], r"trainer.max_epochs must be a positive integer, or -1"),
    (["trainer.max_steps=1.5"], r"trainer.max_steps must be a positive integer, or -1 for no limit, got 1.5"),
    (["optim.optimizer.lr=nan"], r"optim.optimizer.lr must be a finite number, got nan"),
    (["optim.optimizer.lr=inf"], r"optim.optimizer.lr must be a finite number, got inf"),
    (["train.noise_offset=inf"], r"train.noise_offset must be a finite number, got inf"),
    (["seed=-1"], r"seed must be an integer from 0 to 2\*\*32-1 \(4294967295\), got -1. Fix: e.g. seed=42"),
    (["seed=4294967296"], r"seed must be an integer from 0 to 2\*\*32-1 \(4294967295\), got 4294967296"),
    (["lora.rank=1000000000"], r"lora.rank=1000000000 is larger than any layer it could adapt .*Fix: e.g. lora.rank=16"),
    (["+optim.scheduler.min_lr=0.1"], r"optim.scheduler.min_lr is not a setting of diffusers' get_scheduler and would be ignored.*Fix: remove"),
    (["optim.scheduler.name=cosinus"], r"optim.scheduler.name='cosinus' is not one of \[.*'cosine'"),
    (["optim.scheduler.warmup_steps=-3"], r"optim.scheduler.warmup_steps must be >= 0, got -3"),
])
def test_bad_config_value_is_one_message_before_loading(capsys, tmp_path, overrides, message):
    before = snapshot(QUICKSTART)
    code, err = run_main(capsys, *BASE, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err[-2000:]
    assert re.search(message, err), err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()
    assert "caching text embeddings" not in err  # stopped before the model and its encoders loaded
    assert snapshot(QUICKSTART) == before


@pytest.mark.parametrize("targets", ["[nonexistent]", "[to_q,nonexistent]"])
def test_lora_target_that_matches_no_layer_is_named(capsys, tmp_path, targets):
    """peft raises only when no target matches and silently skips the rest; both are our error."""
    code, err = run_main(capsys, *BASE, f"lora.targets={targets}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err[-2000:]
    assert "lora.targets: ['nonexistent'] match no linear or conv layer of this UNet" in err
    assert "to_q" in err.split("names here:")[1] and "Traceback" not in err


def test_checkpoint_callback_null_means_no_checkpoints(capsys, tmp_path):
    """Lightning would add its own per-epoch ModelCheckpoint when ours is switched off."""
    run = tmp_path / "run"
    code, err = run_main(capsys, *BASE, "trainer.max_steps=4", "callbacks.model_checkpoint=null", f"hydra.run.dir={run}")
    assert code == 0, err[-2000:]
    assert not list(run.rglob("*.ckpt")) and (run / "lora.safetensors").is_file()
    log = "".join(p.read_text() for p in run.glob("*.log"))  # Hydra's job log holds our warnings
    assert "writes no checkpoints and cannot be resumed" in log


def test_summary_counts_the_bytes_of_a_renamed_lora_file(capsys, tmp_path):
    run = tmp_path / "run"
    code, err = run_main(capsys, *BASE, "trainer.max_steps=2", "callbacks.lora_export.filename=style_v2.safetensors",
                         f"hydra.run.dir={run}")
    assert code == 0, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lora_bytes"] == (run / "style_v2.safetensors").stat().st_size > 0


def test_home_folder_in_an_override_reaches_our_checks(tmp_path):
    """`data.root=~/set` is no shell assignment (no ~ expansion) and Hydra's grammar refuses a bare ~."""
    from sdtune.config.overrides import expand_home

    home = tmp_path / "home dir"
    (home / "set").mkdir(parents=True)
    env = {"HOME": str(home)}
    proc = run_cli("experiment=quickstart", "data.root=~/set", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert proc.returncode == 2
    assert f"data.root='{home / 'set'}' holds no images" in proc.stderr and "LexerNoViableAlt" not in proc.stderr
    import os

    old = os.environ["HOME"]
    os.environ["HOME"] = "/h/o'k"
    try:
        assert expand_home(["a=~/x", "b=~", "c=x~", "~d", "e=~user"]) == ["a='/h/o\\'k/x'", "b='/h/o\\'k'", "c=x~", "~d", "e=~user"]
    finally:
        os.environ["HOME"] = old
