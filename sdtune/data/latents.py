"""On-disk cache of VAE latent distributions.

A file holds ``latent_dist.parameters`` (mean and log-variance) for one image crop, so training
samples from it exactly as it would from a fresh encode. The file name hashes everything the
values depend on: the model and VAE (path and dtype), the image file's content hash, the crop size
(bucket) and whether it is mirrored. A changed image or resolution therefore never reuses a stale
latent, and an unchanged one is never encoded twice. With ``train.masked_loss`` the file also
holds the crop's loss mask on the latent grid (``mask``), and the key holds the mask file's hash,
so a changed mask is a new entry too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..io import atomic_path


def check_cacheable(center_crop: bool) -> None:
    """The latent cache stores one crop per image, so it needs the deterministic centre crop."""
    if not center_crop:
        raise ConfigError(
            "data.cache_latents=true needs data.center_crop=true: a cached latent is one fixed crop. "
            "Fix: set data.center_crop=true, or turn the latent cache off."
        )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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

    def save(self, key: str, params: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        tensors = {"latent_params": params.detach().to("cpu").contiguous()}
        if mask is not None:
            tensors["mask"] = mask.detach().to("cpu", torch.float32).contiguous()
        with atomic_path(self.path(key)) as tmp:
            save_file(tensors, str(tmp))
