"""FLOPs of one training step, counted on the meta device through the real LoRATrainingModule.

The count is the UNet forward plus the backward of the loss, with the base frozen and LoRA
trainable, exactly as ``diffusion_loss`` runs it: activation gradients flow back through every
layer, weight gradients exist only for the LoRA matrices, and the counter sees precisely that.
On the meta device nothing is allocated (SDXL's UNet alone is 2.6B parameters) and attention is
counted through SDPA's meta kernel; on a real CPU the flash-attention kernel is invisible to
``FlopCounterMode``, which would under-count SD1.5 by ~20%. Gradient checkpointing and compile
are switched off for the count: MFU conventionally uses model FLOPs, not recomputed ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdtune.families import get_family
from sdtune.families.arch import architecture, build_random_parts
from sdtune.training.module import LoRATrainingModule


def _batch_geometry(batch: dict[str, Any], vae_factor: int) -> tuple[int, int, int]:
    """(images, latent height, latent width) of a collated batch, from pixels or cached latents."""
    if "pixel_values" in batch:
        b, _, h, w = batch["pixel_values"].shape
        return b, h // vae_factor, w // vae_factor
    b, _, h, w = batch["latent_params"].shape
    return b, h, w


def count_step_flops(cfg: dict[str, Any], batch: dict[str, Any], *, folder: str | Path | None = None) -> dict[str, float]:
    """FLOPs per image of the UNet forward and forward+backward for ``cfg``'s model on ``batch``'s shape.

    ``folder`` is a diffusers folder whose configs describe the model (the tiny models); None uses
    the shipped full-size configs. Returns ``{"fwd": ..., "fwd_bwd": ..., "images": B}``.
    """
    cfg = copy.deepcopy(cfg)
    cfg["train"]["gradient_checkpointing"] = False
    cfg["speed"] = {**(cfg.get("speed") or {}), "compile": False, "attention": "sdpa", "channels_last": False}
    family = get_family(cfg["model"]["family"])
    module = LoRATrainingModule(cfg)
    module.attach(build_random_parts(family, device="meta", dtype=module.weight_dtype, folder=folder))
    arch = architecture(family, folder)
    vae_factor = 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    images, h, w = _batch_geometry(batch, vae_factor)
    meta = torch.device("meta")
    latents = torch.zeros(images, arch["vae"]["latent_channels"], h, w, device=meta)
    text = {k: torch.zeros(images, *shape, device=meta, dtype=module.weight_dtype) for k, shape in family.text_shapes(arch).items()}
    noise = torch.zeros_like(latents)
    timesteps = module.objective.dummy_timesteps(images, meta)

    with torch.no_grad(), FlopCounterMode(display=False) as fwd_counter:
        module.diffusion_loss(latents, text, batch, noise=noise, timesteps=timesteps)
    with FlopCounterMode(display=False) as step_counter:
        loss = module.diffusion_loss(latents, text, batch, noise=noise, timesteps=timesteps)
        loss.backward()
    return {
        "fwd": fwd_counter.get_total_flops() / images,
        "fwd_bwd": step_counter.get_total_flops() / images,
        "images": float(images),
        "lora_params": float(module.trainable_parameter_count()),
    }
