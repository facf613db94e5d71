"""The job runner: one process at a time per device, oldest queued job first, surviving restarts.

Each job is a plain command (``python -m sdtune ... hydra.run.dir=<run folder>``, ``ckpt_path=<run
folder>`` to resume, ``python -m sdtune.generate ...``), so a run started here is the run the
command line would make, bit for bit. The process gets its own session (``start_new_session``):
stopping or restarting the server leaves it running, and the next server re-attaches it (its pid
is alive and its ``/proc/<pid>/cmdline`` names the job's folder). Its stdout and stderr go to
``<outputs>/.sdtune-ui/jobs/<id>.log``, the source of the page's progress line and log tail.

States (:func:`end_state`, :func:`lost_state`): exit 0 is finished; 130/143 (or death by SIGINT/SIGTERM)
after our stop is stopped; a process gone without an exit this server saw is finished when its
``summary.json`` says so since it started, interrupted when its run folder holds a checkpoint,
else failed. Stop sends SIGINT to the process: the same graceful stop as Ctrl-C (checkpoint, LoRA,
resume command).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdtune.ui.store import Store

log = logging.getLogger(__name__)
STOP_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)


def default_command(job: dict[str, Any]) -> list[str]:
    """The process a job runs: this Python with the job's arguments (``-m sdtune ...``)."""
    return [sys.executable, *job["argv"]]


def has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any((folder / "checkpoints").glob("*.ckpt"))


def end_state(job: dict[str, Any], code: int, folder: Path | None) -> str:
    """The state of a job whose process this server saw exit with ``code``."""
    if code == 0:
        return "finished"
    if code in STOP_CODES:
        if job["stop_requested"]:
            return "stopped"
        if folder is not None and job["kind"] != "generate" and has_checkpoint(folder):
            return "interrupted"  # stopped gracefully by someone else (Ctrl-C in its terminal, a shutdown)
    return "failed"


def lost_state(job: dict[str, Any], folder: Path | None) -> str:
    """The state of a job whose process ended while no server watched it (no exit code seen)."""
    if folder is None:
        return "failed"
    if job["kind"] == "generate":
        return "finished" if (folder / "grid.png").is_file() else "failed"
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        fresh = (folder / "summary.json").stat().st_mtime >= (job["started"] or 0)
    except (OSError, ValueError):
        summary, fresh = {}, False
    if fresh and isinstance(summary, dict) and summary.get("training_finished"):
        return "finished"
    if has_checkpoint(folder):
        return "stopped" if job["stop_requested"] else "interrupted"
    return "failed"


def job_marker(job: dict[str, Any]) -> str:
    """The argument of a job's command line that names its folder: ``hydra.run.dir=<folder>`` (a run,
    a generate job's output), ``ckpt_path=<folder>`` (a resume), or the folder itself (tests' scripts)."""
    out = job.get("out_dir") or ""
    for arg in job["argv"]:
        if out and (arg == out or arg.startswith(("hydra.run.dir=", "ckpt_path="))):
            return arg
    return ""


