"""Readers for the two JSON-lines layouts: ``metadata.jsonl`` and a data-juicer dataset.

A data-juicer record is ``{"text": caption, "images": [path]}`` (``image`` is accepted too, as is a
single path string). Relative paths are relative to the jsonl file's folder. data-juicer's
multimodal special tokens (``<__dj__image>``, ``<|__dj__eoc|>``) are removed from captions because
they are markup, not words the model should learn. A line that is not JSON is dropped, not fatal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .candidates import Candidate, clean_caption, locate, missing_problem, rows_to_candidates
from .errors import PipelineError

DJ_TOKENS = ("<__dj__image>", "<|__dj__eoc|>")
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


def read_metadata_jsonl(meta: Path) -> list[Candidate]:
    """diffusers imagefolder layout with ``metadata.jsonl`` (``file_name``, ``text`` per line)."""
    bad, rows = [], []
    for n, value in _lines(meta):
        if value is _NOT_JSON:
            bad.append(Candidate(f"{meta.name} line {n}", None, None, None, ("bad record", "not valid JSON")))
        else:
            rows.append((n, value))
    return bad + rows_to_candidates(meta, rows, "line")


def _strip_tokens(text: object) -> object:
    if not isinstance(text, str):
        return text
    cleaned = text
    for token in DJ_TOKENS:
        cleaned = cleaned.replace(token, " ")
    return " ".join(cleaned.split()) if cleaned != text else text


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
        images = record.get("images", record.get("image"))
        images = [images] if isinstance(images, str) else list(images or [])
        if len(images) != 1 or not isinstance(images[0], str) or not images[0].strip():
            detail = f"{len(images)} images listed; sdtune trains on exactly one image per caption"
            out.append(Candidate(where, None, None, None, ("bad record", detail)))
            continue
        image, key, dest = locate(base, images[0].strip())
        caption, problem = clean_caption(_strip_tokens(record.get("text")))
        if image in seen:
            key = f"{key} ({where})"
            problem = ("listed twice", f"already listed on line {seen[image]}; the first caption is kept")
        else:
            seen[image] = n
            problem = missing_problem(image) or problem
        out.append(Candidate(key, image, caption, dest, problem))
    return out
