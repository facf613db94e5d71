"""Pictures made in the test: smooth random images, files with sidecar captions, decompression bombs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def textured(seed: int, w: int, h: int) -> Image.Image:
    """A smooth random picture: distinct per seed, with gradients a difference hash can see."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)


def add(root: Path, name: str, image: Image.Image | bytes | None, caption: str | None, **save) -> Path:
    """Write ``root/name`` (an image, raw bytes, or nothing) and its sidecar caption."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    elif image is not None:
        image.save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def bomb_png(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels (Pillow checks the size before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
