"""Reliability: exact resume after SIGKILL, safe writes under kills, NaN guard, 2-process DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from sdtune.checkpointing import load_checkpoint
from sdtune.errors import ConfigError
from sdtune.lora_files import read_lora
from sdtune.train import train

from .conftest import QUICKSTART_ARGS, ROOT, compose_cfg, kill_when_written, run_cli

pytestmark = pytest.mark.slow
# Short runs with every source of randomness on, for the tests that need no baseline.
COMMON = ["experiment=quickstart", "trainer.max_steps=12", "callbacks.samples=null", "data.val_images=0",
          "data.random_flip=true", "data.caption_dropout=0.2", "train.noise_offset=0.05",
          "callbacks.model_checkpoint.every_n_train_steps=5"]


def _same(a, b) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(quickstart_run, tmp_path):
    """Kill the shared quickstart run's twin mid-epoch, resume it, and get the baseline's LoRA bit for bit."""
    run = tmp_path / "killed"
    code = kill_when_written([*QUICKSTART_ARGS, f"hydra.run.dir={run}"], run / "checkpoints" / "step000020.ckpt",
                             timeout=400)
    assert code == -signal.SIGKILL and not (run / "lora.safetensors").exists()
    killed_at = load_checkpoint(max(run.joinpath("checkpoints").glob("*.ckpt"), key=os.path.getmtime))["global_step"]
    assert killed_at < 30 and killed_at % 3 != 0  # really mid-epoch (3 batches an epoch)

    resumed = run_cli(*QUICKSTART_ARGS, f"hydra.run.dir={run}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same(run / "lora.safetensors", quickstart_run / "lora.safetensors") == 0.0  # bit-identical on the CPU
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")
    whole = load_checkpoint(quickstart_run / "checkpoints" / "last.ckpt")
    assert (final["global_step"], final["epoch"]) == (whole["global_step"], whole["epoch"]) == (30, 10)
    assert final["lr_schedulers"][0]["last_epoch"] == whole["lr_schedulers"][0]["last_epoch"] == 30
    steps = [int(line.split(",")[2]) for line in (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()[1:]
             if line.split(",")[2]]
    assert steps == sorted(steps) and max(steps) >= 29  # the log continues, with no rows from lost work


@pytest.mark.parametrize(("override", "what"), [
    ("lora.rank=8", "rank: checkpoint 4, config 8"),
    ("lora.alpha=16", "alpha: checkpoint 8.0, config 16.0"),
    ("lora.targets=[to_q,to_v]", "targets: checkpoint"),
    ("model=tiny_sdxl", "family: checkpoint 'sd15', config 'sdxl'"),
])
def test_resume_refuses_another_family_rank_or_target_set(quickstart_run, tmp_path, override, what):
    cfg = compose_cfg(*QUICKSTART_ARGS, override, f"ckpt_path={quickstart_run}", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=rf"cannot resume from .*last.ckpt.*{what}"):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_keep_last_keeps_the_newest_good_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(*COMMON, "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=2",
                   "callbacks.model_checkpoint.keep_last=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step000008.ckpt", "step000010.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "step000010.ckpt")["global_step"] == 10


def test_kill_during_export_never_leaves_a_broken_file(quickstart_run, tmp_path):
    target = tmp_path / "lora.safetensors"
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    seen = set()
    for i, delay in enumerate([0.0, 0.5, 1.0, 1.5, 2.0, 2.3, 2.6, 2.9, 3.2, 3.6, 4.0, 5.0]):
        if i == 4:  # from now on an older good file is in place
            assert run_cli(str(ckpt), "--out", str(target), module="sdtune.export").returncode == 0
            old = target.read_bytes()
        proc = subprocess.Popen([sys.executable, "-m", "sdtune.export", str(ckpt), "--out", str(target)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if not target.exists():
            seen.add("absent")
            assert i < 4
            continue
        lora = read_lora(target)  # complete and loadable, or this raises
        seen.add("old" if i >= 4 and target.read_bytes() == old else "new")
        assert lora.spec.rank == 4 and lora.tensors
    assert "absent" in seen  # the kills did land before the write, at least sometimes
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["lora.safetensors"]


def test_non_finite_loss_stops_with_the_causes_and_the_last_checkpoint_loads(tmp_path):
    run = tmp_path / "nan"
    proc = run_cli(*COMMON, "optim.optimizer.lr=1e30", "callbacks.model_checkpoint.every_n_train_steps=1",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 2
    assert "training stopped: the loss is" in proc.stderr and "at step" in proc.stderr
    assert "fp16-fix VAE" in proc.stderr and "optim.optimizer.lr=1e+30" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run / "lora.safetensors").exists()
    good = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert good["global_step"] >= 1 and good["state_dict"]
    # skipping instead: the run finishes and counts what it skipped
    run2 = tmp_path / "skip"
    proc = run_cli(*COMMON, "optim.optimizer.lr=1e30", "trainer.skip_nonfinite=true", f"hydra.run.dir={run2}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = load_checkpoint(run2 / "checkpoints" / "last.ckpt")["sdtune"]["skipped_nonfinite"]
    assert skipped >= 1 and "skipped" in proc.stdout + proc.stderr


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    common = [*COMMON, "trainer.max_steps=6", "optim.optimizer.lr=1e-4"]
    ddp = tmp_path / "ddp"
    proc = run_cli(*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32", "data.batch_size=2",
                   f"hydra.run.dir={ddp}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    proc = run_cli(*common, "data.batch_size=4", f"hydra.run.dir={single}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(ddp.rglob("lora.safetensors"))) == 1  # rank 0 alone wrote it
    assert _same(ddp / "lora.safetensors", single / "lora.safetensors") < 1e-5
    assert load_checkpoint(ddp / "checkpoints" / "last.ckpt")["global_step"] == 6
