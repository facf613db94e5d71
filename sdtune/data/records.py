"""Find and validate a training dataset folder before any model is loaded.

Two layouts: diffusers' imagefolder (images anywhere under ``root`` plus ``metadata.csv`` or
``metadata.jsonl`` with a ``file_name`` column, paths relative to ``root``, and a ``text`` column,
the caption; a data-juicer ``{"text", "images": [path]}`` jsonl is read too), or, without a
metadata file, kohya's folder of images with sidecar caption files (:mod:`.folders`). Every problem is reported with the file, the row and the fix, in one error.

In ``metadata.jsonl`` a caption may also be a list of strings: alternative captions, of which
each training sample picks one. ``file_name`` values are normalised (``./a.png`` and
``b/../a.png`` are the same file) and must stay inside ``root`` unless
``data.allow_outside_root=true``. Every image is decoded once up front, so a file cut short
stops the run here (or is skipped, with ``data.bad_images=skip``) instead of mid-training.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from sdtune.data.folders import describe_folder, folder_rows, parse_caption_extension, walk_folder
from sdtune.data.metadata import find_metadata, read_rows, show_value
from sdtune.utils.errors import DataError
from sdtune.utils.formats import IMAGE_SUFFIXES

log = logging.getLogger(__name__)
_MAKE_DATA_HINT = "or build one from raw images with `make data RAW=<raw folder> OUT=<folder>`"
_PROGRESS_OVER = 500  # images: a progress bar for the pre-flight decode of larger sets
CHECK_THREADS = min(4, os.cpu_count() or 1)  # Pillow decodes without the GIL; few, to bound memory


@dataclass(frozen=True)
class Record:
    """One training example: an image file and its caption(s).

    ``text`` is the caption, or the first one when the metadata gives a list; the sample grid and
    the validation loss use it. ``alternatives`` holds all of a list of two or more captions,
    of which each training sample picks one (see ``ImageCaptionDataset.__getitem__``).
    """

    path: Path
    text: str
    alternatives: tuple[str, ...] = ()

    @property
    def captions(self) -> tuple[str, ...]:
        """Every caption a training step can use for this image."""
        return self.alternatives or (self.text,)


def dataset_root(root: str | os.PathLike) -> Path:
    """``data.root`` as one absolute path (``~`` expanded, ``..`` folded), used everywhere.

    Record paths are built on it, so ``folder_repeats`` and the outside-the-folder check compare
    like with like whether the user wrote ``~/set``, ``./set`` or ``/home/me/set``.
    """
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def _has_images(root: Path) -> bool:
    for _dirpath, files in walk_folder(root, quiet=True):  # linked folders too, as folder_rows reads them
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def _link_problem(path: Path) -> str | None:
    """Why ``path``, a symbolic link (or a path through one), leads to no file: a loop or a broken
    link; None when it is something else (a file, or no file and no link)."""
    try:
        os.stat(path)
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        if os.path.islink(path):
            return f"a broken symbolic link to {os.readlink(path)}"
    return None


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be trained on, or None.

    Checks the checksums (``verify``, which catches a PNG missing its end) and decodes every pixel
    (``load``, which catches a JPEG cut short: its ``verify`` reads nothing). Anything over
    Pillow's decompression-bomb limit is refused before decoding, so one file cannot exhaust
    memory. The caller forces ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while this runs.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels, limit = im.size[0] * im.size[1], Image.MAX_IMAGE_PIXELS
            if limit and pixels > limit:
                return f"decompression bomb (Image size ({pixels} pixels) exceeds limit of {limit} pixels)"
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: open it again
            im.load()
    except Image.DecompressionBombError as err:
        return f"decompression bomb ({err})"
    except Exception as err:  # Pillow raises many types for broken files
        return f"unreadable or truncated image ({type(err).__name__}: {err})"
    return None


def _captions(value) -> tuple[str, ...] | None:
    """The caption(s) of a ``text`` value: null is "", a string itself, a list of non-empty
    strings alternatives; None for anything else (numbers, booleans, objects, other lists)."""
    if value is None:
        return ("",)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(c, str) and c.strip() for c in value):
        return tuple(value)
    return None


def _listing(items: list[str]) -> str:
    return "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")


def load_records(
    root: str | os.PathLike, *, verify: bool = True, bad_images: str = "error", allow_outside_root: bool = False,
    caption_extension: str | None = None, skip_folders: tuple[str, ...] = (), key: str = "data.root",
) -> list[Record]:
    """Validated records for the dataset at ``root`` (``data.root``).

    ``root`` holds a ``metadata.csv``/``metadata.jsonl``, or else is a kohya folder of images with
    sidecar caption files (``caption_extension``, default ``.txt``; see :mod:`.folders`).
    ``verify`` decodes every image fully; broken ones stop the run (``bad_images="error"``) or are
    left out with a warning that counts them (``"skip"``). A ``file_name`` that leads outside
    ``root`` (``../``, or an absolute path elsewhere) is refused unless ``allow_outside_root``.
    Record paths are absolute and normalised. A kohya folder's images under ``skip_folders`` (right
    under ``root``: the masks of ``train.masked_loss``) are not training images. ``key`` is the
    setting ``root`` came from, named in the messages (``data.class_root`` for class images).
    """
    root, meta = _locate(root, key)
    if meta is None:
        extension = parse_caption_extension(caption_extension)
        rows, meta = folder_rows(root, extension, tuple(skip_folders)), describe_folder(root, extension)
    else:
        rows = read_rows(meta)
    if not rows:
        raise DataError(f"{meta} lists no images. Fix: add one row per image (file_name,text).")
    folder = not isinstance(meta, Path)  # a kohya folder: no metadata file, no row numbers
    records, problems = _resolve_rows(rows, root, allow_outside_root, folder=folder)
    _raise_problems(problems, meta, root, folder=folder)
    if verify:
        records = _check_images(records, meta, bad_images)
    empty = sum(1 for r in records if not r.text.strip())
    if empty:
        log.warning("%d of %d images have an empty caption; they train unconditionally (as caption dropout does)", empty, len(records))
    return records




def _locate(root: str | os.PathLike, key: str = "data.root") -> tuple[Path, Path | None]:
    """(dataset folder, its metadata file or None for a kohya folder), or the error that says what
    is wrong with ``root``, the value of setting ``key``."""
    given, root = os.fspath(root), dataset_root(root)
    if not root.exists():
        where = repr(given) if given == str(root) else f"{given!r} ({root})"
        raise DataError(
            f"{key}={where} does not exist. Fix: set {key} to a folder of images with "
            f"a metadata.csv (columns file_name,text), {_MAKE_DATA_HINT}."
        )
    if not root.is_dir():
        raise DataError(f"{key}={str(root)!r} is a file, not a folder. Fix: point it at the dataset folder.")
    meta = find_metadata(root)
    if meta is None and not _has_images(root):
        raise DataError(
            f"{key}={str(root)!r} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}). "
            f"Fix: point {key} at your image folder, {_MAKE_DATA_HINT}."
        )
    return root, meta


def _resolve_rows(rows: list[tuple[int, dict]], root: Path, allow_outside_root: bool, *, folder: bool = False
                  ) -> tuple[list[Record], dict[str, list[str]]]:
    """Records for the rows that name a usable image, and every other row filed by what is wrong
    with it (as ``row n: 'name'``, or the name alone in a kohya ``folder``)."""
    records: list[Record] = []
    problems: dict[str, list[str]] = {k: [] for k in PROBLEMS}
    bad_names, bad_texts, outside, links, missing, folders, not_images, duplicates = (problems[k] for k in PROBLEMS)
    seen: dict[Path, tuple[int, str]] = {}
    for n, row in rows:
        raw = row.get("file_name")
        if raw is not None and not isinstance(raw, str):  # jsonl: a number, list, object...
            bad_names.append(f"row {n}: {show_value(raw)}")
            continue
        captions = _captions(row.get("text"))
        if captions is None:
            bad_texts.append(f"row {n}: {show_value(row.get('text'))}")
            continue
        name = (raw or "").strip()
        if not name:
            missing.append(f"row {n}: {name!r}")
            continue
        path = Path(os.path.normpath(root / name))  # ./a.png, x/../a.png, x//a.png: one file
        if path in seen:
            first_row, first_name = seen[path]
            duplicates.append(
                f"{first_name!r} (rows {first_row} and {n})" if name == first_name
                else f"{first_name!r} (row {first_row}) and {name!r} (row {n}), the same file"
            )
            continue
        seen[path] = (n, name)
        if not path.is_relative_to(root) and not allow_outside_root:
            outside.append(f"row {n}: {show_value(name)} is {path}")
            continue
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError as err:  # e.g. a name longer than the file system allows
            missing.append(f"row {n}: {show_value(name)} ({err.strerror or err})")
            continue
        if is_dir:
            folders.append(f"row {n}: {show_value(name)}")
        elif not is_file and (link := _link_problem(path)):
            links.append(f"{show_value(name)} ({link})" if folder else f"row {n}: {show_value(name)} ({link})")
        elif not is_file:
            missing.append(show_value(name) if folder else f"row {n}: {show_value(name)}")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            not_images.append(f"row {n}: {show_value(name)}")
        else:
            records.append(Record(path=path, text=captions[0], alternatives=captions if len(captions) > 1 else ()))
    return records, problems


#: Kinds of bad metadata rows, in the order their errors are reported.
PROBLEMS = ("bad_names", "bad_texts", "outside", "links", "missing", "folders", "not_images", "duplicates")


def _raise_problems(problems: dict[str, list[str]], meta: Path | str, root: Path, *, folder: bool = False) -> None:
    """One error for the first kind of bad row found, listing the rows and the fix (the files, in
    a kohya ``folder``, which has no metadata file to correct)."""
    bad_names, bad_texts, outside, links, missing, folders, not_images, duplicates = (problems[k] for k in PROBLEMS)
    if bad_names:
        raise DataError(
            f"{meta} has {len(bad_names)} file_name value(s) that are not a path: {_listing(bad_names)}. "
            'Fix: write file_name as a string, e.g. "file_name": "images/a.png".'
        )
    if bad_texts:
        raise DataError(
            f"{meta} has {len(bad_texts)} text value(s) that are not a caption: {_listing(bad_texts)}. "
            'Fix: write text as a string, e.g. "text": "a photo of sks", or as a list of non-empty '
            'strings, e.g. "text": ["a photo of sks", "sks on a beach"] (alternative captions, one '
            "picked per training sample)."
        )
    if outside:
        raise DataError(
            f"{meta} names {len(outside)} file(s) outside the dataset folder {root}: {_listing(outside)}. "
            "Fix: move those images into the dataset folder and give file_name relative to it, "
            "or set data.allow_outside_root=true to train on them where they are."
        )
    if links:
        raise DataError(
            f"{meta} {'has' if folder else 'names'} {len(links)} image file(s) that are symbolic links leading to "
            f"no file: {_listing(links)}. Fix: point each link at an image file, or remove it"
            f"{'' if folder else ' and its row'}."
        )
    if missing and folder:  # a file that went away while the folder was read
        raise DataError(
            f"{len(missing)} image file(s) in {root} went away while the folder was read: {_listing(missing)}. "
            "Fix: leave the folder unchanged while a run starts."
        )
    if missing:
        raise DataError(
            f"{meta} names {len(missing)} file(s) that do not exist under {root}: {_listing(missing)}. "
            "Fix: correct file_name (paths are relative to the metadata file's folder) or remove those rows."
        )
    if folders:
        raise DataError(
            f"{meta} names {len(folders)} folder(s) where an image file belongs: {_listing(folders)}. "
            "Fix: give each row the path of one image file, e.g. images/a.png."
        )
    if not_images:
        raise DataError(
            f"{meta} names {len(not_images)} file(s) that are not images: {'; '.join(not_images[:5])}. "
            f"Supported suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}."
        )
    if duplicates:
        raise DataError(
            f"{meta} lists {len(duplicates)} file_name(s) more than once: {_listing(duplicates)}. "
            "Fix: keep one row per image (use data.repeats to train some images more often)."
        )


def _check_images(records: list[Record], meta: Path, bad_images: str) -> list[Record]:
    """Decode every image (a few threads; a progress bar for large sets); report or drop the bad.

    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off meanwhile: some libraries (data-juicer)
    switch it on at import, which would let a cut-off file pass here and train on grey pixels.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, ImageFile
    from tqdm.auto import tqdm

    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    reasons: list[str | None] = []
    try:
        with (
            warnings.catch_warnings(),
            ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="sdtune-check") as pool,
            tqdm(total=len(records), desc="checking images", unit="img", disable=len(records) <= _PROGRESS_OVER) as bar,
        ):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # image_problem refuses those itself
            for why in pool.map(image_problem, [r.path for r in records]):
                reasons.append(why)
                bar.update()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    bad = [(r, why) for r, why in zip(records, reasons) if why]
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
