"""Issue 10 for ``make data``: nothing lost, nothing silently wrong.

Each test drives the real stage (real data-juicer, no mocks), mostly through the CLI entry
``data_pipeline.__main__.main`` in this process, and checks three things: our exact message, the
exit code, and that no user file changed (sha256 snapshots of RAW and of a pre-existing OUT).

* a run that keeps nothing leaves OUT exactly as it was and writes ``<OUT>.dropped.csv`` beside it;
* a SIGKILL at any moment leaves no worker process, no work/partial/old folder, and OUT absent,
  the previous dataset, or the complete new one (the slow test kills a real run many times;
  ``SDTUNE_KILL_ROUNDS`` sets how many);
* a data-juicer record whose ``images`` (or ``text``) has the wrong JSON type is a dropped
  ``bad record``, not a crash;
* a recipe with min > max for any filter bound is refused before any work;
* ``make data`` quotes RAW, OUT and RECIPE for the shell;
* a jsonl listing that starts with a UTF-8 BOM is read normally.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_pipeline.__main__ import main as cli_main
from data_pipeline.errors import RUN_EXIT, USAGE_EXIT
from data_pipeline.lifeline import KEPT, WORK_PREFIX, sibling
from data_pipeline.output import MARKER, MARKER_TEXT
from data_pipeline.recipe import RECIPES, check_min_max, load_recipe
from tests.helpers.files import SMALL_OK, listing, read_csv, recipe
from tests.helpers.images import add, textured
from tests.helpers.paths import ROOT

# ----------------------------------------------------------------------------- helpers


def snapshot(path: Path, mtime: bool = True) -> list[tuple] | None:
    """sha256 (and mtime) of every file below ``path``, hidden ones included; None when absent."""
    return listing(path, with_mtime=mtime) if os.path.lexists(path) else None


def previous_dataset(out: Path) -> list[tuple]:
    """A small dataset as an earlier run leaves it (MARKER included); returns its snapshot."""
    add(out, "images/old.png", textured(99, 40, 40), None)
    (out / "metadata.csv").write_text("file_name,text\nimages/old.png,an earlier run\n", encoding="utf-8")
    (out / "dropped.csv").write_text("file,reason\n", encoding="utf-8")
    (out / "report.json").write_text('{"counts": {"kept": 1}}\n', encoding="utf-8")
    (out / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    return snapshot(out)


def leftovers(out: Path) -> list[str]:
    """Hidden siblings of OUT and this process's work folders in the temp dir (should be none)."""
    found = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    found += [p.name for p in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}{os.getpid()}-*")]
    return sorted(found)


