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

import logging
import os
from pathlib import Path

from sdtune.utils.errors import DataError
from sdtune.utils.formats import IMAGE_SUFFIXES

log = logging.getLogger(__name__)
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


def walk_folder(root: Path, skip: tuple[str, ...] = (), *, quiet: bool = False):
    """``os.walk`` of ``root`` that also enters symbolically linked folders (a ``10_name`` repeat
    folder is often a link to the images kept elsewhere), skipping hidden files and folders, the
    folders ``skip`` names right under ``root`` and any link back into a folder it is already in
    (a loop), in a stable (sorted) order. Yields ``(folder, file names)``; each link followed or
    skipped is logged (unless ``quiet``)."""
    chains = {str(root): {os.path.realpath(root)}}  # each folder's own and its ancestors' real paths
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        chain, keep = chains.pop(dirpath, set()), []
        for d in sorted(dirs):
            if d.startswith(".") or (dirpath == str(root) and d in skip):
                continue
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if os.path.islink(full):
                shown = os.path.relpath(full, root)
                if real in chain:
                    if not quiet:
                        log.warning("skipping %s: a symbolic link to %s, a folder it is already inside (a loop)",
                                    shown, real)
                    continue
                if not quiet:
                    log.info("following the symbolic link %s -> %s", shown, real)
            chains[full] = chain | {real}
            keep.append(d)
        dirs[:] = keep
        yield dirpath, sorted(f for f in files if not f.startswith("."))


def image_files(root: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every image below ``root`` (linked folders included, see :func:`walk_folder`), skipping
    hidden files and folders and the folders ``skip`` names right under ``root`` (the loss masks'
    folder), in a stable (sorted) order."""
    found = [Path(dirpath) / f for dirpath, files in walk_folder(root, skip) for f in files
             if Path(f).suffix.lower() in IMAGE_SUFFIXES]
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


def _other_case(sidecar: Path, listings: dict[Path, list[str]]) -> Path | None:
    """A file beside ``sidecar`` whose name differs from it only in case (``a.TXT`` for ``a.txt``)."""
    folder = sidecar.parent
    if folder not in listings:
        try:
            listings[folder] = sorted(os.listdir(folder))
        except OSError:
            listings[folder] = []
    wanted = sidecar.name.lower()
    return next((folder / n for n in listings[folder] if n.lower() == wanted and n != sidecar.name), None)


def folder_rows(root: Path, extension: str, skip: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """``(n, {"file_name", "text"})`` for each image below ``root``: the n-th image found, its path
    relative to ``root`` and the text of its sidecar caption file ("" when it has none).

    A caption file whose name differs only in case (``a.TXT`` under ``data.caption_extension=.txt``)
    is matched by neither kohya nor sdtune on a case-sensitive file system; rather than train those
    images with the empty caption, the files are named with the fix."""
    rows, other_case, listings = [], [], {}
    for n, image in enumerate(image_files(root, skip), 1):
        sidecar = image.with_suffix(extension)
        if sidecar.is_file():
            text = read_caption(sidecar)
        else:
            text, near = "", _other_case(sidecar, listings)
            if near is not None:
                other_case.append((image, near))
        rows.append((n, {"file_name": image.relative_to(root).as_posix(), "text": text}))
    if other_case:
        raise DataError(_other_case_message(root, extension, other_case))
    return rows


def _other_case_message(root: Path, extension: str, found: list[tuple[Path, Path]]) -> str:
    shown = "; ".join(f"{near.relative_to(root).as_posix()} (for {image.name})" for image, near in found[:5])
    more = f"; and {len(found) - 5} more" if len(found) > 5 else ""
    suffixes = {near.suffix for _, near in found}
    same_stem = all(near.stem == image.stem for image, near in found)
    fix = (f"data.caption_extension={suffixes.pop()} (caption file names are matched exactly, case included), "
           f"or rename the files to end in {extension}" if len(suffixes) == 1 and same_stem
           else f"rename them to the image's name with {extension} (caption file names are matched exactly, case included)")
    return (f"{len(found)} image(s) in {root} have no {extension} caption file, but a file whose name differs "
            f"only in case: {shown}{more}. They would train with the empty caption. Fix: {fix}.")


def describe_folder(root: Path, extension: str) -> str:
    """How a folder dataset is named in messages (where a metadata file's path would stand)."""
    return f"{root} (kohya folder, captions from *{extension} files)"
