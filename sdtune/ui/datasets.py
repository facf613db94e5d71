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
import re
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

CAPTION_SUFFIXES = (".txt", ".caption")
SKIP_NOTE = "the run stops on it (data.bad_images=error, the default) or leaves it out with data.bad_images=skip"


def absolute_root(root: str) -> Path:
    """A dataset folder as the page gives it: an absolute path, normalised as ``data.root`` is."""
    if not root or not os.path.isabs(os.path.expanduser(root)):
        raise DataError(f"root={root!r}: give the dataset folder as an absolute path (e.g. /data/my_set).")
    return dataset_root(root)


def opened_root(root: str, opened: set[str]) -> Path:
    """A dataset folder the user opened (POST /api/dataset), else Forbidden."""
    try:
        folder = absolute_root(root)
    except DataError as err:
        raise Forbidden(str(err)) from None
    if str(folder) not in opened:
        raise Forbidden(f"refused root={root!r}: only dataset folders opened in the dataset view are served. Fix: "
                        "open it there first (POST /api/dataset {root}).")
    return folder


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
    ext = caption_suffix(caption_extension)
    records = load_records(folder, verify=False, caption_extension=ext)
    meta = find_metadata(folder)
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


def caption_suffix(value: str | None) -> str:
    """The caption extension the page may write: the data config's default (``.txt``) or kohya's other
    usual one (``.caption``); anything else (``.yaml``, ``.json``, ``.py``...) could overwrite a file
    that is not a caption, so it is refused."""
    ext = parse_caption_extension(value)
    if ext.lower() not in CAPTION_SUFFIXES:
        raise DataError(f"caption_extension={value!r}: the dataset view reads and writes only {' or '.join(CAPTION_SUFFIXES)} "
                        "caption files. Fix: rename the caption files to .txt (data.caption_extension=.txt).")
    return ext


def _not_a_link(path: Path) -> None:
    if path.is_symlink():
        raise Forbidden(f"refused to write {path}: it is a symbolic link (to {os.readlink(path)}), and the atomic "
                        "write would replace the link with a plain file. Fix: edit the file it points to, or replace "
                        "the link with a copy of that file.")


def write_caption(root: Path, file: str, caption: str, caption_extension: str | None = None) -> Path:
    """Write ``caption`` for the image ``file`` (relative to ``root``) into the file that holds its
    caption; returns that file. Forbidden for a path outside ``root`` or a caption file that is a
    symbolic link; DataError for a file that is not an image of the set."""
    if not isinstance(caption, str) or "\x00" in caption:
        raise DataError("caption must be text.")
    ext = caption_suffix(caption_extension)
    image = confined(root, file, f"the dataset folder {root}")  # resolved, as the records' paths are below
    records = load_records(root, verify=False, caption_extension=ext)
    record = next((r for r in records if r.path.resolve() == image), None)
    if record is None:
        raise DataError(f"{file!r} is not an image of the dataset {root} (its metadata or folder does not list it); "
                        "only the captions of the set's images are edited.")
    meta = find_metadata(root)
    if meta is None:
        target = record.path.with_suffix(ext)  # beside the image as the run finds it (links not followed)
        if target.suffix.lower() in IMAGE_SUFFIXES or target.resolve() == image:
            raise Forbidden(f"refused to write {target}: it is an image.")
        confined(root, os.path.relpath(target, root), f"the dataset folder {root}")
        _not_a_link(target)
        write_text_atomic(target, caption.strip())
        return target
    _not_a_link(meta)
    if meta.suffix == ".csv":
        _write_csv(meta, root, image, caption)
    else:
        _write_jsonl(meta, root, image, caption)
    return meta


def _names(root: Path, name: str) -> Path:
    return (root / name.strip()).resolve()


def _lines(text: str) -> list[str]:
    """``text`` cut after each newline, every line keeping its own terminator (CRLF or LF)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def _write_csv(meta: Path, root: Path, image: Path, caption: str) -> None:
    """Rewrite the caption cell of ``image``'s row only: the BOM, every other row and each line's
    terminator stay byte for byte (the row is re-serialised alone, with its own terminator)."""
    with open(meta, encoding="utf-8", newline="") as fh:
        text = fh.read()
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    lines = _lines(text[len(bom):])
    used = 0

    def feed():
        nonlocal used
        for line in lines:
            used += 1
            yield line

    reader = csv.reader(feed())
    header = next(reader, [])
    if "file_name" not in header or "text" not in header:
        raise DataError(f"{meta} has no file_name and text columns ({','.join(header)}).")
    name_at, text_at = header.index("file_name"), header.index("text")
    start, hits = used, []
    for row in reader:
        if len(row) > name_at and _names(root, row[name_at]) == image:
            hits.append((start, used, row))
        start = used
    if len(hits) != 1:
        raise DataError(f"{meta} lists {image.name} {len(hits)} times; expected once.")
    first, end, row = hits[0]
    row += [""] * (text_at + 1 - len(row))
    row[text_at] = caption.strip()
    last = lines[end - 1]
    ending = "\r\n" if last.endswith("\r\n") else "\n" if last.endswith("\n") else ""
    buf = io.StringIO()
    csv.writer(buf, lineterminator=ending or "\n").writerow(row)
    line = buf.getvalue() if ending else buf.getvalue()[:-1]
    with atomic_path(meta) as tmp:
        tmp.write_bytes((bom + "".join(lines[:first]) + line + "".join(lines[end:])).encode("utf-8"))


def _write_jsonl(meta: Path, root: Path, image: Path, caption: str) -> None:
    with open(meta, encoding="utf-8", newline="") as fh:
        lines = _lines(fh.read())
    hit = None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = json.loads(line)
        name = from_data_juicer(row).get("file_name")
        if isinstance(name, str) and _names(root, name) == image:
            row["text"] = caption.strip()
            hit = i
            lines[i] = json.dumps(row, ensure_ascii=False) + line[len(line.rstrip("\r\n")):]
            break
    if hit is None:
        raise DataError(f"{meta} does not list {image.name}.")
    with atomic_path(meta) as tmp:
        tmp.write_bytes("".join(lines).encode("utf-8"))


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


def image_files(root: Path) -> set[Path]:
    """The real paths of the set's images, as the run lists them: all ``/dataset-files`` serves of an
    opened folder (not its other files). Empty when the folder no longer reads as a dataset."""
    try:
        return {r.path.resolve() for r in load_records(root, verify=False)}
    except DataError:
        return set()
