"""On-disk cache of VAE latent distributions.

A file holds ``latent_dist.parameters`` (mean and log-variance) for one image crop, so training
samples from it exactly as it would from a fresh encode. The file name hashes everything the
values depend on: the model and VAE (path and dtype), the image file's content hash, the crop size
(bucket) and whether it is mirrored. A changed image or resolution therefore never reuses a stale
latent, and an unchanged one is never encoded twice. With ``train.masked_loss`` the file also
holds the crop's loss mask on the latent grid (``mask``), and the key holds the mask file's hash,
so a changed mask is a new entry too.

Once filled, a run reads each entry once into a :class:`LatentStore` (memory, training dtype);
``data.cache_memory=disk`` (or a cache too large for the memory) keeps serving from the files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdtune.utils.errors import ConfigError
from sdtune.utils.io import atomic_path


def check_cacheable(center_crop: bool) -> None:
    """The latent cache stores one crop per image, so it needs the deterministic centre crop."""
    if not center_crop:
        raise ConfigError(
            "data.cache_latents=true needs data.center_crop=true: a cached latent is one fixed crop. "
            "Fix: set data.center_crop=true, or turn the latent cache off."
        )


class LatentCache:
    def __init__(self, folder: str | Path, model_key: str):
        self.folder = Path(folder)
        self.model_key = model_key

    def key(self, content_hash: str, size: tuple[int, int], flip: bool, mask: str | None = None) -> str:
        parts = [self.model_key, content_hash, list(size), bool(flip), "center-crop"]
        raw = json.dumps(parts if mask is None else [*parts, f"mask={mask}"])
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> torch.Tensor:
        return load_file(str(self.path(key)))["latent_params"]

    def load_all(self, key: str) -> dict[str, torch.Tensor]:
        """``latent_params`` and, for a masked entry, its latent-grid ``mask``."""
        return load_file(str(self.path(key)))

    def serve(self, key: str) -> dict[str, torch.Tensor]:
        """A sample's cached fields, read from the file now (``data.cache_memory=disk``)."""
        entry = self.load_all(key)
        return {"latent_params": entry["latent_params"], **({"latent_mask": entry["mask"]} if "mask" in entry else {})}

    def save(self, key: str, params: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        tensors = {"latent_params": params.detach().to("cpu").contiguous()}
        if mask is not None:
            tensors["mask"] = mask.detach().to("cpu", torch.float32).contiguous()
        with atomic_path(self.path(key)) as tmp:
            save_file(tensors, str(tmp))


class LatentStore:
    """Every cache entry a run serves, read once, in the training dtype, stacked per shape.

    ``where[key]`` is an entry's (group, row): one group per shape (bucket), so a batch, which has
    one shape, is one ``index_select``. Held in CPU memory, the data loader serves an entry's rows
    (:meth:`serve`); held on the training device, a sample carries only its (group, row) and the
    module gathers the batch there (:meth:`gather`), so no CUDA tensor enters a data-loader worker
    (the device tensors are not even pickled into one, see ``__getstate__``).
    """

    def __init__(self, entries: Mapping[str, Mapping[str, torch.Tensor]], *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", on_device: bool = False):
        by_shape: dict[tuple, list[str]] = {}
        for key, entry in entries.items():
            by_shape.setdefault(tuple((n, tuple(t.shape)) for n, t in sorted(entry.items())), []).append(key)
        self.on_device = on_device
        self.device = torch.device(device)
        self.dtype = dtype
        self.where: dict[str, tuple[int, int]] = {}
        self.groups: list[dict[str, torch.Tensor]] | None = []
        for group, keys in enumerate(by_shape.values()):
            names = entries[keys[0]].keys()
            self.groups.append({n: torch.stack([entries[k][n] for k in keys]).to(self.device, dtype) for n in names})
            self.where.update({k: (group, row) for row, k in enumerate(keys)})

    def __len__(self) -> int:
        return len(self.where)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups or [] for t in g.values())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.on_device:  # a worker needs only where[]; CUDA tensors must not cross processes
            state["groups"] = None
        return state

    def serve(self, key: str) -> dict[str, Any]:
        """A sample's cached fields: the rows themselves (CPU store) or their index (device store)."""
        group, row = self.where[key]
        if self.on_device:
            return {"latent_index": (group, row)}
        tensors = self.groups[group]
        return {"latent_params": tensors["latent_params"][row],
                **({"latent_mask": tensors["mask"][row]} if "mask" in tensors else {})}

    def latent_shape(self, group: int) -> tuple[int, int, int]:
        """(channels, height, width) of one latent of ``group`` (its parameters hold mean and log-variance)."""
        c2, h, w = self.groups[group]["latent_params"].shape[1:]
        return c2 // 2, h, w

    def gather(self, group: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch's ``latent_params`` (and ``latent_mask``) from its rows of ``group``, on the store's device."""
        tensors = self.groups[group]
        rows = rows.to(self.device, non_blocking=True)
        out = {"latent_params": tensors["latent_params"].index_select(0, rows)}
        if "mask" in tensors:
            out["latent_mask"] = tensors["mask"].index_select(0, rows)
        return out
