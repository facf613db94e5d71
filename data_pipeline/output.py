"""Build the clean dataset folder OUT, and decide whether an existing OUT may be replaced.

OUT is assembled in a hidden sibling folder and renamed into place only when complete, so a
crash never leaves a half-written dataset; a kill between the two renames of the swap is repaired
by :func:`.lifeline.recover` (the previous dataset goes back), so OUT is never lost. An existing OUT is replaced only when it carries
``MARKER`` (written by an earlier run) or is empty: we never delete a folder we did not make.
Everything written is a pure function of the inputs (sorted rows, no timestamps; copies keep the
source's mtime), so two runs on the same RAW give byte-identical files.

Layout: ``images/<path relative to RAW>``, ``metadata.csv`` (``file_name,text``, what
``sdtune.data.load_records`` reads; ``metadata.jsonl`` when an image has several captions), ``dropped.csv`` (``file,reason``), ``report.json``, ``MARKER``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_pipeline.candidates import Drop
from data_pipeline.errors import RUN_EXIT, PipelineError
from data_pipeline.lifeline import sibling

MARKER = ".sdtune_dataset.json"
MARKER_TEXT = json.dumps({"created_by": "sdtune data_pipeline", "format": 1}, indent=2) + "\n"


@dataclass(frozen=True)
class KeptFile:
    """A file to place at ``OUT/images/<dest>`` with its caption."""

    dest: str
    source: Path
    caption: str
    alternatives: tuple[str, ...] = ()  # several captions (a jsonl list): training picks one per epoch


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out(out: Path, raw: Path) -> None:
    """Refuse, before any work, an OUT that overlaps RAW or holds someone else's files."""
    real_out, real_raw = Path(os.path.realpath(out)), Path(os.path.realpath(raw))
    if _inside(real_out, real_raw) or _inside(real_raw, real_out):
        raise PipelineError(f"OUT {out} and RAW {raw} overlap; RAW is never written to. Choose an OUT outside RAW.")
    if out.is_symlink():
        raise PipelineError(f"OUT {out} is a symbolic link; give the real folder path instead.")
    if not out.exists():
        return
    if not out.is_dir():
        raise PipelineError(f"OUT {out} exists and is a file; refusing to replace it. Choose another OUT.")
    if not (out / MARKER).is_file() and any(out.iterdir()):
        raise PipelineError(
            f"OUT {out} exists, is not empty and was not made by this stage (no {MARKER} in it); refusing to "
            "replace it. Choose a new OUT folder, or empty this one yourself."
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _csv(header: tuple[str, ...], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _place(source: Path, target: Path, link: str) -> None:
    """Hard-link when asked and possible (same device), else copy bytes and mtime."""
    if link == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # across devices, or a filesystem without hard links
    shutil.copy2(source, target)


DROPPED_HEADER = ("file", "reason")


def dropped_beside(out: Path) -> Path:
    """Where a run that kept nothing lists its drops: ``<OUT>.dropped.csv``, next to OUT."""
    return out.with_name(f"{out.name}.dropped.csv")


def write_dropped_beside(out: Path, drops: list[Drop]) -> Path:
    """Write ``<OUT>.dropped.csv`` atomically (temporary sibling, then rename); OUT is not touched.

    An existing file of that name is replaced only if it is one of ours (same header line).
    """
    target = dropped_beside(out)
    if target.is_symlink() or (target.exists() and not _is_our_dropped_csv(target)):
        raise PipelineError(
            f"no image survived the cleaning, and the list of reasons cannot be written: {target} exists and was "
            "not written by this stage. Fix: move that file away and run again.",
            code=RUN_EXIT,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out, "dropped.tmp", os.getpid())
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(_csv(DROPPED_HEADER, sorted((d.key, d.reason) for d in drops)))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def _is_our_dropped_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.readline().rstrip("\r\n") == ",".join(DROPPED_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``, removing the previous run's OUT only afterwards.

    Between the two renames OUT is missing for an instant; if the process is interrupted there,
    the previous dataset is renamed back here (Ctrl-C) or by the reaper / next run (a kill).
    """
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    check_out(out, tmp)  # still ours (or empty) right before replacing it
    old = sibling(out, "old", os.getpid())
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if not os.path.lexists(out):
            os.rename(old, out)
        raise
    shutil.rmtree(old)


def _write_metadata(folder: Path, kept: list[KeptFile]) -> None:
    """``metadata.csv``; ``metadata.jsonl`` instead when an image has several captions (a CSV cell
    holds one), with ``text`` as the list, which training reads as alternatives."""
    if not any(k.alternatives for k in kept):
        rows = sorted((f"images/{k.dest}", k.caption) for k in kept)
        _write_atomic(folder / "metadata.csv", _csv(("file_name", "text"), rows))
        return
    lines = [json.dumps({"file_name": f"images/{k.dest}", "text": list(k.alternatives) if k.alternatives else k.caption},
                        ensure_ascii=False) for k in sorted(kept, key=lambda k: k.dest)]
    _write_atomic(folder / "metadata.jsonl", "\n".join(lines) + "\n")


def write_dataset(out: Path, kept: list[KeptFile], drops: list[Drop], report: dict, link: str = "copy") -> None:
    """Write OUT completely in a sibling folder, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out, "partial", os.getpid())
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for item in tqdm(kept, desc="hard-link" if link == "hardlink" else "copy", unit="img"):
            target = tmp / "images" / item.dest
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(item.source, target, link)
        _write_metadata(tmp, kept)
        _write_atomic(tmp / "dropped.csv", _csv(("file", "reason"), sorted((d.key, d.reason) for d in drops)))
        _write_atomic(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(tmp / MARKER, MARKER_TEXT)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
