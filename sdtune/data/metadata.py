"""Read a dataset's ``metadata.csv`` / ``metadata.jsonl`` into numbered rows, refusing malformed files
with the line and the fix (the rows' meaning is checked in :mod:`sdtune.data.records`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sdtune.utils.errors import DataError
from sdtune.utils.formats import strip_dj_tokens

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
REQUIRED_COLUMNS = ("file_name", "text")


def show_value(value, limit: int = 80) -> str:
    """A metadata value as the user wrote it (JSON for non-strings), cut to ``limit`` characters."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_csv(meta: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) pairs and the header of a CSV; a BOM is dropped, short rows padded with ''."""
    rows: list[tuple[int, dict]] = []
    with open(meta, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, [])
            twice = sorted({c for c in header if c in REQUIRED_COLUMNS and header.count(c) > 1})
            if twice:
                raise DataError(
                    f"{meta}: the header has more than one {' and '.join(repr(c) for c in twice)} column "
                    f"({','.join(header)}). Fix: keep one 'file_name' and one 'text' column."
                )
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue  # blank line
                if len(fields) > len(header) and any(f.strip() for f in fields[len(header):]):
                    raise DataError(
                        f"{meta}: line {reader.line_num} has {len(fields)} fields but the header has "
                        f"{len(header)} ({show_value(','.join(fields))}). Fix: put a caption that contains "
                        'commas in double quotes, e.g. images/a.png,"red, round".'
                    )
                rows.append((reader.line_num, dict(zip(header, fields))))
        except csv.Error as err:
            raise DataError(
                f"{meta}: line {reader.line_num} is not valid CSV ({err}). Fix: check the double quotes "
                'on that line (a quote inside a quoted caption is written "").'
            ) from None
    return rows, header


def from_data_juicer(row: dict) -> dict:
    """A data-juicer row (``{"text", "images": [path]}``, the seeds' Kolors metadata.jsonl; also
    ``image``) as ``file_name``/``text``; other rows unchanged. A value that is not one path string
    stays as it is, so the record checks refuse it with its row number."""
    if "file_name" in row:
        return row
    for key in ("images", "image"):
        if key in row:
            value = row[key]
            return {**row, "text": strip_dj_tokens(row.get("text")),
                    "file_name": value[0] if isinstance(value, list) and len(value) == 1 else value}
    return row


def _read_jsonl(meta: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) pairs and every key seen; a BOM is dropped, blank lines skipped."""
    rows: list[tuple[int, dict]] = []
    columns: list[str] = []
    with open(meta, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{meta}: line {n} is not valid JSON ({err.msg}). Fix that line.") from None
            if not isinstance(row, dict):
                raise DataError(f"{meta}: line {n} must be a JSON object with file_name and text.")
            row = from_data_juicer(row)
            rows.append((n, row))
            columns.extend(c for c in row if c not in columns)
    return rows, columns


def read_rows(meta: Path) -> list[tuple[int, dict]]:
    """The rows of ``meta`` with the line each starts on (the "row" of every message)."""
    try:
        rows, columns = _read_csv(meta) if meta.suffix == ".csv" else _read_jsonl(meta)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{meta} is not UTF-8 text (byte {err.start}: {err.reason}). Fix: save it as UTF-8."
        ) from None
    except OSError as err:
        raise DataError(f"cannot open {meta}: {err.strerror or err}. Fix: make it a readable file.") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{meta} has no {' or '.join(repr(c) for c in missing)} column (found: {columns}). "
            "Fix: name the image-path column 'file_name' and the caption column 'text'."
        )
    return rows


def find_metadata(root: Path) -> Path | None:
    found = [root / n for n in METADATA_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise DataError(f"{root} has both metadata.csv and metadata.jsonl; keep one of them.")
    return found[0] if found else None
