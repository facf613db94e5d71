"""Filling the latent cache and reading it once into memory (``data.cache_latents``).

:func:`prepare_latents` encodes what the on-disk cache lacks; :func:`hold_latents` then reads every
entry the run serves exactly once into a :class:`~.latents.LatentStore` in the training dtype,
placed by :class:`~sdtune.data.cache_memory.CacheMemory`, so no training step opens a file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from sdtune.data.buckets import Size
from sdtune.data.cache_memory import CacheMemory
from sdtune.data.images import record_size
from sdtune.data.latents import LatentCache, LatentStore, check_cacheable
from sdtune.data.masks import mask_digest, to_latent_grid
from sdtune.utils.io import file_sha256

#: Pixels one VAE call encodes at most while the latent cache fills: the encoder's activations grow
#: with them (about 1.3 GiB per 1024² picture in bf16), so 8 pictures a call up to 362², 4 at
#: 512², 1 from 725² up (:func:`encode_batch_size`; the memory planner counts the same call).
ENCODE_PIXELS = 4 * 512 * 512


def encode_batch_size(height: int, width: int, cap: int = 8) -> int:
    """Pictures of ``height`` x ``width`` per VAE call when caching latents: at most ``cap``, at least 1."""
    return max(1, min(cap, ENCODE_PIXELS // (height * width)))


@torch.no_grad()
def prepare_latents(ds, encode: Callable[[torch.Tensor], torch.Tensor], cache: LatentCache, *,
                    batch_size: int = 8, fresh: dict[str, dict[str, torch.Tensor]] | None = None) -> int:
    """Fill ``cache`` for every (image, flip) ``ds`` can serve and set ``ds.latent_keys``; the
    entries encoded now are also put in ``fresh`` (key -> tensors as saved).

    With masks, each entry also holds the crop's mask on the latent grid, and its key the mask's digest.
    """
    check_cacheable(ds.center_crop)
    if ds.sizes is None:
        ds.sizes = [record_size(r) for r in ds.records]
    hashes = [file_sha256(r.path) for r in ds.records]
    masks = [mask_digest(m) for m in ds.masks] if ds.masks is not None else None
    flips = (False, True) if ds.random_flip else (False,)
    keys = {(r, f): cache.key(hashes[r], ds.targets[r], f, None if masks is None else masks[r])
            for r in sorted(set(ds.index)) for f in flips}
    todo: dict[Size, list[tuple[int, bool]]] = defaultdict(list)
    for (r, f), key in keys.items():
        if not cache.has(key):
            todo[ds.targets[r]].append((r, f))
    total = sum(len(v) for v in todo.values())
    with tqdm(total=total, desc="caching latents", unit="img", disable=total == 0) as bar:
        for size, items in sorted(todo.items()):
            per_call = encode_batch_size(*size, cap=batch_size)
            for start in range(0, len(items), per_call):
                chunk = items[start : start + per_call]
                crops = [ds.pixels(r, f) for r, f in chunk]  # center crop: no randomness
                for (r, f), (_, info), params in zip(chunk, crops, encode(torch.stack([c[0] for c in crops]))):
                    mask = None
                    if ds.masks is not None:
                        mask = to_latent_grid(ds.mask(r, f, info)[None], tuple(params.shape[-2:]))[0]
                    cache.save(keys[(r, f)], params, mask)
                    if fresh is not None:
                        fresh[keys[(r, f)]] = {"latent_params": params, **({"mask": mask} if mask is not None else {})}
                bar.update(len(chunk))
    # The validation view serves unflipped crops, cached above for every record.
    ds.latent_keys = keys
    return total


def hold_latents(datasets: Sequence, cache: LatentCache, fresh: Mapping[str, Mapping[str, torch.Tensor]],
                 memory: CacheMemory, dtype: torch.dtype) -> LatentStore | None:
    """Every entry ``datasets`` serve, read once (``fresh`` ones not at all) into a store placed by
    ``memory``; None when it stays on disk (``data.cache_memory=disk`` or too large)."""
    targets = {key: ds.targets[r] for ds in datasets for (r, _), key in ds.latent_keys.items()}
    if not targets:
        return None

    def read(key: str) -> dict[str, torch.Tensor]:
        entry = fresh[key] if key in fresh else cache.load_all(key)
        return {name: t.to(dtype) for name, t in entry.items()}

    first = next(iter(targets))
    sample = read(first)
    per_pixel = sum(t.numel() * t.element_size() for t in sample.values()) / (targets[first][0] * targets[first][1])
    estimate = int(per_pixel * sum(h * w for h, w in targets.values()))  # entries scale with their crop's area
    tier = memory.place(estimate, f"latent cache ({len(targets)} entries, {dtype})")
    if tier == "disk":
        return None
    entries = {first: sample}
    for key in tqdm(list(targets)[1:], desc="reading latents", unit="img", disable=len(targets) < 100):
        entries[key] = read(key)
    on_device = tier == "device"
    return LatentStore(entries, dtype=dtype, device=memory.device if on_device else "cpu", on_device=on_device)
