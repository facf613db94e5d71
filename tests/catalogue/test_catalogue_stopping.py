"""Catalogue, stopping at the end of a run: Ctrl-C or SIGTERM during the final renders (the concept
probe, the sample grid), a second Ctrl-C, and resuming a finished or end-interrupted run.

The signals are delivered to real ``python -m sdtune`` processes at moments the run itself marks:
the ``Trainer.fit stopped: max_steps=2 reached`` log line comes just before the concept probe
renders (``on_train_end``), and ``lora.safetensors`` is written just before the sample grid renders
(``on_fit_end``); both renders take seconds, far longer than the signal takes to arrive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sdtune.run.train import train
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_cfg
from tests.helpers.files import snapshot
from tests.helpers.paths import QUICKSTART, ROOT

pytestmark = pytest.mark.slow
TINY = ["experiment=quickstart", "trainer.max_steps=2", "data.val_images=0"]
TRAINING_OVER = "`Trainer.fit` stopped: `max_steps=2` reached"  # logged just before on_train_end


class Run:
    """``python -m sdtune ARGS`` in ``run``, its stdout and stderr read as they come."""

    def __init__(self, run, *args: str):
        self.run = run
        self.proc = subprocess.Popen([sys.executable, "-m", "sdtune", *args, f"hydra.run.dir={run}"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [threading.Thread(target=lambda s=s, d=d: d.extend(s), daemon=True)
                        for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    def wait_for(self, what: str, condition, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert condition(), f"{what} never happened (exit {self.proc.poll()}):\n{''.join(self.err)[-3000:]}"

    def logged(self, text: str) -> bool:
        return any(text in line for line in list(self.out))

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.err))

    def signal(self, signum: int) -> None:
        assert self.proc.poll() is None, f"the run ended before the signal:\n{''.join(self.err)[-3000:]}"
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=10)
        return code, "".join(self.out), "".join(self.err)


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_sample_render_exits_with_its_status_and_the_resume_command(tmp_path, signum, status):
    """Was: SIGINT gave Lightning's "Detected KeyboardInterrupt" and exit 1 with no resume command;
    SIGTERM exit 143 with no word; neither wrote summary.json."""
    data = snapshot(QUICKSTART)
    run = tmp_path / "run"
    name = signal.Signals(signum).name
    proc = Run(run, *TINY, "callbacks.concept_probe=null")
    proc.wait_for("the LoRA export before the sample render", (run / "lora.safetensors").exists)
    proc.signal(signum)
    code, out, err = proc.finish()
    assert code == status, err[-3000:]
    assert "Detected KeyboardInterrupt" not in out + err and "Traceback" not in err, err[-3000:]
    assert f"stopped by {name} after training finished (step 2)" in err, err[-3000:]
    assert "final renders" in err and f"python -m sdtune ckpt_path={run}" in err, err[-3000:]
    assert (run / "lora.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "samples.png").exists()
    s = summary(run)
    assert (s["stopped_by"], s["stopped_in"], s["training_finished"], s["global_step"]) == (name, "final renders", True, 2)
    assert s["lora_bytes"] == (run / "lora.safetensors").stat().st_size
    assert snapshot(QUICKSTART) == data


def test_sigterm_during_the_concept_probe_keeps_lora_and_summary_and_resuming_draws_the_renders(tmp_path):
    """Was: exit 143 with no word, and neither lora.safetensors, samples.png nor summary.json. Now the
    probe stops, the LoRA and summary.json (saying training finished) are written, and the message
    says how to draw the renders: resuming the finished run, which then writes all of them."""
    data = snapshot(QUICKSTART)
    run = tmp_path / "run"
    proc = Run(run, *TINY)
    proc.wait_for("the end of training", lambda: proc.logged(TRAINING_OVER))
    proc.signal(signal.SIGTERM)
    code, out, err = proc.finish()
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM after training finished (step 2)" in err, err[-3000:]
    assert "Draw the samples by resuming" in err and f"python -m sdtune ckpt_path={run}" in err, err[-3000:]
    assert (run / "lora.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "samples.png").exists() and not (run / "concept_probe.png").exists()
    s = summary(run)
    assert (s["stopped_by"], s["stopped_in"], s["training_finished"]) == ("SIGTERM", "final renders", True)
    assert "skipped the final renders" in s["note"] and "concept_probe" not in s
    stopped = s

    # The resume command it printed, with fewer sampling steps (given now, they win): trains nothing.
    resumed = run_cli(f"ckpt_path={run}", "callbacks.samples.steps=2", "callbacks.concept_probe.steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: {}" not in resumed.stdout and "'train/loss_step'" in resumed.stdout, resumed.stdout[-3000:]
    assert (run / "samples.png").is_file() and (run / "concept_probe.png").is_file()
    s = summary(run)
    assert (s["stopped_by"], s["stopped_in"], s["training_finished"], s["global_step"]) == (None, None, True, 2)
    assert "concept_probe" in s and "note" not in s
    for key in ("wall_seconds", "steps_per_second", "trainable_params", "final_metrics"):
        assert s[key] == stopped[key], key  # the trained run's numbers, kept in its checkpoint
    assert s["lora_bytes"] == (run / "lora.safetensors").stat().st_size  # rewritten (its header has the new steps)
    assert snapshot(QUICKSTART) == data


def test_a_second_ctrl_c_exits_130_at_once_with_a_short_message(tmp_path):
    """Was: the second Ctrl-C gave Lightning's "Detected KeyboardInterrupt" and exit 1. The first
    Ctrl-C comes as training starts; the second once it was acknowledged, while the first step's
    sample render (every_n_steps=1) still runs: the run stops there, exit 130, no traceback."""
    data = snapshot(QUICKSTART)
    run = tmp_path / "run"
    proc = Run(run, *TINY, "callbacks.concept_probe=null", "callbacks.samples.every_n_steps=1")
    proc.wait_for("the start of training", lambda: proc.logged("cached text embeddings"))
    proc.signal(signal.SIGINT)
    proc.wait_for("the first Ctrl-C's answer", lambda: proc.said("SIGINT: stopping after this step"))
    proc.signal(signal.SIGINT)
    code, out, err = proc.finish(timeout=60)
    assert code == 130, err[-3000:]
    assert "Detected KeyboardInterrupt" not in out + err and "Traceback" not in err, err[-3000:]
    assert "stopped at once by a second Ctrl-C" in err, err[-3000:]
    assert not (run / "lora.safetensors").exists() and not (run / "samples.png").exists()
    assert snapshot(QUICKSTART) == data


def test_resuming_a_finished_run_writes_its_summary_and_returns_its_metrics(tmp_path):
    """Was: no summary.json (RunSummary starts in on_train_start, which Lightning skips when the
    checkpoint is already at max_steps) and ``done: {}``, so sweeps and sdtune.report lost the run."""
    run = tmp_path / "run"
    args = [*TINY, "callbacks.samples=null", "callbacks.concept_probe=null"]
    first = train(compose_cfg(*args, output_dir=run), run)
    before = summary(run)
    (run / "summary.json").unlink()  # as a run stopped during its final renders by SIGKILL leaves it
    again = train(compose_cfg(*args, "ckpt_path=last", output_dir=run), run)
    assert again == first and again
    after = summary(run)
    # The LoRA is exported again, its header recording this run's config (ckpt_path=last): only its size may move.
    assert after["lora_bytes"] == (run / "lora.safetensors").stat().st_size
    assert {k: v for k, v in after.items() if k != "lora_bytes"} == {k: v for k, v in before.items() if k != "lora_bytes"}
    assert (after["global_step"], after["training_finished"], after["stopped_by"]) == (2, True, None)
    assert after["wall_seconds"] > 0 and after["final_metrics"]
