"""The queue and its runner, with real processes: a short Python script stands in for training (the
runner runs a job's argv as it runs ``-m sdtune ...``), so the mechanics are tested in a second each."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtune.ui.api import job_json
from sdtune.ui.jobs import Runner, process_holds
from sdtune.ui.runs import run_detail
from sdtune.ui.server import Context
from sdtune.ui.store import SCHEMA_VERSION, Store
from tests.helpers.ui import client, wait_for

# argv: folder, seconds, checkpoint (0/1), the shared log of starts and ends
SCRIPT = """
import json, os, signal, sys, time
folder, seconds, ckpt, log = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
def note(event):
    with open(log, "a") as fh:
        fh.write(json.dumps([os.path.basename(folder), event, time.time(), os.environ.get("CUDA_VISIBLE_DEVICES")]) + "\\n")
def stop(signum, frame):
    note("SIGINT")
    sys.exit(130)
if os.environ.get("HANDLE_SIGINT"):
    signal.signal(signal.SIGINT, stop)
os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
if ckpt:
    open(os.path.join(folder, "checkpoints", "last.ckpt"), "w").close()
note("start")
time.sleep(seconds)
note("end")
"""


def submit(runner: Runner, name: str, seconds: float, *, ckpt: bool = False, device: str | None = None) -> dict:
    folder = runner.outputs / "runs" / name
    log = runner.outputs / "events.jsonl"
    return runner.submit("train", lambda _id: (["-c", SCRIPT, str(folder), str(seconds), "1" if ckpt else "0", str(log)],
                                               str(folder), f"runs/{name}"), device=device)


def events(outputs: Path) -> list[list]:
    path = outputs / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def started(outputs: Path, *names: str) -> bool:
    seen = {e[0] for e in events(outputs) if e[1] == "start"}
    return set(names) <= seen


def test_queued_jobs_survive_a_new_store_and_runner(tmp_path):
    store = Store(tmp_path / "queue.sqlite3")
    first = submit(Runner(store, tmp_path, ["cpu"]), "a", 1)
    second = submit(Runner(store, tmp_path, ["cpu"]), "b", 1)
    store.close()
    again = Store(tmp_path / "queue.sqlite3")
    assert [j["id"] for j in again.jobs(states=("queued",))] == [second["id"], first["id"]]  # newest first
    assert again.next_queued("cpu")["id"] == first["id"] and again.job(first["id"])["argv"][0] == "-c"
    assert again.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.slow  # real processes
def test_one_job_at_a_time_per_device_oldest_queued_first(tmp_path):
    runner = Runner(Store(tmp_path / "queue.sqlite3"), tmp_path, ["cpu", "1"], interval=0.05)
    for name, device in (("a", "cpu"), ("b", "cpu"), ("g", "1"), ("c", "cpu")):
        submit(runner, name, 0.4, device=device)
    runner.start()
    try:
        wait_for(lambda: all(j["state"] == "finished" for j in runner.store.jobs()), timeout=60, what="all finished")
    finally:
        runner.shutdown()
    log = events(tmp_path)
    cpu = [(name, event) for name, event, _t, _d in log if name != "g"]
    assert cpu == [("a", "start"), ("a", "end"), ("b", "start"), ("b", "end"), ("c", "start"), ("c", "end")]
    at = {(name, event): t for name, event, t, _d in log}
    assert at[("g", "start")] < at[("a", "end")]  # the other device's queue ran beside it
    assert {d for name, _e, _t, d in log if name == "g"} == {"1"} and {d for n, _e, _t, d in log if n != "g"} == {""}
    assert all(j["exit_code"] == 0 and j["started"] and j["ended"] for j in runner.store.jobs())
    assert all((tmp_path / ".sdtune-ui" / "jobs" / f"{j['id']}.log").is_file() for j in runner.store.jobs())


@pytest.mark.slow  # real processes
def test_a_killed_process_is_interrupted_and_a_live_one_is_reattached_then_stopped(tmp_path):
    first = Runner(Store(tmp_path / "queue.sqlite3"), tmp_path, ["cpu", "0", "1"])
    killed, bare, live = (submit(first, n, 60, ckpt=c, device=d) for n, c, d in
                          (("killed", True, "cpu"), ("bare", False, "0"), ("live", True, "1")))
    try:
        first.tick()
        wait_for(lambda: started(tmp_path, "killed", "bare", "live"), what="three jobs started")
        for job in (killed, bare):  # the server is gone when they die: nobody sees their exit codes
            first.procs[job["id"]].send_signal(signal.SIGKILL)
            first.procs[job["id"]].wait()
        second = Runner(Store(tmp_path / "queue.sqlite3"), tmp_path, ["cpu", "0", "1"])  # a restarted server
        second.tick()
        state = {j["id"]: j["state"] for j in second.store.jobs()}
        assert (state[killed["id"]], state[bare["id"]], state[live["id"]]) == ("interrupted", "failed", "running")
        pid = second.store.job(live["id"])["pid"]
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3] == str(tmp_path / "runs" / "live").encode()
        assert second.stop(live["id"])["state"] == "stopping"
        first.procs[live["id"]].wait(timeout=30)  # this test process is its parent: reap it
        second.tick()
        assert second.store.job(live["id"])["state"] == "stopped"
    finally:
        for proc in first.procs.values():  # nothing left behind, whatever failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow  # real processes
def test_stop_sends_sigint_and_gives_stopped_and_the_command_shown_is_the_one_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDLE_SIGINT", "1")
    runner = Runner(Store(tmp_path / "queue.sqlite3"), tmp_path, ["cpu"], interval=0.05)
    running, queued = submit(runner, "run", 60, ckpt=True), submit(runner, "next", 60)
    runner.start()
    try:
        wait_for(lambda: started(tmp_path, "run"), what="the job started")
        ctx = Context(tmp_path, runner.store, runner, ["cpu"])
        shown = job_json(ctx, runner.store.job(running["id"]))
        cmdline = Path(f"/proc/{runner.store.job(running['id'])['pid']}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert cmdline == [sys.executable, *shlex.split(shown["command"])[1:]]
        assert runner.stop(queued["id"])["state"] == "cancelled"
        assert runner.stop(running["id"])["state"] == "stopping"
        wait_for(lambda: runner.store.job(running["id"])["state"] == "stopped", what="stopped")
    finally:
        runner.shutdown()
    job = runner.store.job(running["id"])
    assert job["exit_code"] == 130 and [e[1] for e in events(tmp_path)] == ["start", "SIGINT"]
    ctx = Context(tmp_path, runner.store, runner, ["cpu"])
    assert job_json(ctx, job)["resumable"] is True
    runner.store.add_job("resume", lambda _id: (["-c", "pass"], job["out_dir"], job["run"]), device="cpu")
    assert job_json(ctx, job)["resumable"] is False  # resumed: only the run's latest job offers Resume
    assert runner.store.job(queued["id"])["started"] is None and not (tmp_path / "runs" / "next").exists()
    assert os.path.getsize(runner.log_path(running["id"])) == 0  # the script prints nothing; the log exists


LISTENER = """
import os, signal, sys, time
out = sys.argv[1]
signal.signal(signal.SIGINT, lambda *_: open(out, "a").write("SIGINT\\n"))
open(out, "a").write("ready\\n")
time.sleep(30)
"""


def test_a_second_stop_sends_no_second_sigint_and_a_reused_pid_is_never_signalled(tmp_path):
    runner = Runner(Store(tmp_path / "queue.sqlite3"), tmp_path, ["cpu"])
    out = tmp_path / "signals.txt"
    job = runner.submit("train", lambda _id: (["-c", LISTENER, str(out)], str(out), "runs/a"), device=None)
    stranger = subprocess.Popen([sys.executable, "-c", LISTENER, str(tmp_path / "stranger.txt")])
    try:
        runner.tick()
        wait_for(lambda: out.is_file() and stranger_ready(tmp_path), 10, 0.01, "both processes ready")
        assert runner.stop(job["id"])["state"] == "stopping"
        wait_for(lambda: out.read_text() == "ready\nSIGINT\n", 5, 0.01, "the first SIGINT")
        assert runner.stop(job["id"])["state"] == "stopping"  # a second click
        other = runner.store.add_job("train", lambda _id: (["-c", "x", str(tmp_path / "b")], str(tmp_path / "b"),
                                                           "runs/b"), device="cpu")
        runner.store.mark_started(other["id"], stranger.pid)  # its pid now belongs to another process
        assert runner.stop(other["id"])["state"] == "stopping"
        time.sleep(0.1)
        assert out.read_text() == "ready\nSIGINT\n" and (tmp_path / "stranger.txt").read_text() == "ready\n"
        assert process_holds(stranger.pid, str(tmp_path / "stranger.txt"))
        assert not process_holds(stranger.pid, str(tmp_path / "stranger.tx"))  # the whole argument only
    finally:
        stranger.kill()
        stranger.wait()
        for proc in runner.procs.values():
            proc.kill()
            proc.wait()


def stranger_ready(folder: Path) -> bool:
    return (folder / "stranger.txt").is_file()


def test_resume_only_the_latest_stopped_or_interrupted_job_once(tmp_path):
    web = client(tmp_path)
    store = web.app.state.ctx.store
    folder = tmp_path / "runs" / "r"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    first = store.add_job("train", lambda _id: (["-m", "sdtune"], str(folder), "runs/r"), device="auto")
    store.mark_ended(first["id"], "finished", 0)
    finished = web.post(f"/api/jobs/{first['id']}/resume", json={})
    assert finished.status_code == 400 and "only the latest job of a run" in finished.json()["error"]
    second = store.add_job("train", lambda _id: (["-m", "sdtune"], str(folder), "runs/r"), device="auto")
    store.mark_ended(second["id"], "stopped", 130)
    assert web.post(f"/api/jobs/{first['id']}/resume", json={}).status_code == 400  # not the run's latest
    resumed = web.post(f"/api/jobs/{second['id']}/resume", json={})
    assert resumed.status_code == 201 and resumed.json()["job"]["kind"] == "resume"
    again = web.post(f"/api/jobs/{second['id']}/resume", json={})
    assert again.status_code == 400 and f"the latest is job {resumed.json()['job']['id']}, queued" in again.json()["error"]
    assert len(store.jobs(states=("queued",))) == 1
    spaced = tmp_path / "my runs" / "r 1"
    (spaced / "checkpoints").mkdir(parents=True)
    line = run_detail(tmp_path, "my runs/r 1", {"state": "stopped", "resumable": True}, None, "cmd")["resume_command"]
    assert shlex.split(line) == ["python", "-m", "sdtune", f"ckpt_path='{spaced}'"]
