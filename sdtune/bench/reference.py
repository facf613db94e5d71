"""The plain PyTorch loop a user would otherwise write, timed the same way as sdtune.

It follows diffusers' ``train_text_to_image_lora.py`` (and, for the flow-matching families,
``train_dreambooth_lora_{flux,sd3}.py``): freeze the base, inject LoRA with peft (through
``sdtune.lora.layers.inject``, so the denoiser is the same), keep LoRA weights in fp32, then per step
encode the images with the VAE and the captions with the text encoder(s), draw the batch's timesteps
at once, noise the latents, predict, take the (weighted) MSE, ``backward``, clip, ``AdamW.step``,
``zero_grad``. The maths (noising, target, timestep draw, weights) is the family's objective's. Autocast is on when the
precision asks for it (``bf16-mixed``/``16-mixed``, the latter with a GradScaler on CUDA). The
batches come from the same :class:`~sdtune.data.datamodule.ImageCaptionDataModule` as sdtune's, so data
loading costs the same; only the model-specific conditioning (which encoders, which denoiser
keyword arguments) is borrowed from the family, as a user would copy it from diffusers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from sdtune.bench.measure import MemoryMeter, StepClock, batch_size_of
from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.families import ModelParts, get_family
from sdtune.lora.layers import inject, spec_from_config, trainable_lora_parameters
from sdtune.training.trainable import WEIGHT_DTYPES


def _batches(loader) -> Iterator[dict[str, Any]]:
    while True:  # epochs, as long as the caller wants
        yield from loader


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def prepare(parts: ModelParts, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze and cast the base, add LoRA (fp32) to the denoiser, move everything to ``device``."""
    family = get_family(cfg["model"]["family"])
    for module in (parts.denoiser, parts.vae, *parts.text_encoders):
        module.requires_grad_(False)
        if next(module.parameters()).dtype != dtype:  # (diffusers warns about any .to(dtype) on a VAE)
            module.to(dtype=dtype)
        module.to(device)
    for module in (parts.vae, *parts.text_encoders):
        module.eval()
    parts.denoiser.train()
    lora_cfg = cfg["lora"]
    inject(parts.denoiser, spec_from_config(lora_cfg, family.default_lora_targets), init=lora_cfg.get("init", "gaussian"))
    params = trainable_lora_parameters(parts.denoiser)
    if not str(cfg["trainer"].get("precision", "32")).endswith("-true") or dtype == torch.float32:
        for p in params:  # LoRA trains in fp32 unless the precision is pure low precision (bf16-true)
            p.data = p.data.float()
    if cfg["train"].get("gradient_checkpointing"):
        parts.denoiser.enable_gradient_checkpointing()
    return params


def _optimization(cfg: dict[str, Any], params, device: torch.device, precision: str, dtype: torch.dtype):
    """AdamW, a constant LR schedule (as the bench config), autocast and the fp16 grad scaler."""
    opt_cfg = cfg["optim"]["optimizer"]
    optimizer = torch.optim.AdamW(
        params, lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]), weight_decay=opt_cfg["weight_decay"], eps=opt_cfg["eps"]
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if precision in ("16-mixed", "bf16-mixed") else contextlib.nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" and device.type == "cuda" else None
    return optimizer, lr_schedule, autocast, scaler


def run_reference(
    cfg: dict[str, Any],
    records,
    parts: ModelParts,
    *,
    device: torch.device,
    steps: int,
    clock: StepClock,
    meter: MemoryMeter,
) -> None:
    """Train ``steps`` iterations of the plain loop on ``parts``, ticking ``clock`` after each."""
    family = get_family(cfg["model"]["family"])
    precision = str(cfg["trainer"].get("precision", "32"))
    dtype = WEIGHT_DTYPES.get(precision, torch.float32)
    params = prepare(parts, cfg, device, dtype)
    optimizer, lr_schedule, autocast, scaler = _optimization(cfg, params, device, precision, dtype)
    clip = cfg["trainer"].get("gradient_clip_val")
    denoiser, vae = parts.denoiser, parts.vae
    objective = family.objective(parts, cfg["train"])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    datamodule = ImageCaptionDataModule.from_config(records, cfg["data"], seed=int(cfg.get("seed", 0)))

    meter.begin_loop()
    clock.start()
    for i, batch in enumerate(_batches(datamodule.train_dataloader())):
        if i == steps:
            break
        pixels = batch["pixel_values"].to(device, dtype=dtype, non_blocking=True)
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample().float() - shift) * vae.config.scaling_factor
            text = family.encode_prompts(parts, batch["text"])
        noise = torch.randn_like(latents)
        timesteps = objective.batch_timesteps(latents.shape[0], tuple(latents.shape)).to(device)
        noisy = objective.noisy(latents, noise, timesteps)
        target = objective.target(latents, noise, timesteps)
        cond = _to_device(objective.conditioning(family.conditioning(text, batch), latents.shape[0]), device)
        with autocast:
            pred = family.predict(denoiser, noisy.to(dtype), objective.model_timestep(timesteps), cond)
        weights = objective.weights(timesteps)
        if weights is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:  # per-sample weights (min-SNR, SD3's sigma weightings): each sample's mean error, weighted
            loss = (F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1) * weights).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(batch_size_of(batch))
