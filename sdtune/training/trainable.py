"""Turn a frozen base model into what one training run trains: precision, LoRA layers, switches.

Shared by the LightningModule and anything that builds the same trainable UNet (the bench's FLOP
count, tests), so every path trains exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sdtune.families import ModelParts
from sdtune.lora.layers import LoraSpec, inject
from sdtune.training.speed import apply_speed

#: Lightning precision setting -> dtype of the frozen base weights. LoRA weights stay fp32.
WEIGHT_DTYPES = {
    "32": torch.float32,
    "32-true": torch.float32,
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,  # everything in bf16, LoRA included (FSDP needs one dtype per flat parameter)
}


def weight_dtype(trainer_cfg: Mapping[str, Any]) -> torch.dtype:
    """dtype of the frozen base weights for ``trainer.precision``."""
    return WEIGHT_DTYPES.get(str(trainer_cfg.get("precision", "32")), torch.float32)


def prepare_for_training(parts: ModelParts, cfg: Mapping[str, Any], spec: LoraSpec, dtype: torch.dtype) -> None:
    """Freeze ``parts`` in ``dtype``, add ``spec``'s LoRA layers (kept in fp32), and apply the run's
    gradient checkpointing, speed switches and prediction type."""
    from diffusers.training_utils import cast_training_params

    train_cfg = cfg["train"]
    for module in (parts.unet, *parts.frozen_modules()):
        module.requires_grad_(False)
        if module.dtype != dtype:  # parts loaded elsewhere (tests, bench)
            module.to(dtype=dtype)
    for module in parts.frozen_modules():
        module.eval()
    parts.unet.train()  # LoRA dropout and diffusers' gradient checkpointing act in train mode only
    lora_cfg = cfg["lora"]
    inject(parts.unet, spec, dropout=float(lora_cfg.get("dropout", 0.0)), init=lora_cfg.get("init", "gaussian"))
    cast_training_params(parts.unet, dtype=torch.float32)  # LoRA weights train in fp32
    if train_cfg.get("gradient_checkpointing"):
        parts.unet.enable_gradient_checkpointing()
    apply_speed(parts, cfg.get("speed") or {})
    prediction_type = train_cfg.get("prediction_type")
    if prediction_type:
        parts.noise_scheduler.register_to_config(prediction_type=prediction_type)
