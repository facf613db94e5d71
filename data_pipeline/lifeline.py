"""Nothing outlives a killed stage: its worker processes die with it and its folders go away.

The stage may be killed at any moment (SIGKILL, the OOM killer, a cancelled CI job). Then no
``finally`` block runs, and data-juicer's worker processes (the ``datasets`` fork pool and a
multiprocessing manager, 170-340 MB each) would wait forever for work that never comes, while the
work folder and OUT's hidden siblings stay on disk. Two mechanisms make a kill harmless:

* **workers die with their parent**: while a :class:`Lifeline` is open, every process the stage
  forks asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)`` in an
  ``os.register_at_fork`` hook; Linux only, a no-op elsewhere);
* **a reaper process**, started in its own session, reads a pipe from the stage. Every forked
  descendant inherits the pipe's write end, so end-of-file means the stage *and* all its workers
  are gone; the reaper then removes the work folders it was told about and repairs OUT's hidden
  siblings (:func:`recover`). If the stage is dead but a descendant still holds the pipe, the
  reaper kills that process (found through ``/proc/*/fd``), so even a worker that missed its
  parent-death signal cannot survive.

OUT itself is only ever changed by two renames (``output._swap``): OUT to ``.OUT.old-PID``, then
the finished ``.OUT.partial-PID`` to OUT. :func:`recover` puts ``.old`` back when OUT is missing, so
a kill between the renames leaves the previous dataset, never nothing. A run that finds leftovers
of a dead PID (the reaper was killed too, or the machine went down) recovers them first
(:func:`recover_stale`).

This file is also the reaper's program (``python -I lifeline.py OUT PID``); it imports only the
standard library so that it starts in milliseconds whatever state the environment is in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("partial", "old", "dropped.tmp")  # OUT's hidden siblings: .<OUT name>.<kind>-<pid>
WORK_PREFIX = "sdtune-data-"  # work folders: <temp dir>/sdtune-data-<pid>-<random>
KEPT = "KEPT"  # a work folder holding this file was kept on purpose (--keep-work, data-juicer failed)
PR_SET_PDEATHSIG = 1

_active = 0  # open Lifelines in this process; forked children inherit the value
_fork_parent = 0
_prctl = None
_hooks_installed = False


# ----------------------------------------------------------------------------- OUT's siblings


def sibling(out: Path, kind: str, pid: int) -> Path:
    """The hidden sibling of OUT that the stage with ``pid`` uses for ``kind`` (see ``KINDS``)."""
    return out.with_name(f".{out.name}.{kind}-{pid}")


def remove_path(path: Path) -> None:
    """Delete a folder tree or a file; a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        for _ in range(5):  # a late writer may still add a file while the tree is removed
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                return
            time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        os.unlink(path)


def recover(out: Path, pid: int) -> None:
    """Repair what the stage with ``pid`` left next to OUT: the previous dataset goes back to OUT
    when OUT is missing (a kill between the two renames of a swap); every other sibling is removed."""
    old = sibling(out, "old", pid)
    if os.path.lexists(old) and not os.path.lexists(out):
        with contextlib.suppress(OSError):  # someone else (the next run, the reaper) was quicker
            os.rename(old, out)
    for kind in KINDS:
        remove_path(sibling(out, kind, pid))


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, starttime: str | None = None) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as dead; with ``starttime``, a
    recycled PID does too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    stat = _proc_stat(pid)
    if stat is None:
        return not os.path.isdir("/proc")  # no procfs: trust kill(0)
    return stat[0] not in ("Z", "X") and (starttime is None or stat[19] == starttime)


def _work_pid(path: Path) -> int | None:
    match = re.fullmatch(re.escape(WORK_PREFIX) + r"(\d+)-[0-9a-f]+", path.name)
    return int(match.group(1)) if match else None


