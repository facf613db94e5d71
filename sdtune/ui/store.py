"""The web app's persistent state: the job queue and the dataset folders the user opened, in SQLite.

One file, ``<outputs>/.sdtune-ui/queue.sqlite3``, so queued jobs survive a server restart (and a
crash: every change is one committed transaction). WAL mode lets the pages read while the runner
writes; each thread gets its own connection (sqlite3 connections are not shared across threads).
The schema carries a version (``meta.schema_version``), checked on open, so a later sdtune can
migrate the file instead of misreading it.

Nothing about a run's progress is stored here: step, loss and samples are read from the run
folder itself (:mod:`sdtune.ui.runs`). A job row holds only what the run folder cannot say: the
command, its process, its state in the queue.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
#: A job's states; the first three are "live" (the job still holds or awaits its device).
LIVE_STATES = ("queued", "running", "stopping")
STATES = (*LIVE_STATES, "finished", "stopped", "failed", "interrupted", "cancelled")
KINDS = ("train", "resume", "generate")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    run TEXT,                 -- the run folder, relative to outputs (train/resume; the LoRA's run for generate)
    argv TEXT NOT NULL,       -- JSON list: the arguments after the Python executable (-m sdtune ...)
    out_dir TEXT,             -- the folder the process writes (absolute): its /proc cmdline names it
    device TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',  -- JSON: what the form asked (generate: prompt, seed, weight, compare)
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    exit_code INTEGER,
    pid INTEGER,
    stop_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, device, id);
CREATE TABLE IF NOT EXISTS roots (path TEXT PRIMARY KEY, opened REAL NOT NULL);
"""


class StoreError(RuntimeError):
    """The queue file cannot be used (made by a newer sdtune, or not a queue at all)."""


class Store:
    """The queue file: jobs and opened dataset roots. Safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write = threading.Lock()  # one writer at a time within this process (SQLite serialises processes)
        conn = self.conn
        with self._write, conn:
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer sdtune (queue schema {row[0]}, this one reads "
                                 f"{SCHEMA_VERSION}). Fix: upgrade sdtune, or start with another --outputs folder.")

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (WAL, a 10 s wait on a locked file, rows as mappings)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._write:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(sql, args)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return cur

    # -- jobs ---------------------------------------------------------------------------------------
    def add_job(self, kind: str, argv_of: Callable[[int], tuple[list[str], str | None, str | None]], *,
                device: str, params: dict[str, Any] | None = None,
                check: Callable[[sqlite3.Connection], None] | None = None) -> dict[str, Any]:
        """Queue a job whose arguments, folder and run name depend on its id
        (``argv_of(id) -> (argv, out_dir, run)``), in one transaction: the runner never sees it half made.
        ``check(conn)`` runs first in that transaction and raises to queue nothing (a condition on the
        other jobs that no other request can change between the check and the insert)."""
        if kind not in KINDS:
            raise ValueError(f"job kind {kind!r}: one of {KINDS}")
        with self._write:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if check is not None:
                    check(conn)
                cur = conn.execute("INSERT INTO jobs (kind, state, argv, device, params, created) "
                                   "VALUES (?, 'queued', '[]', ?, ?, ?)",
                                   (kind, device, json.dumps(params or {}), time.time()))
                job_id = cur.lastrowid
                argv, out_dir, run = argv_of(job_id)
                conn.execute("UPDATE jobs SET argv = ?, out_dir = ?, run = ? WHERE id = ?",
                             (json.dumps(argv), out_dir, run, job_id))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return self.job(job_id)

    def job(self, job_id: int) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, *, states: tuple[str, ...] | None = None, run: str | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first; only those in ``states`` / of ``run`` when given."""
        sql, args = "SELECT * FROM jobs", []
        where = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if run is not None:
            where.append("run = ?")
            args.append(run)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_job(r) for r in self.conn.execute(sql + " ORDER BY id DESC", args).fetchall()]

    def next_queued(self, device: str) -> dict[str, Any] | None:
        """The oldest queued job of ``device``."""
        row = self.conn.execute("SELECT * FROM jobs WHERE state = 'queued' AND device = ? ORDER BY id LIMIT 1",
                                (device,)).fetchone()
        return _job(row) if row else None

    def mark_started(self, job_id: int, pid: int) -> None:
        self._exec("UPDATE jobs SET state = 'running', pid = ?, started = ? WHERE id = ?", (pid, time.time(), job_id))

    def mark_stopping(self, job_id: int) -> None:
        self._exec("UPDATE jobs SET state = 'stopping', stop_requested = 1 WHERE id = ?", (job_id,))

    def mark_ended(self, job_id: int, state: str, exit_code: int | None) -> None:
        if state not in STATES[3:]:
            raise ValueError(f"{state!r} is not an end state")
        self._exec("UPDATE jobs SET state = ?, exit_code = ?, ended = ? WHERE id = ?",
                   (state, exit_code, time.time(), job_id))

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job; False when it was no longer queued (the runner took it meanwhile)."""
        cur = self._exec("UPDATE jobs SET state = 'cancelled', ended = ? WHERE id = ? AND state = 'queued'",
                         (time.time(), job_id))
        return cur.rowcount == 1

    # -- dataset roots ------------------------------------------------------------------------------
    def add_root(self, path: str | Path) -> None:
        self._exec("INSERT OR REPLACE INTO roots VALUES (?, ?)", (str(path), time.time()))

    def roots(self) -> list[Path]:
        return [Path(r[0]) for r in self.conn.execute("SELECT path FROM roots ORDER BY opened").fetchall()]

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["argv"] = json.loads(job["argv"])
    job["params"] = json.loads(job["params"] or "{}")
    job["stop_requested"] = bool(job["stop_requested"])
    return job
