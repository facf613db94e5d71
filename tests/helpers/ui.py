"""The web app in tests: the app object under Starlette's TestClient, a real server process, small
datasets, and waiting for a condition."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from starlette.testclient import TestClient

from sdtune.ui.server import create_app
from tests.helpers.images import add, textured

from .paths import ROOT


def client(outputs: Path, **kwargs) -> TestClient:
    """A TestClient on a fresh app over ``outputs`` (runner not started unless ``start_runner=True`` and
    the client is used as a context manager), speaking to Host 127.0.0.1 as a browser on this machine does."""
    kwargs.setdefault("start_runner", False)
    return TestClient(create_app(outputs, **kwargs), base_url="http://127.0.0.1")


def kohya_set(root: Path, n: int = 2) -> Path:
    """A kohya folder of ``n`` 64x48 images ``img{i}.png``, the first with a caption file."""
    for i in range(n):
        add(root, f"img{i}.png", textured(i, 64, 48), f"caption {i}" if i == 0 else None)
    return root


def wait_for(condition: Callable[[], object], timeout: float = 30, every: float = 0.05, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def start_server(outputs: Path, *args: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``python -m sdtune.ui --outputs OUTPUTS --port 0 ARGS`` as a process; (process, the URL it printed)."""
    proc = subprocess.Popen([sys.executable, "-m", "sdtune.ui", "--outputs", str(outputs), "--port", "0", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"sdtune ui: (http://\S+)", line or "")
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server printed no URL: {proc.stdout.read() if proc.stdout else ''}")