def recover_stale(out: Path, temp_dir: str | os.PathLike | None = None) -> None:
    """Before a run: recover the leftovers of every stage that died without its reaper.

    Next to OUT: ``.OUT.<kind>-PID`` of a dead PID (see :func:`recover`). In the temp folder: our
    ``sdtune-data-PID-*`` work folders of a dead PID that were not kept on purpose.
    """
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:" + "|".join(map(re.escape, KINDS)) + r")-(\d+)")
    with contextlib.suppress(OSError):
        pids = {int(m.group(1)) for m in map(pattern.fullmatch, os.listdir(out.parent)) if m}
        for pid in sorted(pids):
            if pid != os.getpid() and not pid_alive(pid):
                recover(out, pid)
    temp_dir = Path(temp_dir or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for work in temp_dir.glob(f"{WORK_PREFIX}*"):
            pid = _work_pid(work)
            if pid is None or pid == os.getpid() or pid_alive(pid) or (work / KEPT).exists():
                continue
            if work.is_dir() and not work.is_symlink() and work.stat().st_uid == os.getuid():
                remove_path(work)


def new_work_dir() -> Path:
    """A fresh name for this run's work folder in the temp folder (not created yet)."""
    return Path(tempfile.gettempdir()) / f"{WORK_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------- workers die with the stage


def _before_fork() -> None:
    global _fork_parent
    _fork_parent = os.getpid()


def _child_dies_with_parent() -> None:
    """In a freshly forked child: ask for SIGKILL when the parent dies (and die now if it already has)."""
    if not _active or _prctl is None:
        return
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != _fork_parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _install_fork_hooks() -> None:
    global _prctl, _hooks_installed
    if _hooks_installed or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_child_dies_with_parent)
    _hooks_installed = True


# ----------------------------------------------------------------------------- the stage's side


class Lifeline:
    """The stage's end of the reaper pipe. Use as a context manager around one run for ``out``.

    :meth:`remove_on_death` names a path the reaper deletes if the stage dies (the stage removes
    it itself otherwise); :meth:`keep` takes it back (kept on purpose). Leaving the ``with`` block
    tells the reaper the stage is done; it then only tidies OUT's siblings of this PID and exits,
    and we wait for it so that the next run in this process cannot race with it.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(os.path.abspath(os.path.expanduser(out)))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Lifeline:
        global _active
        _install_fork_hooks()
        _active += 1
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", __file__, str(self.out), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C and a closed terminal reach the stage, not the reaper
            )
        except OSError:
            self.proc = None  # no reaper: the stage still works, a kill just leaves more behind
        return self

    def _send(self, command: str, path: str | os.PathLike = "") -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write((json.dumps([command, str(path)]) + "\n").encode("utf-8"))
            self.proc.stdin.flush()

    def remove_on_death(self, path: str | os.PathLike) -> None:
        self._send("clean", path)

    def keep(self, path: str | os.PathLike) -> None:
        self._send("keep", path)

    def __exit__(self, *exc) -> None:
        global _active
        _active -= 1
        if self.proc is None:
            return
        self._send("done")
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- the reaper


def _pipe_holders(inode: int) -> list[int]:
    """PIDs (other than ours) that have the pipe with ``inode`` open: the stage's forked family."""
    target, found = f"pipe:[{inode}]", []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                        found.append(int(entry))
                        break
    return found


def reaper(out: Path, pid: int) -> None:
    """Wait for the stage ``pid`` (and every process it forked) to end, then clean up after it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stat = _proc_stat(pid)
    starttime = stat[19] if stat else None
    inode = os.fstat(0).st_ino
    to_remove: list[str] = []
    buffer, dead_since, done = b"", None, False
    while True:
        ready, _, _ = select.select([0], [], [], 0.5)
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:
                break  # end of file: the stage and all its forked workers are gone
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            commands = [json.loads(line) for line in lines if line.strip()]
            for command, path in commands:
                if command == "clean":
                    to_remove.append(path)
                elif command == "keep" and path in to_remove:
                    to_remove.remove(path)
            done = any(command == "done" for command, _ in commands)
            if done:
                break
            continue
        if os.path.isdir("/proc") and not pid_alive(pid, starttime):
            dead_since = dead_since or time.monotonic()
            if time.monotonic() - dead_since > 1.0:  # a worker outlived its parent-death signal
                for holder in _pipe_holders(inode):
                    with contextlib.suppress(OSError):
                        os.kill(holder, signal.SIGKILL)
    recover(out, pid)
    if not done:  # the stage died: nobody else will remove what it registered
        for path in to_remove:
            remove_path(Path(path))


if __name__ == "__main__":
    reaper(Path(sys.argv[1]), int(sys.argv[2]))