def stage(raw: Path, out: Path, capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI entry in this process: (exit code, stdout, stderr)."""
    code = cli_main([str(raw), str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err: str, pattern: str) -> None:
    """Exactly one ``error:`` line, matching ``pattern``, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert re.fullmatch(pattern, errors[0]), (pattern, errors[0])
    assert "Traceback" not in err


def dead_pid() -> int:
    """The PID of a process that has just exited (and is reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- 1. nothing kept


ALL_TOO_SMALL = "process:\n  - image_shape_filter:\n      min_width: 5000\n"


@pytest.mark.parametrize("cause", ["pre-check", "recipe"])
@pytest.mark.parametrize("out_state", ["absent", "previous dataset"])
def test_nothing_kept_leaves_out_as_it_was(tmp_path, capsys, cause, out_state):
    """Zero survivors must not replace a good OUT (nor create an empty one); the reasons go beside OUT."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    if cause == "pre-check":
        add(raw, "a.png", b"", "an empty file")
        add(raw, "b.png", b"this is not a PNG", "a caption")
        rules = recipe(tmp_path, "ok.yaml", SMALL_OK)
        expected = [
            {"file": "a.png", "reason": "pre-check: zero-byte file"},
            {"file": "b.png", "reason": "pre-check: not an image (Pillow cannot identify the file format)"},
        ]
        counts = "1 by pre-check: not an image, 1 by pre-check: zero-byte file"
    else:
        add(raw, "a.png", textured(1, 64, 64), "a caption")
        add(raw, "b.png", textured(2, 80, 64), "another caption")
        rules = recipe(tmp_path, "huge.yaml", ALL_TOO_SMALL)
        expected = [
            {"file": "a.png", "reason": "image_shape_filter: 64x64 is below min 5000x1"},
            {"file": "b.png", "reason": "image_shape_filter: 80x64 is below min 5000x1"},
        ]
        counts = "2 by image_shape_filter"
    out_before = previous_dataset(out) if out_state == "previous dataset" else None
    raw_before = snapshot(raw)

    code, printed, err = stage(raw, out, capsys, "--recipe", str(rules), "--np", "1")

    assert code == RUN_EXIT
    state = "was left as it was" if out_before else "was not created"
    assert_one_error(
        err,
        re.escape(
            f"error: no image survived the cleaning: all 2 from {raw} were dropped ({counts}). OUT {out} {state}; "
            f"why each file was dropped: {out}.dropped.csv. Fix: loosen the recipe {rules} or fix the inputs."
        ),
    )
    assert "total" in printed  # the summary table is still shown
    assert snapshot(out) == out_before  # absent stays absent; the previous dataset is byte-identical
    assert snapshot(raw) == raw_before
    assert read_csv(tmp_path / "out.dropped.csv") == expected
    assert leftovers(out) == []


def test_nothing_kept_never_overwrites_a_foreign_dropped_csv(tmp_path, capsys):
    """``<OUT>.dropped.csv`` is replaced only when we wrote it; someone else's file is left alone."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    add(raw, "a.png", b"", "an empty file")
    foreign = tmp_path / "out.dropped.csv"
    foreign.write_text("my own notes\n", encoding="utf-8")
    before = snapshot(tmp_path)

    code, _, err = stage(raw, out, capsys, "--recipe", str(recipe(tmp_path, "ok.yaml", SMALL_OK)))

    assert code == RUN_EXIT
    assert_one_error(
        err,
        re.escape(
            f"error: no image survived the cleaning, and the list of reasons cannot be written: {foreign} exists "
            "and was not written by this stage. Fix: move that file away and run again."
        ),
    )
    after = snapshot(tmp_path)
    assert [row for row in after if row[0] != "ok.yaml"] == [row for row in before if row[0] != "ok.yaml"]
    assert not out.exists() and leftovers(out) == []


# ----------------------------------------------------------------------------- 2. SIGKILL: lifeline and reaper

LIFELINE_SCRIPT = r"""
import ctypes, os, shutil, signal, sys, time
from pathlib import Path
from data_pipeline.lifeline import Lifeline, sibling

out, phase, temp = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
pid = os.getpid()
with Lifeline(out) as life:
    work = temp / f"sdtune-data-{pid}-0a1b2c3d"
    life.remove_on_death(work)
    (work / "tmp").mkdir(parents=True)
    children = []
    child = os.fork()
    if child == 0:  # a worker that forks a worker of its own, like a pool process would
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(120)
            os._exit(0)
        os.write(1, f"{grandchild}\n".encode())  # one write: parent and child print at once
        time.sleep(120)
        os._exit(0)
    children.append(child)
    if phase == "escaped worker":  # a worker that cleared its parent-death signal: the reaper must kill it
        escaped = os.fork()
        if escaped == 0:
            ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)
            time.sleep(120)
            os._exit(0)
        children.append(escaped)
    partial, old = sibling(out, "partial", pid), sibling(out, "old", pid)
    shutil.copytree(out, partial)
    (partial / "metadata.csv").write_text("file_name,text\nimages/old.png,the new run\n")
    if phase in ("between renames", "removing old"):
        os.rename(out, old)
    if phase == "removing old":
        os.rename(partial, out)
        shutil.rmtree(old / "images")
    for c in children:
        os.write(1, f"{c}\n".encode())
    time.sleep(0.3)  # let the grandchild's pid reach stdout
    os.kill(pid, signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux-only")
@pytest.mark.parametrize(
    "phase, expect_out",
    [
        ("working", "previous"),
        ("escaped worker", "previous"),
        ("between renames", "previous"),
        ("removing old", "new"),
    ],
)
def test_killed_stage_leaves_no_worker_folder_or_broken_out(tmp_path, phase, expect_out):
    """Deterministic kills at each risky moment of a run: workers die, folders go, OUT stays whole.

    ``between renames`` is the instant inside ``output._swap`` when OUT has been moved to
    ``.OUT.old-PID`` and the new dataset is not yet in place: the reaper must put the old one back.
    """
    out, temp = tmp_path / "out", tmp_path / "tmp"
    temp.mkdir()
    previous = previous_dataset(out)
    proc = subprocess.run(
        [sys.executable, "-c", LIFELINE_SCRIPT, str(out), phase, str(temp)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    workers = [int(line) for line in proc.stdout.split()]
    assert len(workers) == (3 if phase == "escaped worker" else 2)

    assert _wait_until(lambda: not any(map(_alive, workers)) and not leftovers(out) and not any(temp.iterdir()))
    assert not any(map(_alive, workers))
    assert leftovers(out) == [] and list(temp.iterdir()) == []
    if expect_out == "previous":
        assert snapshot(out) == previous
    else:
        assert read_csv(out / "metadata.csv") == [{"file_name": "images/old.png", "text": "the new run"}]
        assert (out / MARKER).read_text(encoding="utf-8") == MARKER_TEXT


def test_next_run_recovers_leftovers_of_a_dead_run(tmp_path, capsys):
    """If the reaper died too, the next run repairs what a dead PID left: the previous OUT comes
    back, its partial/temporary siblings and unkept work folder go, a kept work folder stays."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    add(raw, "a.png", textured(1, 64, 64), "a caption")
    pid = dead_pid()
    old = sibling(out, "old", pid)
    previous = previous_dataset(old)
    add(sibling(out, "partial", pid), "images/half.png", b"half", None)
    sibling(out, "dropped.tmp", pid).write_text("file,reason\n", encoding="utf-8")
    stale = Path(tempfile.gettempdir()) / f"{WORK_PREFIX}{pid}-0dead0"
    kept = Path(tempfile.gettempdir()) / f"{WORK_PREFIX}{pid}-0cafe0"
    add(stale, "input.jsonl", b"{}", None)
    add(kept, KEPT, b"kept on purpose", None)
    raw_before = snapshot(raw)
    bad = recipe(
        tmp_path, "bad.yaml", "process:\n  - image_aspect_ratio_filter:\n      min_ratio: 2.0\n      max_ratio: 0.5\n"
    )
    try:
        code, _, err = stage(raw, out, capsys, "--recipe", str(bad))
        assert code == USAGE_EXIT
        assert_one_error(err, re.escape(f"error: recipe {bad}: image_aspect_ratio_filter") + ".*")
        assert snapshot(out) == previous  # restored from .out.old-PID, byte for byte
        assert leftovers(out) == [] and not stale.exists()
        assert (kept / KEPT).is_file()
        assert snapshot(raw) == raw_before
    finally:
        shutil.rmtree(kept, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def _related_processes(pid: int, needles: tuple[str, ...]) -> list[str]:
    """Live processes whose parent is ``pid`` or whose command line mentions one of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] in ("Z", "X"):
            continue
        if int(fields[1]) == pid or any(n in cmdline for n in needles):
            found.append(f"{entry}: {cmdline[:160]}")
    return found


def _phase(stderr_text: str) -> str:
    """The last phase the stage reported on stderr before it was killed."""
    markers = [("write", "copy:"), ("data-juicer", "Generating jsonl"), ("pre-check", "pre-check:")]
    for name, marker in markers:
        if marker in stderr_text:
            return name
    return "start-up"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux-only")
def test_sigkill_at_random_moments(tmp_path, request):
    """SIGKILL a real ``python -m data_pipeline --np 2`` run at seeded random moments, N times.

    After every kill (bounded wait): no process whose parent was the stage or whose command line
    names RAW/OUT survives, no work/partial/old folder remains (the stage's TMPDIR is private and
    must be empty), and OUT is absent (only if it was), the previous dataset byte for byte, or the
    complete new one. Two recipes alternate so that "previous" and "new" differ. ``pre-check`` runs
    its own worker pool here (64 images, the pool threshold).
    """
    rounds = int(os.environ.get("SDTUNE_KILL_ROUNDS", "6"))
    rng = random.Random(1010)
    raw, base = tmp_path / "raw", tmp_path / "out dir"
    # data-juicer's pool manager binds a Unix socket under TMPDIR, whose path may not pass 107 bytes: a short
    # folder of its own, not one under tmp_path (which pytest-xdist makes longer still)
    temp = Path(tempfile.mkdtemp(prefix="sdk-"))
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    for i in range(64):
        add(raw, f"img{i:02d}.png", textured(i, 40 + i % 24, 40), f"picture number {i}")
    recipes = [
        recipe(tmp_path, f"min{w}.yaml", f"process:\n  - image_shape_filter:\n      min_width: {w}\n") for w in (40, 52)
    ]
    base.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    raw_before = snapshot(raw)

    def start(rules: Path, out: Path, err) -> subprocess.Popen:
        args = [sys.executable, "-m", "data_pipeline", str(raw), str(out), "--recipe", str(rules), "--np", "2"]
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)

    expected, durations = [], []  # the complete dataset each recipe makes (the stage is deterministic)
    for n, rules in enumerate(recipes):
        clock = time.monotonic()
        with open(tmp_path / f"full-{n}.err", "wb") as err:
            assert start(rules, base / f"full-{n}", err).wait(timeout=300) == 0
        durations.append(time.monotonic() - clock)
        expected.append(snapshot(base / f"full-{n}", mtime=False))
        assert expected[-1] is not None and (base / f"full-{n}" / MARKER).is_file()
    assert expected[0] != expected[1]
    assert len(read_csv(base / "full-0" / "metadata.csv")) == 64 > len(read_csv(base / "full-1" / "metadata.csv"))

    out = base / "clean"
    shutil.copytree(base / "full-1", out)  # start from a previous good dataset
    outcomes: dict[str, int] = {}
    phases: dict[str, int] = {}
    clock = time.monotonic()
    for i in range(rounds):
        if os.path.lexists(out) and rng.random() < 0.2:  # sometimes start from no OUT at all
            shutil.rmtree(out)
        which = i % 2
        before = snapshot(out, mtime=False)
        delay = rng.uniform(0.0, max(durations) * 1.1)
        log = tmp_path / f"round-{i}.err"
        with open(log, "wb") as err:
            proc = start(recipes[which], out, err)
            try:
                assert proc.wait(timeout=delay) == 0, log.read_text(errors="replace")[-2000:]
                phase = "finished before the kill"
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                phase = _phase(log.read_text(errors="replace"))
        phases[phase] = phases.get(phase, 0) + 1

        needles = (str(raw), str(out))

        def settled(pid=proc.pid, needles=needles) -> bool:
            return not _related_processes(pid, needles) and not leftovers(out) and not any(temp.iterdir())

        _wait_until(settled, 15.0)
        assert _related_processes(proc.pid, needles) == [], f"round {i} ({phase}, {delay:.2f}s)"
        assert leftovers(out) == [] and list(temp.iterdir()) == [], f"round {i} ({phase}, {delay:.2f}s)"
        assert [p.name for p in base.iterdir() if p.name.startswith(".")] == []
        after = snapshot(out, mtime=False)
        where = f"round {i} ({phase}, killed after {delay:.2f}s)"
        if phase == "finished before the kill":
            assert after == expected[which], where
        assert after in (before, expected[which]), f"{where}: OUT is neither the previous nor the new dataset"
        if after == expected[which] and after != before:
            assert (out / MARKER).is_file()
            assert len(read_csv(out / "metadata.csv")) == len(read_csv(base / f"full-{which}" / "metadata.csv"))
            outcome = "complete new dataset"
        elif after is None:
            outcome = "absent, as before"
        else:
            outcome = "previous dataset" if after != expected[which] else "previous = new (same recipe)"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert snapshot(raw) == raw_before
    print(
        f"\nkill rounds: {rounds} in {time.monotonic() - clock:.0f}s (full run {max(durations):.1f}s); "
        f"phases: {json.dumps(phases)}; outcomes: {json.dumps(outcomes)}"
    )


# ----------------------------------------------------------------------------- 3. wrong JSON types in records

DJ_RECORDS = [  # (record, reason in dropped.csv; None: kept)
    ({"text": "a good record", "images": ["a.png"]}, None),
    ({"text": "x", "images": 5}, "'images' is a number (5); expected a path or a list with one path"),
    ({"text": "x", "images": 2.5}, "'images' is a number (2.5); expected a path or a list with one path"),
    ({"text": "x", "images": True}, "'images' is a boolean (true); expected a path or a list with one path"),
    (
        {"text": "x", "images": {"a.png": 1}},
        "'images' is an object ({\"a.png\": 1}); expected a path or a list with one path",
    ),
    ({"text": "x", "images": None}, "'images' is null; expected a path or a list with one path"),
    ({"text": "x", "image": 7}, "'image' is a number (7); expected a path or a list with one path"),
    ({"text": "x"}, "no 'images' field; expected a path or a list with one path"),
    ({"text": "x", "images": [5]}, "'images' holds a number (5); expected a path string"),
    ({"text": "x", "images": [None]}, "'images' holds null; expected a path string"),
    ({"text": "x", "images": [["a.png"]]}, "'images' holds a list ([\"a.png\"]); expected a path string"),
    ({"text": "x", "images": ["  "]}, "'images' holds an empty path"),
    ({"text": "x", "images": []}, "0 images listed; sdtune trains on exactly one image per caption"),
    ({"text": 5, "images": ["b.png"]}, "'text' is a number (5); expected a string"),
    ({"text": {"en": "a cat"}, "images": ["b.png"]}, '\'text\' is an object ({"en": "a cat"}); expected a string'),
]
META_RECORDS = [
    ({"file_name": "a.png", "text": "a good row"}, None),
    ({"file_name": 5, "text": "x"}, "'file_name' is a number (5); expected a string"),
    ({"file_name": ["b.png"], "text": "x"}, "'file_name' is a list ([\"b.png\"]); expected a string"),
    ({"file_name": "b.png", "text": ["a", 5]},  # a list of captions is fine; a list holding a number is not
     '\'text\' is a list (["a", 5]); expected a caption or a list of non-empty captions'),
]
LAYOUTS = {"dataset.jsonl": DJ_RECORDS, "metadata.jsonl": META_RECORDS}


@pytest.fixture(scope="module")
def typed_runs(tmp_path_factory) -> dict:
    """One CLI run per jsonl layout over records with every wrong JSON type (RAW, OUT snapshots kept)."""
    runs = {}
    for name, records in LAYOUTS.items():
        tmp = tmp_path_factory.mktemp(name.replace(".", "-"))
        raw, out = tmp / "raw", tmp / "out"
        add(raw, "a.png", textured(1, 64, 64), None)
        add(raw, "b.png", textured(2, 64, 64), None)
        (raw / name).write_text("".join(json.dumps(r) + "\n" for r, _ in records), encoding="utf-8")
        rules = recipe(tmp, "ok.yaml", SMALL_OK)
        raw_before, out_before = snapshot(raw), previous_dataset(out)
        err, printed = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(printed):
            code = cli_main([str(raw), str(out), "--recipe", str(rules), "--np", "1"])
        runs[name] = {
            "code": code,
            "stdout": printed.getvalue(),
            "stderr": err.getvalue(),
            "raw": (raw_before, snapshot(raw)),
            "out": out,
            "out_before": out_before,
            "dropped": {r["file"]: r["reason"] for r in read_csv(out / "dropped.csv")},
            "kept": read_csv(out / "metadata.csv"),
        }
    return runs


@pytest.mark.parametrize(
    "layout, line, reason",
    [(name, n, reason) for name, records in LAYOUTS.items() for n, (_, reason) in enumerate(records, 1) if reason],
)
def test_wrong_json_type_is_a_dropped_record_not_a_crash(typed_runs, layout, line, reason):
    """``"images": 5`` and friends used to abort the whole stage with a TypeError traceback."""
    run = typed_runs[layout]
    assert run["code"] == 0, run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"] and "error:" not in run["stderr"]
    assert f"OUT: {run['out']}  (metadata.csv, dropped.csv, report.json)" in run["stdout"]
    assert run["dropped"][f"{layout} line {line}"] == f"pre-check: bad record ({reason})"
    assert run["raw"][0] == run["raw"][1]  # RAW untouched
    assert run["out_before"] != snapshot(run["out"])  # the earlier run's OUT was (rightly) replaced


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_wrong_json_types_do_not_cost_the_good_records(typed_runs, layout):
    """Every record is accounted for: the good one is kept, each bad one is dropped once."""
    run = typed_runs[layout]
    good = [r for r, reason in LAYOUTS[layout] if reason is None][0]
    assert run["kept"] == [{"file_name": "images/a.png", "text": good["text"]}]
    assert len(run["dropped"]) == len(LAYOUTS[layout]) - 1


# ----------------------------------------------------------------------------- 4. min > max in a recipe


@pytest.mark.parametrize(
    "op, params, message",
    [
        (
            "image_aspect_ratio_filter",
            {"min_ratio": 2.0, "max_ratio": 0.5},
            "has min_ratio 2.0 above max_ratio 0.5, so it would drop every image. "
            "Fix: swap them (min_ratio: 0.5, max_ratio: 2.0).",
        ),
        (
            "image_aspect_ratio_filter",
            {"max_ratio": 0.2},
            "has min_ratio 0.333 (its default) above max_ratio 0.2, so it would drop every image. "
            "Fix: set min_ratio and max_ratio so that min_ratio is at most max_ratio.",
        ),
        (
            "image_shape_filter",
            {"min_width": 2048, "max_width": 1024},
            "has min_width 2048 above max_width 1024, so it would drop every image. "
            "Fix: swap them (min_width: 1024, max_width: 2048).",
        ),
        (
            "image_shape_filter",
            {"min_width": 10, "min_height": 900, "max_height": 600},
            "has min_height 900 above max_height 600, so it would drop every image. "
            "Fix: swap them (min_height: 600, max_height: 900).",
        ),
        (
            "image_size_filter",
            {"min_size": "64MB", "max_size": "8KB"},
            "has min_size 64MB above max_size 8KB, so it would drop every image. "
            "Fix: swap them (min_size: 8KB, max_size: 64MB).",
        ),
        (
            "text_length_filter",
            {"min_len": 200, "max_len": 20},
            "has min_len 200 above max_len 20, so it would drop every image. "
            "Fix: swap them (min_len: 20, max_len: 200).",
        ),
    ],
)
def test_min_above_max_is_refused_up_front(tmp_path, capsys, op, params, message):
    """A filter whose lower bound is above its upper bound drops everything, silently: refuse it."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    add(raw, "a.png", textured(1, 64, 64), "a caption that is long enough")
    body = "".join(f"      {k}: {v}\n" for k, v in params.items())
    rules = recipe(tmp_path, "bounds.yaml", f"process:\n  - image_shape_filter:\n      min_width: 1\n  - {op}:\n{body}")
    raw_before, out_before = snapshot(raw), previous_dataset(out)

    code, _, err = stage(raw, out, capsys, "--recipe", str(rules))

    assert code == USAGE_EXIT
    assert_one_error(err, re.escape(f"error: recipe {rules}: {op} (process entry 2) {message}"))
    assert snapshot(raw) == raw_before and snapshot(out) == out_before
    assert leftovers(out) == []


def test_shipped_recipes_have_sane_bounds():
    """The recipes we ship pass the same check (min equal to max would be allowed too)."""
    for path in sorted(RECIPES.glob("*.yaml")):
        check_min_max(load_recipe(path), path)


# ----------------------------------------------------------------------------- 5. make data quoting


@pytest.mark.parametrize("raw_name, out_name", [("a b", "c d"), ("it's here", 'say "hi"; $ `x`')])
def test_make_data_quotes_paths_for_the_shell(tmp_path, raw_name, out_name):
    """``make data RAW="path with space"`` must reach the stage as one argument each, unchanged.

    ``make -n`` prints the command without running anything; the printed line is then run by
    ``sh`` with an argv printer in place of the stage, exactly as make would run it.
    """
    raw, out, rules = tmp_path / raw_name, tmp_path / out_name, tmp_path / "my recipe.yaml"
    printer = tmp_path / "argv.py"
    printer.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n", encoding="utf-8")
    before = snapshot(tmp_path)
    make = subprocess.run(
        ["make", "-n", "--no-print-directory", "data", f"RAW={raw}", f"OUT={out.as_posix().replace('$', '$$')}",
         f"RECIPE={rules}", f"PY={sys.executable} {printer}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert make.returncode == 0, make.stderr
    line = next(line for line in make.stdout.splitlines() if "-m data_pipeline" in line)
    assert "'" + str(raw).replace("'", "'\\''") + "'" in line  # single-quoted, ' written as '\''
    shell = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    argv = json.loads(shell.stdout)
    assert argv == ["-m", "data_pipeline", str(raw), str(out), "--model", "sd15", "--recipe", str(rules), "--np", "2"]
    assert snapshot(tmp_path) == before  # a dry run: nothing created


def test_make_data_without_raw_prints_usage():
    """The usage check still works with the quoting (exit 2, the usage line)."""
    make = subprocess.run(["make", "--no-print-directory", "data", "RAW=", "STAMP="], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert make.returncode == 2
    assert "usage: make data RAW=<raw image folder>" in make.stdout


# ----------------------------------------------------------------------------- 6. UTF-8 BOM


@pytest.mark.parametrize("layout", ["dataset.jsonl", "metadata.jsonl"])
def test_jsonl_with_utf8_bom_is_read(tmp_path, capsys, layout):
    """Windows editors save jsonl with a BOM: the first record must still be read, caption intact."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    add(raw, "a.png", textured(1, 64, 64), None)
    add(raw, "b.png", textured(2, 64, 64), None)
    key = "images" if layout == "dataset.jsonl" else "file_name"
    rows = [{key: "a.png", "text": "一只猫 on the first line"}, {key: "b.png", "text": "second"}]
    (raw / layout).write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    )
    raw_before = snapshot(raw)

    code, printed, err = stage(raw, out, capsys, "--recipe", str(recipe(tmp_path, "ok.yaml", SMALL_OK)), "--np", "1")

    assert code == 0, err[-3000:]
    assert "error:" not in err and "Traceback" not in err
    assert f"OUT: {out}  (metadata.csv, dropped.csv, report.json)" in printed
    assert read_csv(out / "metadata.csv") == [
        {"file_name": "images/a.png", "text": "一只猫 on the first line"},
        {"file_name": "images/b.png", "text": "second"},
    ]
    assert read_csv(out / "dropped.csv") == []
    assert snapshot(raw) == raw_before
    assert leftovers(out) == []
