"""On-disk cache of VAE latent distributions.

A file holds ``latent_dist.parameters`` (mean and log-variance) for one image crop, so training
samples from it exactly as it would from a fresh encode. The file name hashes everything the
values depend on: the model and VAE (path and dtype), the image file's content hash, the crop size
(bucket) and whether it is mirrored. A changed image or resolution therefore never reuses a stale
latent, and an unchanged one is never encoded twice.
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

    def key(self, content_hash: str, size: tuple[int, int], flip: bool) -> str:
        raw = json.dumps([self.model_key, content_hash, list(size), bool(flip), "center-crop"])
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> torch.Tensor:
        return load_file(str(self.path(key)))["latent_params"]

    def save(self, key: str, params: torch.Tensor) -> None:
        with atomic_path(self.path(key)) as tmp:
            save_file({"latent_params": params.detach().to("cpu").contiguous()}, str(tmp))