def process_holds(pid: int, arg: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process that has ``arg`` as one of its arguments (the
    whole argument: ``generate/1`` is not ``generate/12``), so a reused pid is never taken for a job."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return bool(arg) and arg.encode(errors="surrogateescape") in args


class Runner:
    """Starts queued jobs, reaps ended ones, stops on request; a daemon thread ticks twice a second.

    ``command`` maps a job to the process to run (:func:`default_command`); tests give a short script.
    """

    def __init__(self, store: Store, outputs: Path, devices: list[str], *,
                 command: Callable[[dict[str, Any]], list[str]] = default_command, interval: float = 0.5):
        self.store, self.outputs, self.devices = store, Path(outputs).resolve(), list(devices)
        self.command, self.interval = command, interval
        self.logs = self.outputs / ".sdtune-ui" / "jobs"
        self.procs: dict[int, subprocess.Popen] = {}
        self.wake = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- the loop -----------------------------------------------------------------------------------
    def start(self) -> Runner:
        self.tick()  # re-attach or settle what an earlier server left, before the first page asks
        self._thread = threading.Thread(target=self._loop, name="sdtune-ui-runner", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop ticking. Running jobs keep running (their own sessions); the next server re-attaches them."""
        self._halt.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._halt.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            if self._halt.is_set():
                break
            try:
                self.tick()
            except Exception:  # one bad row must not end the queue
                log.exception("sdtune ui: the job runner's tick failed")

    def tick(self) -> None:
        """Reap ended jobs, then start the oldest queued job of every idle device."""
        with self._lock:
            self.reap()
            for device in self.devices:
                busy = [j for j in self.store.jobs(states=("running", "stopping")) if j["device"] == device]
                if not busy:
                    job = self.store.next_queued(device)
                    if job is not None:
                        self._spawn(job)

    def folder(self, job: dict[str, Any]) -> Path | None:
        return Path(job["out_dir"]) if job.get("out_dir") else None

    def reap(self) -> None:
        for job in self.store.jobs(states=("running", "stopping")):
            proc = self.procs.get(job["id"])
            if proc is not None:
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[job["id"]]
                self.store.mark_ended(job["id"], end_state(job, code, self.folder(job)), code)
            elif not (job["pid"] and process_holds(job["pid"], job_marker(job))):
                self.store.mark_ended(job["id"], lost_state(job, self.folder(job)), None)

    def _spawn(self, job: dict[str, Any]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if job["device"] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif job["device"] != "auto":
            env["CUDA_VISIBLE_DEVICES"] = job["device"]
        path = self.log_path(job["id"])
        with open(path, "ab") as out:
            try:
                proc = subprocess.Popen(self.command(job), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
            except OSError as err:
                out.write(f"sdtune ui: could not start the job: {err}\n".encode())
                self.store.mark_started(job["id"], 0)
                self.store.mark_ended(job["id"], "failed", None)
                return
        self.procs[job["id"]] = proc
        self.store.mark_started(job["id"], proc.pid)

    # -- requests from the pages ------------------------------------------------------------------
    def log_path(self, job_id: int) -> Path:
        return self.logs / f"{job_id}.log"

    def stop(self, job_id: int) -> dict[str, Any] | None:
        """Running: SIGINT to its process (graceful stop), state stopping. Queued: cancelled. A job
        already stopping gets no second SIGINT (a second one stops at once, saving nothing), and a pid
        is signalled only while its command line is still the job's (never a reused pid)."""
        with self._lock:
            job = self.store.job(job_id)
            if job is None:
                return None
            if job["state"] == "queued":
                self.store.cancel(job_id)
            elif job["state"] == "running" and not job["stop_requested"] and job["pid"]:
                self.store.mark_stopping(job_id)
                proc = self.procs.get(job_id)
                ours = proc.poll() is None if proc is not None else process_holds(job["pid"], job_marker(job))
                try:
                    if ours:
                        os.kill(job["pid"], signal.SIGINT)
                except ProcessLookupError:  # ended meanwhile: the next tick reaps it
                    pass
        self.wake.set()
        return self.store.job(job_id)

    def submit(self, kind: str, argv_of: Callable[[int], tuple[list[str], str | None, str | None]], *,
               device: str | None, params: dict[str, Any] | None = None,
               check: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """Queue a job (``argv_of(id) -> (argv, out_dir, run)``, ``check``: see :meth:`Store.add_job`) on
        ``device`` (the first served device when None); ValueError for a device this server does not serve."""
        device = device or self.devices[0]
        if device not in self.devices:
            raise ValueError(f"device {device!r} is not served; this server runs jobs on {self.devices} (--devices).")
        job = self.store.add_job(kind, argv_of, device=device, params=params, check=check)
        self.wake.set()
        return job
