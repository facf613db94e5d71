"""The dataset view: a folder's images with captions, sizes, buckets and pre-flight verdicts, and
the caption editor's write.

The folder is read by the training run's own reader (:func:`sdtune.data.records.load_records`, so
a folder the run would refuse is refused here with the same message), each image judged by the
same check the run makes (:func:`sdtune.data.records.image_problem`: a broken file is the reason an
image would be skipped under ``data.bad_images=skip``, and stops the run otherwise) and bucketed by
:func:`sdtune.data.buckets.assign_buckets`.

A caption is written atomically (temp file + rename in the same folder,
:func:`sdtune.utils.io.atomic_path`) into the one file that holds it: the image's sidecar
``.txt`` in a kohya folder, else its row of ``metadata.csv`` / ``metadata.jsonl``. An image file is
never opened for writing.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from sdtune.data.folders import parse_caption_extension
from sdtune.data.metadata import find_metadata, from_data_juicer
from sdtune.data.records import dataset_root, image_problem, load_records
from sdtune.run.preflight import compose_training
from sdtune.ui.security import Forbidden, confined
from sdtune.utils.errors import ConfigError, DataError
from sdtune.utils.formats import IMAGE_SUFFIXES
from sdtune.utils.io import atomic_path, write_text_atomic

SKIP_NOTE = "the run stops on it (data.bad_images=error, the default) or leaves it out with data.bad_images=skip"


def absolute_root(root: str) -> Path:
    """A dataset folder as the page gives it: an absolute path, normalised as ``data.root`` is."""
    if not root or not os.path.isabs(os.path.expanduser(root)):
        raise DataError(f"root={root!r}: give the dataset folder as an absolute path (e.g. /data/my_set).")
    return dataset_root(root)


def _size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # Pillow raises many types for broken files; the verdict says why
        return None


def view(root: str, resolution: int | None, caption_extension: str | None = None) -> dict[str, Any]:
    """``GET /api/dataset``: ``{root, metadata, images: [...]}`` (see the contract); DataError for a
    folder the run would refuse."""
    # deferred: the bucket ladder is diffusers' (imports torch: seconds); the server starts without it
    from sdtune.data.buckets import assign_buckets

    folder = absolute_root(root)
    records = load_records(folder, verify=False, caption_extension=caption_extension)
    meta = find_metadata(folder)
    ext = parse_caption_extension(caption_extension)
    images = []
    for record in records:
        rel = record.path.relative_to(folder).as_posix() if record.path.is_relative_to(folder) else str(record.path)
        size, problem = _size(record.path), image_problem(record.path)
        bucket = None
        if size and resolution:
            (bh, bw), = assign_buckets([(size[1], size[0])], int(resolution))
            bucket = [bw, bh]
        sidecar = record.path.with_suffix(ext)
        images.append({
            "file": rel,
            "url": f"/dataset-files?root={quote(str(folder))}&file={quote(rel)}",
            "caption": record.text,
            "caption_file": meta.name if meta is not None else sidecar.relative_to(folder).as_posix(),
            "width": size[0] if size else None, "height": size[1] if size else None,
            "bucket": bucket,
            "verdict": "skipped" if problem else "ok",
            "reason": f"{problem}: {SKIP_NOTE}" if problem else "",
        })
    return {"root": str(folder), "metadata": meta.name if meta is not None else None, "images": images}


def write_caption(root: Path, file: str, caption: str, caption_extension: str | None = None) -> Path:
    """Write ``caption`` for the image ``file`` (relative to ``root``) into the file that holds its
    caption; returns that file. Forbidden for a path outside ``root``; DataError for a file that is
    not an image of the set."""
    if not isinstance(caption, str) or "\x00" in caption:
        raise DataError("caption must be text.")
    image = confined(root, file, f"the dataset folder {root}")
    records = load_records(root, verify=False, caption_extension=caption_extension)
    if image not in {r.path for r in records}:
        raise DataError(f"{file!r} is not an image of the dataset {root} (its metadata or folder does not list it); "
                        "only the captions of the set's images are edited.")
    meta = find_metadata(root)
    if meta is None:
        target = image.with_suffix(parse_caption_extension(caption_extension))
        if target.suffix.lower() in IMAGE_SUFFIXES or target == image:  # parse_caption_extension refuses these too
            raise Forbidden(f"refused to write {target}: it is an image.")
        confined(root, str(target.relative_to(root)), f"the dataset folder {root}")
        write_text_atomic(target, caption.strip())
        return target
    if meta.suffix == ".csv":
        _write_csv(meta, root, image, caption)
    else:
        _write_jsonl(meta, root, image, caption)
    return meta


def _names(root: Path, name: str) -> Path:
    return Path(os.path.normpath(root / name.strip()))


def _write_csv(meta: Path, root: Path, image: Path, caption: str) -> None:
    with open(meta, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    hits = [row for row in rows if _names(root, row.get("file_name") or "") == image]
    if len(hits) != 1:
        raise DataError(f"{meta} lists {image.name} {len(hits)} times; expected once.")
    hits[0]["text"] = caption.strip()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(meta) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _write_jsonl(meta: Path, root: Path, image: Path, caption: str) -> None:
    lines = meta.read_text(encoding="utf-8").splitlines(keepends=True)
    hit = None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = json.loads(line)
        name = from_data_juicer(row).get("file_name")
        if isinstance(name, str) and _names(root, name) == image:
            row["text"] = caption.strip()
            hit = i
            lines[i] = json.dumps(row, ensure_ascii=False) + "\n"
            break
    if hit is None:
        raise DataError(f"{meta} does not list {image.name}.")
    with atomic_path(meta) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")


def model_resolution(model: str | None) -> int | None:
    """``model.resolution`` of a model preset (composed as the run would), None when unknown."""
    if not model:
        return None
    try:
        cfg = compose_training([f"model={model}"])
        value = cfg.model.get("resolution")
        return int(value) if value is not None else None
    except (ConfigError, ValueError, TypeError):
        return None
