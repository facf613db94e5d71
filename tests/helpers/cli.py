"""Running the commands: in a fresh interpreter (``run_cli``, ``kill_when_written``) or in this
process through their entry points (``run_entry``, ``run_main``, ``run_cli_here``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .paths import ROOT

# The shared baseline run: the quickstart experiment with alpha != rank and every source of
# randomness on (flips, caption dropout, offset noise besides noise and timesteps), so that the
# exact-resume test can kill and resume the same run and compare against it.
# 12 images in batches of 4: step 20 is mid-epoch (the second batch of epoch 6).
QUICKSTART_ARGS = ("experiment=quickstart", "lora.rank=4", "lora.alpha=8", "trainer.max_steps=30",
                   "callbacks.model_checkpoint.every_n_train_steps=20", "data.random_flip=true",
                   "data.caption_dropout=0.2", "train.noise_offset=0.05")


def run_cli(*args: str, module: str = "sdtune", timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` from the repository root; output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def kill_when_written(args: list[str], marker: Path, timeout: float = 300) -> int:
    """Start ``python -m sdtune ARGS``, SIGKILL it as soon as ``marker`` exists; its return code."""
    proc = subprocess.Popen([sys.executable, "-m", "sdtune", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), f"the run never wrote {marker.name}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode


def run_entry(capsys, entry, argv0: str, *args: str) -> tuple[int, str]:
    """A command's entry point ``entry()`` run in this process with ``sys.argv = [argv0, *args]``
    (no interpreter start-up): (exit code, stderr)."""
    argv = sys.argv
    sys.argv = [argv0, *args]
    try:
        entry()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def run_main(capsys, *args: str) -> tuple[int, str]:
    """``python -m sdtune ARGS`` in this process, past resume's replay (sdtune.__main__.main)."""
    from sdtune.__main__ import main

    return run_entry(capsys, main, "sdtune", *args)


def run_cli_here(capsys, *args: str) -> tuple[int, str]:
    """``python -m sdtune ARGS`` in this process, through the command's own entry point (resume included)."""
    from sdtune.__main__ import cli

    return run_entry(capsys, cli, "sdtune", *args)
