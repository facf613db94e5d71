"""Shared fixtures: tiny real-architecture models on disk, datasets, one shared quickstart run.

Only fixtures live here; the plain helpers they use (paths, configs, models, command runs, files)
are in ``tests/helpers/``, which test modules import directly. The tiny model is built once per
checkout (``.cache/tiny-sd15``, versioned) and every test loads it through the same
``from_pretrained`` path a real model uses.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from sdtune.config.resolvers import register_resolvers
from tests.helpers.cli import QUICKSTART_ARGS, run_cli
from tests.helpers.models import tiny_model
from tests.helpers.paths import QUICKSTART

register_resolvers()  # configs composed anywhere in the session resolve ${sdtune_root:} and friends
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # Started in the background by a non-interactive shell (`pytest ... &`), this process ignores SIGINT, and so
    # would every command it starts (an ignored signal stays ignored across exec; sdtune's graceful stop leaves it
    # ignored): the tests that Ctrl-C a run would see it train on. A handled signal is reset in the children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test-slow` runs two pytest-xdist workers on the two cores: one thread each, for the worker and
    # (through the environment) for the commands it starts, instead of 2 x 2 threads fighting over 2 cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


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
    return tiny_model("sd15")


@pytest.fixture
def one_image_data(tmp_path: Path) -> Path:
    """A dataset folder with a single quickstart image and its caption."""
    root = tmp_path / "one"
    (root / "images").mkdir(parents=True)
    shutil.copy(QUICKSTART / "images" / "sks_00_red_circle.png", root / "images" / "a.png")
    (root / "metadata.csv").write_text("file_name,text\nimages/a.png,a sks circle on a blue background\n")
    return root


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, tiny_sd15) -> Path:
    """One real `python -m sdtune experiment=quickstart` run (see QUICKSTART_ARGS), shared by tests."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_cli(*QUICKSTART_ARGS, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir.parent / "stdout.txt").write_text(proc.stdout)  # beside the run: what the console showed
    (run_dir.parent / "stderr.txt").write_text(proc.stderr)
    return run_dir


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
