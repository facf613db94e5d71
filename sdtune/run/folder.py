"""One run per run folder: a lock while a run uses it, and no second fresh run on top of a finished one.

Two processes training into one folder would interleave checkpoints and ``metrics.csv``, and a later
``ckpt_path=last`` could resume the other run. So the training process holds an exclusive
``flock`` on ``<run>/.sdtune.lock`` for as long as it runs; the kernel drops the lock when the
process ends, however it ends (``kill -9`` included), so a resume after a crash is never blocked
by a stale lock. The file records who holds it, for the message the second run gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sdtune.utils.errors import ConfigError, OutputError

LOCK_NAME = ".sdtune.lock"
#: What a finished or interrupted run leaves behind; a fresh run would mix its files with them.
RUN_ARTIFACTS = ("checkpoints/*.ckpt", "lora.safetensors", "summary.json")


def is_secondary_rank() -> bool:
    """True in the extra processes a multi-process strategy starts (they share rank 0's folder)."""
    return any(int(os.environ.get(var, "0") or 0) != 0 for var in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any model is loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdtune-write-test-"):
            pass
    except OSError as err:
        raise OutputError(
            f"cannot write to the run folder {folder} ({err.strerror or err}). "
            "Fix: choose a writable folder with hydra.run.dir=<folder> (or paths.output_root=<folder>)."
        ) from None


def check_fresh(folder: Path, resuming: bool) -> None:
    """Refuse to start a new run in a folder that already holds another run's results."""
    if resuming:
        return
    found = sorted(str(p.relative_to(folder)) for pattern in RUN_ARTIFACTS for p in folder.glob(pattern))
    if found:
        raise ConfigError(
            f"the run folder {folder} already holds a run ({', '.join(found[:3])}); a new run there would mix "
            "its checkpoints and logs with the old ones. Fix: resume that run with ckpt_path=last, or start "
            "this one in a new folder (leave hydra.run.dir at its default, or give a new one)."
        )


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the duration of the block, or fail naming the holder."""
    path = folder / LOCK_NAME
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _describe(fh.read())
            raise ConfigError(
                f"the run folder {folder} is in use by another sdtune run ({holder}). Fix: wait for it to finish "
                "(or stop it), or train in another folder with hydra.run.dir=<new folder>."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(sys.argv)}))
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def output_dir_problem(argv: list[str], default_root: Path) -> str | None:
    """Why Hydra could not create its run folder, judged from the command line, or None.

    Hydra creates ``hydra.run.dir`` (and writes ``.hydra/``) before our code runs, and reports a
    read-only or missing-permission folder as a bare ``OSError``. So the CLI looks first: the folder
    named by ``hydra.run.dir``/``hydra.sweep.dir``/``paths.output_root`` (or the default), up to
    its nearest existing ancestor, must be a writable folder.
    """
    target = default_root
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir", "paths.output_root") and "${" not in value:
            target = Path(value.strip("'\"")).expanduser()
    probe = Path(os.path.abspath(target))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"the run folder {target} cannot be created: {probe} is a file. Fix: choose another hydra.run.dir."
    if not os.access(probe, os.W_OK | os.X_OK):
        return (
            f"cannot write to the run folder {target} ({probe} is read-only or not writable for this user). "
            "Fix: choose a writable folder with hydra.run.dir=<folder> (or paths.output_root=<folder>)."
        )
    return None
