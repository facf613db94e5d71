"""Find and validate a training dataset folder before any model is loaded.

The layout is diffusers' imagefolder: images anywhere under ``root`` plus ``metadata.csv`` or
``metadata.jsonl`` with a ``file_name`` column (paths relative to ``root``) and a ``text`` column
(the caption). Every problem is reported with the file, the row and the fix, in one error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..formats import IMAGE_SUFFIXES

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
REQUIRED_COLUMNS = ("file_name", "text")
log = logging.getLogger(__name__)
_MAKE_DATA_HINT = "or build one from raw images with `make data RAW=<raw folder> OUT=<folder>`"


@dataclass(frozen=True)
class Record:
    """One training example: an image file and its caption."""

    path: Path
    text: str


def _read_rows(meta: Path) -> list[dict]:
    try:
        if meta.suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(meta, dtype=str, keep_default_na=False, encoding="utf-8")
            columns = list(frame.columns)
            rows = frame.to_dict("records")
        else:
            rows, columns = [], []
            with open(meta, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{meta}: line {n} is not valid JSON ({err.msg}). Fix that line.") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{meta}: line {n} must be a JSON object with file_name and text.")
                    rows.append(row)
                    columns.extend(c for c in row if c not in columns)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{meta} is not UTF-8 text (byte {err.start}: {err.reason}). Fix: save it as UTF-8."
        ) from None
    except DataError:
        raise
    except Exception as err:  # pandas parser errors, empty files
        raise DataError(f"could not read {meta}: {err}. Fix: it must be a CSV with a header row.") from None
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


def _has_images(root: Path) -> bool:
    for _dirpath, _dirs, files in os.walk(root):
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def _verify_image(path: Path) -> str | None:
    """Why ``path`` cannot be trained on, or None. Header and checksums only, so it is quick."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's limit is kept
            with Image.open(path) as im:
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"decompression bomb ({err})"
    except Exception as err:  # Pillow raises many types for broken files
        return f"unreadable or truncated image ({type(err).__name__}: {err})"
    return None


def load_records(root: str | os.PathLike, *, verify: bool = True, bad_images: str = "error") -> list[Record]:
    """Validated records for the dataset at ``root`` (``data.root``).

    ``verify`` checks every image's header and checksums; broken ones stop the run
    (``bad_images="error"``) or are left out with a warning that counts them (``"skip"``).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"data.root={str(root)!r} does not exist. Fix: set data.root to a folder of images with "
            f"a metadata.csv (columns file_name,text), {_MAKE_DATA_HINT}."
        )
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is a file, not a folder. Fix: point it at the dataset folder.")
    meta = find_metadata(root)
    if meta is None:
        if not _has_images(root):
            raise DataError(
                f"data.root={str(root)!r} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}). "
                f"Fix: point data.root at your image folder, {_MAKE_DATA_HINT}."
            )
        raise DataError(
            f"data.root={str(root)!r} has images but no metadata.csv or metadata.jsonl. Fix: add a "
            f"metadata.csv with columns file_name,text, {_MAKE_DATA_HINT}."
        )
    rows = _read_rows(meta)
    if not rows:
        raise DataError(f"{meta} lists no images. Fix: add one row per image (file_name,text).")

    records, missing, not_images, seen, duplicates = [], [], [], {}, []
    for n, row in enumerate(rows, start=2 if meta.suffix == ".csv" else 1):
        name = str(row.get("file_name") or "").strip()
        if name in seen:
            duplicates.append(f"{name!r} (rows {seen[name]} and {n})")
            continue
        seen[name] = n
        path = root / name
        if not name or not path.is_file():
            missing.append(f"row {n}: {name!r}")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            not_images.append(f"row {n}: {name!r}")
        else:
            text = row.get("text")
            records.append(Record(path=path, text="" if text is None else str(text)))
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{meta} names {len(missing)} file(s) that do not exist under {root}: {shown}. "
            "Fix: correct file_name (paths are relative to the metadata file's folder) or remove those rows."
        )
    if not_images:
        raise DataError(
            f"{meta} names {len(not_images)} file(s) that are not images: {'; '.join(not_images[:5])}. "
            f"Supported suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}."
        )
    if duplicates:
        raise DataError(
            f"{meta} lists {len(duplicates)} file_name(s) more than once: {'; '.join(duplicates[:5])}. "
            "Fix: keep one row per image (use data.repeats to train some images more often)."
        )
    if verify:
        records = _check_images(records, meta, bad_images)
    empty = sum(1 for r in records if not r.text.strip())
    if empty:
        log.warning("%d of %d images have an empty caption; they train unconditionally (as caption dropout does)", empty, len(records))
    return records


def _check_images(records: list[Record], meta: Path, bad_images: str) -> list[Record]:
    bad = [(r, why) for r in records if (why := _verify_image(r.path))]
    if not bad:
        return records
    shown = "; ".join(f"{r.path.name}: {why}" for r, why in bad[:5])
    if bad_images != "skip":
        raise DataError(
            f"{len(bad)} image(s) listed in {meta} cannot be read: {shown}. "
            "Fix: replace or remove them (or run `make data`, which drops them with a report), "
            "or set data.bad_images=skip to leave them out."
        )
    log.warning("data.bad_images=skip: leaving out %d unreadable image(s): %s", len(bad), shown)
    dropped = {id(r) for r, _ in bad}
    kept = [r for r in records if id(r) not in dropped]
    if not kept:
        raise DataError(f"every image listed in {meta} is unreadable: {shown}.")
    return kept
