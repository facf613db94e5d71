"""Reliability: exact resume after SIGKILL, safe writes under kills, NaN guard, 2-process DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from sdtune.lora.files import read_lora
from sdtune.run.train import train
from sdtune.training.checkpointing import load_checkpoint
from sdtune.utils.errors import ConfigError
from tests.helpers.cli import QUICKSTART_ARGS, kill_when_written, run_cli
from tests.helpers.config import compose_cfg
from tests.helpers.paths import ROOT

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
        assert lora.spec.rank == 4 and lora.raw
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


def _stop_at_random(run, delay: float) -> tuple[int, str]:
    """Start the shared quickstart run's twin in ``run``; SIGINT it ``delay`` s into training
    (after its text cache is built); (exit code, stderr). Exit code 0: it finished first."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "sdtune", *QUICKSTART_ARGS, f"hydra.run.dir={run}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    training, err = threading.Event(), []

    def watch_stdout():  # sdtune's log goes to stdout
        for line in proc.stdout:
            if "cached text embeddings" in line:
                training.set()

    threads = [threading.Thread(target=watch_stdout, daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for t in threads:
        t.start()
    assert training.wait(300), "the run never started training"
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    for t in threads:
        t.join(timeout=10)
    return code, "".join(err)


def test_sigint_at_a_random_step_saves_it_and_the_run_folder_alone_resumes_it(quickstart_run, tmp_path):
    """Ctrl-C at a random moment of training: that step's checkpoint and LoRA are written, the resume
    command is printed, and `python -m sdtune ckpt_path=<run folder>` with nothing else finishes
    the run with the baseline's LoRA bit for bit."""
    import random
    import shutil

    run = tmp_path / "stopped"
    delay = random.uniform(0.0, 2.5)  # the 30 steps take ~3.5 s on this machine
    for _attempt in range(4):
        code, err = _stop_at_random(run, delay)
        if code != 0:
            break
        shutil.rmtree(run)  # it finished before the signal (a slow start): again, sooner
        delay /= 3
    assert code == 130, (delay, err[-3000:])
    stopped = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 1 <= stopped <= 30, (delay, stopped)
    assert f"stopped by SIGINT at step {stopped}" in err and f"python -m sdtune ckpt_path={run}" in err, err[-3000:]
    assert read_lora(run / "lora.safetensors").metadata["ss_steps"] == str(stopped)
    assert "Traceback" not in err and not (run / "samples.png").exists()  # no renders on the way out

    resumed = run_cli(f"ckpt_path={run}")  # no other argument: the run's own settings, in its own folder
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: replaying the command line of {run.resolve()} (.hydra/overrides.yaml): {' '.join(QUICKSTART_ARGS)}" \
        in resumed.stderr  # what is replayed is said
    assert _same(run / "lora.safetensors", quickstart_run / "lora.safetensors") == 0.0, (delay, stopped)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 30


def test_resume_replays_the_runs_own_command_line(tmp_path):
    from sdtune.run.resume import changed_settings, resume_argv

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=quickstart\n- lora.rank=8\n- trainer.max_steps=30\n")
    ckpt = run / "checkpoints" / "step000020.ckpt"
    switches = ["++model.allow_pickle=false", "++data.allow_outside_root=false"]  # only this command line sets them
    assert resume_argv([f"ckpt_path={run}"]) == ["experiment=quickstart", "lora.rank=8", "trainer.max_steps=30",
                                                 *switches, f"ckpt_path={run}", f"hydra.run.dir={run}"]
    # a later value wins, hydra.run.dir given stays, a .ckpt inside the run names the run too
    assert resume_argv([f"ckpt_path={ckpt}", "trainer.max_steps=60", "hydra.run.dir=/elsewhere"]) == [
        "experiment=quickstart", "lora.rank=8", *switches, f"ckpt_path={ckpt}", "trainer.max_steps=60", "hydra.run.dir=/elsewhere"]
    assert resume_argv(["ckpt_path=last", "lora.rank=4"]) == ["ckpt_path=last", "lora.rank=4"]  # not a run folder
    assert changed_settings({"trainer": {"max_steps": 30}, "seed": 0, "ckpt_path": None},
                            {"trainer": {"max_steps": 60}, "seed": 0, "ckpt_path": "x"}) == ["trainer.max_steps: 30 -> 60"]


def test_a_run_folder_named_like_overrides_is_quoted_for_hydra(tmp_path):
    """Sweep folders named by override_dirname (lora.rank=8,seed=1) must reach Hydra as one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sdtune.run.resume import resume_argv

    run = tmp_path / "lora.rank=8,seed=1"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- lora.rank=8\n")
    argv = resume_argv([f"ckpt_path='{run}'"])
    parsed = OverridesParser.create().parse_overrides(argv)
    assert [o.key_or_group for o in parsed] == ["lora.rank", "model.allow_pickle", "data.allow_outside_root", "ckpt_path",
                                                "hydra.run.dir"]
    assert parsed[-1].value() == str(run)
