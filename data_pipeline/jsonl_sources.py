"""Readers for the two JSON-lines layouts: ``metadata.jsonl`` and a data-juicer dataset.

A data-juicer record is ``{"text": caption, "images": [path]}`` (``image`` is accepted too, as is a
single path string). Any other shape (a number, an object, null, a list holding a non-string, a
non-string caption) makes that record a dropped ``bad record`` with the reason, never a crash.
Relative paths are relative to the jsonl file's folder. data-juicer's
multimodal special tokens (``<__dj__image>``, ``<|__dj__eoc|>``) are removed from captions because
they are markup, not words the model should learn. A line that is not JSON is dropped, not fatal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.candidates import (
    Candidate,
    clean_caption,
    json_kind,
    locate,
    missing_problem,
    not_text,
    rows_to_candidates,
)
from data_pipeline.errors import PipelineError
from sdtune.utils.formats import strip_dj_tokens

_NOT_JSON = object()


def _lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value or ``_NOT_JSON``) for every non-blank line."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            lines = fh.readlines()
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path} is not UTF-8 text (byte {err.start}). Fix: save it as UTF-8.") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            yield n, _NOT_JSON


def is_dj_jsonl(path: Path) -> bool:
    """Whether a jsonl holds data-juicer records (``images``/``image``, no ``file_name``), whatever
    its name: the seeds' Kolors example writes exactly that into a file called metadata.jsonl."""
    for _n, value in _lines(path):
        if isinstance(value, dict):
            return "file_name" not in value and ("images" in value or "image" in value)
    return False


def read_metadata_jsonl(meta: Path) -> list[Candidate]:
    """diffusers imagefolder layout with ``metadata.jsonl`` (``file_name``, ``text`` per line)."""
    bad, rows = [], []
    for n, value in _lines(meta):
        if value is _NOT_JSON:
            bad.append(Candidate(f"{meta.name} line {n}", None, None, None, ("bad record", "not valid JSON")))
        else:
            rows.append((n, value))
    return bad + rows_to_candidates(meta, rows, "line")


def one_image(record: dict) -> tuple[str | None, str | None]:
    """``(path, None)`` for a record naming exactly one image path, else ``(None, why not)``."""
    key = "images" if "images" in record or "image" not in record else "image"
    if key not in record:
        return None, "no 'images' field; expected a path or a list with one path"
    value = record[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return None, f"'{key}' is {json_kind(value)}; expected a path or a list with one path"
    if len(value) != 1:
        return None, f"{len(value)} images listed; sdtune trains on exactly one image per caption"
    if not isinstance(value[0], str):
        return None, f"'{key}' holds {json_kind(value[0])}; expected a path string"
    if not value[0].strip():
        return None, f"'{key}' holds an empty path"
    return value[0].strip(), None


def read_dj_jsonl(path: Path) -> list[Candidate]:
    """A data-juicer dataset: one image per record; records with zero or several images are dropped."""
    base = path.parent
    out: list[Candidate] = []
    seen: dict[Path, int] = {}
    for n, record in _lines(path):
        where = f"{path.name} line {n}"
        if record is _NOT_JSON or not isinstance(record, dict):
            detail = "not valid JSON" if record is _NOT_JSON else "not a JSON object"
            out.append(Candidate(where, None, None, None, ("bad record", detail)))
            continue
        name, detail = one_image(record)
        detail = detail or not_text("text", record.get("text"))
        if detail:
            out.append(Candidate(where, None, None, None, ("bad record", detail)))
            continue
        image, key, dest = locate(base, name)
        caption, problem = clean_caption(strip_dj_tokens(record.get("text")))
        if image in seen:
            key = f"{key} ({where})"
            problem = ("listed twice", f"already listed on line {seen[image]}; the first caption is kept")
        else:
            seen[image] = n
            problem = missing_problem(image) or problem
        out.append(Candidate(key, image, caption, dest, problem))
    return out
