"""Shared fixtures: tiny real-architecture models on disk, config composition, CLI runs.

The tiny model is built once per checkout (``.cache/tiny-sd15``, versioned) and every test loads
it through the same ``from_pretrained`` path a real model uses.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from sdtune.config.overrides import normalize_overrides
from sdtune.config.resolvers import register_resolvers
from sdtune.families.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
CACHE = Path(os.environ.get("SDTUNE_CACHE", ROOT / ".cache"))

register_resolvers()
torch.set_num_threads(min(2, os.cpu_count() or 1))


def compose_cfg(*overrides: str, output_dir: str | os.PathLike = "/nonexistent-output") -> DictConfig:
    """The config ``python -m sdtune OVERRIDES`` would see, with the run folder set explicitly."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*normalize_overrides(list(overrides)), f"paths.output_dir={output_dir}"])
    return cfg


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


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


@pytest.fixture(autouse=True)
def _drop_job_log_handlers():
    """A command run in-process (Hydra's job logging) leaves stream and file handlers on the root
    logger, bound to this test's captured streams, which close with the test; left there, a later
    test's log line turns into "--- Logging error ---" and a traceback on its stderr."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in root.handlers[:]:
        if type(handler) in (logging.StreamHandler, logging.FileHandler) and handler not in before:
            root.removeHandler(handler)
            handler.close()


@pytest.fixture(scope="session")
def tiny_sd15() -> Path:
    return ensure_tiny_model("sd15", CACHE / "tiny-sd15")


def tiny_model(family: str) -> Path:
    return ensure_tiny_model(family, CACHE / f"tiny-{family}")


def unet_inputs(family: str, batch: int = 2, seed: int = 0) -> tuple:
    """A fixed random (sample, timesteps, kwargs) for a tiny UNet of ``family``."""
    g = torch.Generator().manual_seed(seed)
    ctx_dim, seq, pooled = {"sd15": (32, 77, None), "sdxl": (80, 77, 48), "kolors": (32, 256, 32)}[family]
    kwargs = {"encoder_hidden_states": torch.randn(batch, seq, ctx_dim, generator=g)}
    if pooled:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)), kwargs


@pytest.fixture
def one_image_data(tmp_path: Path) -> Path:
    """A dataset folder with a single quickstart image and its caption."""
    root = tmp_path / "one"
    (root / "images").mkdir(parents=True)
    shutil.copy(QUICKSTART / "images" / "sks_00_red_circle.png", root / "images" / "a.png")
    (root / "metadata.csv").write_text("file_name,text\nimages/a.png,a sks circle on a blue background\n")
    return root


# The shared baseline run: the quickstart experiment with alpha != rank and every source of
# randomness on (flips, caption dropout, offset noise besides noise and timesteps), so that the
# exact-resume test can kill and resume the same run and compare against it.
# 12 images in batches of 4: step 20 is mid-epoch (the second batch of epoch 6).
QUICKSTART_ARGS = ("experiment=quickstart", "lora.rank=4", "lora.alpha=8", "trainer.max_steps=30",
                   "callbacks.model_checkpoint.every_n_train_steps=20", "data.random_flip=true",
                   "data.caption_dropout=0.2", "train.noise_offset=0.05")


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, tiny_sd15) -> Path:
    """One real `python -m sdtune experiment=quickstart` run (see QUICKSTART_ARGS), shared by tests."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_cli(*QUICKSTART_ARGS, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir.parent / "stdout.txt").write_text(proc.stdout)  # beside the run: what the console showed
    (run_dir.parent / "stderr.txt").write_text(proc.stderr)
    return run_dir


def kill_when_written(args: list[str], marker: Path, timeout: float = 300) -> int:
    """Start ``python -m sdtune ARGS``, SIGKILL it as soon as ``marker`` exists; its return code."""
    import signal
    import time

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


def _snapshot(root: Path) -> dict:
    """sha256 of every file under ``root``: proves a test left the user's files as they were."""
    import hashlib

    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Four good quickstart images under images/, listed in metadata.csv; tests break one thing each."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = ["file_name,text"]
    for i, src in enumerate(sorted((QUICKSTART / "images").glob("*.png"))[:4]):
        shutil.copy(src, root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,caption {i}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root
