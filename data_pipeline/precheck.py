"""Our own checks before data-juicer: every candidate must be a real, fully decodable image.

data-juicer sets ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` on import, which would let truncated
files through, so each check forces it off. Pillow's ``MAX_IMAGE_PIXELS`` limit is kept and its
``DecompressionBombWarning`` counts as an error: such files are dropped, never decoded later.
Modes the trainer converts (RGBA, LA, P, CMYK, 16-bit, EXIF-rotated) pass unchanged.

Checks run in ``np`` worker processes with a progress bar; results come back in input order.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from data_pipeline.candidates import IMAGE_SUFFIXES, Candidate, Drop

# Reading-time problems that make opening the file pointless.
_FATAL = ("bad record", "missing file", "listed twice", "unsupported file type")
_POOL_MIN = 64  # below this, worker start-up costs more than it saves


def check_image(path: str) -> tuple:
    """``(True, width, height, mode)`` for a usable image, else ``(False, code, detail)``."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return (False, "missing file", err.strerror or "cannot stat the file")
    if size == 0:
        return (False, "zero-byte file", "")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return (True, im.width, im.height, im.mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return (False, "decompression bomb", str(err))
    except UnidentifiedImageError:
        return (False, "not an image", "Pillow cannot identify the file format")
    except Exception as err:  # truncated data, corrupt streams, unsupported compression
        return (False, "unreadable image", f"{type(err).__name__}: {err}")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _map(paths: list[str], np_workers: int):
    """Yield ``check_image`` results in order, in a worker pool when it pays off."""
    if np_workers <= 1 or len(paths) < _POOL_MIN:
        yield from map(check_image, paths)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunk = max(1, min(64, len(paths) // (np_workers * 8)))
    with ctx.Pool(np_workers) as pool:
        yield from pool.imap(check_image, paths, chunksize=chunk)


def run_prechecks(candidates: list[Candidate], np_workers: int = 1) -> tuple[list[tuple[Candidate, tuple]], list[Drop]]:
    """Split candidates into ``(candidate, (width, height, mode))`` survivors and drops."""
    passed, drops, to_open = [], [], []
    for cand in candidates:
        problem = cand.problem
        if problem is None or problem[0] not in _FATAL:
            suffix = cand.path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES:
                problem = (
                    "unsupported file type",
                    f"{suffix or 'no suffix'}; sdtune reads {', '.join(sorted(IMAGE_SUFFIXES))}",
                )
        if problem is not None and problem[0] in _FATAL:
            drops.append(Drop.precheck(cand.key, *problem))
        else:
            to_open.append(cand)
    results = _map([str(c.path) for c in to_open], np_workers)
    for cand, result in tqdm(zip(to_open, results), total=len(to_open), desc="pre-check", unit="img"):
        if not result[0]:
            drops.append(Drop.precheck(cand.key, result[1], result[2]))
        elif cand.problem is not None:
            drops.append(Drop.precheck(cand.key, *cand.problem))
        else:
            passed.append((cand, result[1:]))
    return passed, drops
