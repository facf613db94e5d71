"""Crash-safe file writing, and the file hashes sdtune records (``generation.json``, the latent cache).

Everything sdtune writes goes to a temporary file in the destination folder and is renamed over
the target only when complete, so a kill at any moment leaves either the old file or the new one,
never a truncated mix. ``os.replace`` is atomic on POSIX and Windows within one filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # data on disk before the rename makes it visible
            os.fsync(fh.fileno())
        # mkstemp (and some writers that replace the file) leave 0600; use the usual umask mode.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_image_atomic(image, target: str | os.PathLike, *, text: dict[str, str] | None = None) -> None:
    """Save a PIL image; the format comes from ``target``'s suffix, not the temporary name.
    ``text`` goes into PNG text chunks (A1111 and ComfyUI read ``parameters`` back)."""
    target = Path(target)
    fmt = target.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    extra = {}
    if text and fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # iTXt: UTF-8, so Chinese prompts survive
        extra["pnginfo"] = info
    with atomic_path(target) as tmp:
        image.save(tmp, format=fmt, **extra)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a whole file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(path: str | os.PathLike) -> str:
    """sha256 of a .safetensors file's tensor bytes (after its header): what A1111 and model sites
    show as a LoRA's hash ("addnet" hash; the first 12 digits in ``Lora hashes``), so it does not
    change when only the header does."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(8 + int.from_bytes(fh.read(8), "little"))
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
