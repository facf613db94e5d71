"""Datasets without a metadata file: kohya sd-scripts' folder layout.

kohya users keep each image's caption in a sidecar text file (``a.png`` + ``a.txt``, the
extension set by ``--caption_extension``, here ``data.caption_extension``) and put images in
``<N>_<name>`` subfolders to repeat them N times an epoch (see ``datamodule.folder_repeats``).
This module turns such a folder into the same numbered ``file_name``/``text`` rows a
``metadata.csv`` gives, so every check in :mod:`sdtune.data.records` applies unchanged.

An image without a caption file trains with the empty caption, as kohya does (and as the seeds'
Kolors example does on purpose); the count is reported by ``load_records``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from ..formats import IMAGE_SUFFIXES

DEFAULT_CAPTION_EXTENSION = ".txt"


def parse_caption_extension(value: str | None) -> str:
    """``data.caption_extension`` as a suffix with its dot (``txt`` and ``.txt`` are the same)."""
    ext = (value or DEFAULT_CAPTION_EXTENSION).strip()
    ext = ext if ext.startswith(".") else "." + ext
    if len(ext) < 2 or "/" in ext or os.sep in ext or ext.lower() in IMAGE_SUFFIXES:
        raise DataError(
            f"data.caption_extension={value!r} is not a caption file extension. Fix: use the suffix of your "
            "caption files, e.g. data.caption_extension=.txt (kohya's default) or .caption."
        )
    return ext


def image_files(root: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every image below ``root``, skipping hidden files and folders and the folders ``skip`` names
    right under ``root`` (the loss masks' folder), in a stable (sorted) order."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        top = Path(dirpath) == root
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in skip))
        found.extend(Path(dirpath) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found)


def read_caption(path: Path) -> str:
    """A sidecar caption file's text (UTF-8, BOM allowed), stripped; a clear DataError otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise DataError(
            f"caption file {path} is not UTF-8 text (byte {err.start}: {err.reason}). Fix: save it as UTF-8."
        ) from None
    except OSError as err:
        raise DataError(f"cannot read caption file {path}: {err.strerror or err}. Fix: make it a readable file.") from None


def folder_rows(root: Path, extension: str, skip: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """``(n, {"file_name", "text"})`` for each image below ``root``: the n-th image found, its path
    relative to ``root`` and the text of its sidecar caption file ("" when it has none)."""
    rows = []
    for n, image in enumerate(image_files(root, skip), 1):
        sidecar = image.with_suffix(extension)
        text = read_caption(sidecar) if sidecar.is_file() else ""
        rows.append((n, {"file_name": image.relative_to(root).as_posix(), "text": text}))
    return rows


def describe_folder(root: Path, extension: str) -> str:
    """How a folder dataset is named in messages (where a metadata file's path would stand)."""
    return f"{root} (kohya folder, captions from *{extension} files)"
