"""The candidate record every raw layout is read into, and helpers shared by the readers.

A candidate is one image plus its caption, or a ``problem`` found while reading (missing file,
unreadable caption file, a repeated row). Candidates with a problem are dropped, never raised.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sdtune.utils.formats import IMAGE_SUFFIXES  # torch-free, shared with training

__all__ = ["IMAGE_SUFFIXES", "Candidate"]


@dataclass
class Candidate:
    """One raw image with its caption, or the reason it cannot be used.

    ``key`` names it in ``dropped.csv`` (path relative to the raw folder, POSIX style; absolute when
    the file lies outside it). ``dest`` is where a kept copy goes under ``OUT/images``.
    """

    key: str
    path: Path | None
    caption: str | None
    dest: str | None
    problem: tuple[str, str] | None = None  # (reason code, detail)
    alternatives: tuple[str, ...] = ()  # a jsonl text list: all its captions (``caption`` is the first)


def locate(base: Path, name: str) -> tuple[Path, str, str]:
    """(absolute path, key, dest) for ``name`` as written in a listing that lives in ``base``."""
    path = Path(os.path.normpath(base / name))
    try:
        rel = PurePosixPath(path.relative_to(base).as_posix())
    except ValueError:
        digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]
        return path, str(path), f"_external/{digest}/{path.name}"
    return path, rel.as_posix(), rel.as_posix()


def missing_problem(path: Path) -> tuple[str, str] | None:
    """The problem for a listed file that is not on disk, else ``None``."""
    if path.is_file():
        return None
    return ("missing file", "listed but not found" if not path.exists() else "listed path is not a file")


def json_kind(value: object) -> str:
    """``value`` as a JSON reader would name it, with a short rendering: ``a number (5)``."""
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return "null" if value is None else f"{kind.get(type(value), type(value).__name__)} ({shown})"


def not_text(field: str, value: object) -> str | None:
    """The 'bad record' detail when a field that must hold text (or be absent) holds another JSON type."""
    if value is None or isinstance(value, str):
        return None
    return f"'{field}' is {json_kind(value)}; expected a string"


def clean_caption(text: object) -> tuple[str, None]:
    """The stripped caption; absent or blank is "": the image trains unconditionally, as in kohya
    sd-scripts and the seeds' Kolors example (the run counts such images and says so)."""
    return ("" if text is None else str(text).strip()), None


def rows_to_candidates(meta: Path, rows, unit: str) -> list[Candidate]:
    """Candidates for ``(number, row)`` pairs with ``file_name``/``text``; later repeats are dropped."""
    base = meta.parent
    seen: dict[Path, int] = {}
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            out.append(Candidate(f"{meta.name} {unit} {n}", None, None, None, ("bad record", "not a JSON object")))
            continue
        text, alternatives = row.get("text"), ()
        if isinstance(text, list) and text and all(isinstance(t, str) and t.strip() for t in text):
            text, alternatives = text[0], tuple(t.strip() for t in text) if len(text) > 1 else ()
        wrong = not_text("file_name", row.get("file_name")) or not_text("text", text)
        if isinstance(text, list):  # a list with a non-string or blank entry
            wrong = f"'text' is {json_kind(text)}; expected a caption or a list of non-empty captions"
        if wrong:
            out.append(Candidate(f"{meta.name} {unit} {n}", None, None, None, ("bad record", wrong)))
            continue
        name = str(row.get("file_name") or "").strip()
        if not name:
            out.append(Candidate(f"{meta.name} {unit} {n}", None, None, None, ("bad record", "empty file_name")))
            continue
        path, key, dest = locate(base, name)
        caption, problem = clean_caption(text)
        if path in seen:
            key = f"{key} ({meta.name} {unit} {n})"
            problem = ("listed twice", f"already listed on {unit} {seen[path]}; the first caption is kept")
        else:
            seen[path] = n
            problem = missing_problem(path) or problem
        out.append(Candidate(key, path, caption, dest, problem, alternatives))
    return out


@dataclass(frozen=True)
class Drop:
    """A dropped candidate: ``stage`` is the pre-check reason code or the data-juicer op name."""

    key: str
    stage: str
    reason: str

    @classmethod
    def precheck(cls, key: str, code: str, detail: str) -> Drop:
        return cls(key, f"pre-check: {code}", f"pre-check: {code} ({detail})" if detail else f"pre-check: {code}")
