"""Image fingerprints and the duplicate plan behind ``sdtune_image_deduplicator``.

* ``sha256``: the file's bytes; equal only for byte-identical files.
* ``dhash``: a difference hash of what training sees (EXIF-rotated, alpha on white, 16-bit scaled
  to 8-bit, grey, shrunk to ``(hash_size + 1) x hash_size``); one bit per horizontal neighbour
  pair. Re-encoding, resizing or a slight brightness change moves only a few bits, so two files
  within ``max_distance`` differing bits are near duplicates. Flat, featureless images all hash
  alike (no gradients), which is a known property of difference hashes.

``plan_duplicates`` keeps the first occurrence in input order and maps every later duplicate to
the first kept image within range. Near matching uses the pigeonhole principle: split the bits
into ``max_distance + 1`` bands; two hashes within that distance agree exactly on at least one
band, so only hashes sharing a band are compared.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
from PIL import Image

from sdtune.data.images import to_rgb

METHODS = ("sha256", "dhash")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _grey(image: Image.Image) -> Image.Image:
    """8-bit greyscale of exactly the picture training sees (sdtune's own ``to_rgb``: EXIF
    orientation, 16-bit scaling, transparency on white), so dedup and training never disagree."""
    return to_rgb(image).convert("L")


def dhash_file(path: str, hash_size: int = 8) -> str:
    """Difference hash as ``hash_size**2`` bits in fixed-width hex."""
    with Image.open(path) as image:
        image.load()
        small = _grey(image).resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.int16)
    bits = (arr[:, 1:] > arr[:, :-1]).flatten()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return f"{value:0{(bits.size + 3) // 4}x}"


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _band_keys(value: int, nbits: int, nbands: int) -> list[tuple[int, int]]:
    bounds = [round(i * nbits / nbands) for i in range(nbands + 1)]
    return [(i, (value >> lo) & ((1 << (hi - lo)) - 1)) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def plan_duplicates(hashes: list[str], max_distance: int = 0) -> dict[int, tuple[int, int]]:
    """``{dropped index: (kept index, distance)}``; empty hashes are never duplicates."""
    dropped: dict[int, tuple[int, int]] = {}
    if max_distance <= 0:
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            if not h:
                continue
            if h in first:
                dropped[i] = (first[h], 0)
            else:
                first[h] = i
        return dropped
    index: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if not h or "," in h:  # several images per sample: exact matching only
            continue
        nbits = len(h) * 4
        nbands = min(max_distance + 1, nbits)
        keys = [(nbits, *k) for k in _band_keys(int(h, 16), nbits, nbands)]
        near = sorted({j for k in keys for j in index.get(k, ())})
        match = next(((j, d) for j in near if (d := hamming(hashes[j], h)) <= max_distance), None)
        if match is not None:
            dropped[i] = match
            continue
        for k in keys:
            index[k].append(i)
    return dropped
