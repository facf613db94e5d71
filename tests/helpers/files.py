"""Files on disk: fingerprints that prove a test left a folder as it was, and small file makers."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

#: A data-pipeline recipe that keeps every image of at least 32x32 (small test pictures pass).
SMALL_OK = "process:\n  - image_shape_filter:\n      min_width: 32\n      min_height: 32\n"


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path: proves a test left the user's files as they were."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def listing(root: Path, with_mtime: bool = False) -> list[tuple]:
    """Every file below ``root`` (hidden ones too): relative path, sha256 and optionally mtime."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        row = (path.relative_to(root).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest())
        rows.append(row + ((path.stat().st_mtime_ns,) if with_mtime else ()))
    return rows


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def recipe(tmp_path: Path, name: str, text: str) -> Path:
    """Write ``text`` to ``tmp_path/name`` (a recipe or config file) and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path
