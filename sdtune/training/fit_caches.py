"""What happens once at the start of ``fit``, before the first step: caches and device placement.

Latents (``data.cache_latents``) are encoded once per image and the VAE leaves the device; text
embeddings (``train.cache_text_embeddings``) are encoded once per caption and the text encoders
leave it (what frees Kolors' 12 GB ChatGLM). Both caches are then read once into memory in the
training dtype, on the device while they fit ``data.cache_budget_gb`` (:mod:`sdtune.data.cache_memory`). Sampling brings both back for a moment
(:func:`frozen_modules_on_device`). Kept out of the LightningModule, which only calls
:func:`prepare_fit`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from sdtune.data.cache_memory import CacheMemory
from sdtune.data.latents import LatentCache
from sdtune.data.text_cache import TextEmbeddingCache
from sdtune.training.text_encoders import text_cache_blocker

log = logging.getLogger(__name__)


def prepare_fit(module, datamodule) -> None:
    """Place the text encoders, warn about truncated captions, and fill the caches the config asks for."""
    blocker = text_cache_blocker(module.cfg)
    cache_text = module.cfg["train"].get("cache_text_embeddings", True) and not blocker
    cache_latents = bool(module.cfg["data"].get("cache_latents"))
    with denoiser_parked(module, datamodule is not None and (cache_text or cache_latents)):
        for encoder in module.parts.text_encoders:
            encoder.to(module.device)
        if datamodule is None:
            return
        warn_overlong(module, [c for r in datamodule.dataset.records for c in r.captions])
        memory = CacheMemory.from_config(module.cfg["data"], module.device)  # one device budget for both caches
        if cache_latents:
            fill_latent_cache(module, datamodule, memory)
        if blocker and module.cfg["train"].get("cache_text_embeddings", True):
            log.info(blocker)
        elif cache_text:
            module.text_cache = fill_text_cache(module, datamodule, memory)


@contextlib.contextmanager
def denoiser_parked(module, caching: bool) -> Iterator[None]:
    """While the caches fill on a single GPU, the denoiser (with its LoRA) waits in CPU memory, so
    the text encoders and the VAE have the card to themselves: the frozen parts are then on the GPU
    one after the other, never together (FLUX.1's T5-XXL and transformer, 9 and 22 GiB in bf16). Its
    parameters stay the same objects (the optimizer holds them; its state is still empty). Sharded
    and multi-process strategies keep their placement."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    device = module.device
    park = caching and device.type != "cpu" and isinstance(module.trainer.strategy, SingleDeviceStrategy)
    if park:
        module.parts.denoiser.to("cpu")
        _free_memory(device)
    try:
        yield
    finally:
        if park:
            module.parts.denoiser.to(device)


def warn_overlong(module, captions: list[str]) -> None:
    """One warning per run (not per step) for captions the text encoder will truncate."""
    family, parts = module.family, module.parts
    long = family.overlong_captions(parts, list(dict.fromkeys(captions)))
    if long and module.trainer.is_global_zero:
        log.warning(
            "%d caption(s) are longer than the %d-token limit of the %s text encoder and will be truncated, e.g. %r",
            len(long), family.text_max_length(parts), family.name, long[0][:120],
        )


def fill_latent_cache(module, datamodule, memory: CacheMemory) -> None:
    model_cfg = module.cfg["model"]
    cache = LatentCache(
        module.cfg["data"]["latent_cache_dir"],
        model_key=f"{model_cfg['path']}@{model_cfg.get('revision')}|vae={model_cfg.get('vae_path')}|{module.weight_dtype}",
    )
    vae = module.parts.vae

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels.to(module.device, module.weight_dtype)).latent_dist.parameters.float().cpu()

    datamodule.prepare_latents(encode, cache, memory=memory, dtype=module.weight_dtype)
    module.latent_store = datamodule.latent_store
    vae.to("cpu")  # not needed again until sampling
    _free_memory(module.device)


def fill_text_cache(module, datamodule, memory: CacheMemory) -> TextEmbeddingCache | None:
    captions = datamodule.captions()
    if captions is None:
        log.warning("captions change every step (tag shuffling): text embeddings are computed per step, not cached")
        return None
    model_cfg = module.cfg["model"]
    cache = TextEmbeddingCache(
        module.family,
        module.parts,
        model_key=f"{model_cfg['path']}@{model_cfg.get('revision')}",
        dtype=module.weight_dtype,
        disk_dir=module.cfg["train"].get("text_cache_dir"),
        memory=memory,
    )
    cache.fill(captions)
    for encoder in module.parts.text_encoders:
        encoder.to("cpu")
    _free_memory(module.device)
    return cache


@contextlib.contextmanager
def frozen_modules_on_device(module) -> Iterator[None]:
    """Bring the offloaded text encoders and VAE back to ``module.device`` for sampling, then
    return each to where it was (diffusers' ``offload_models``)."""
    from diffusers.training_utils import offload_models

    try:
        with offload_models(*module.parts.text_encoders, module.parts.vae, device=module.device):
            yield
    finally:
        _free_memory(module.device)


def _free_memory(device: torch.device) -> None:
    if device.type != "cpu":  # diffusers' free_memory: gc, then the accelerator's cache
        from diffusers.training_utils import free_memory

        free_memory()
