"""Turn a frozen base model into what one training run trains: precision, LoRA layers, switches.

Shared by the LightningModule and anything that builds the same trainable denoiser (the bench's FLOP
count, tests), so every path trains exactly the same thing. The prediction type is the objective's
(:meth:`sdtune.families.base.ModelFamily.objective`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sdtune.families import ModelFamily, ModelParts
from sdtune.families.quantize_load import is_quantized
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


def prepare_for_training(parts: ModelParts, cfg: Mapping[str, Any], spec: LoraSpec, dtype: torch.dtype,
                         family: ModelFamily) -> None:
    """Freeze ``parts`` in ``dtype``, add ``spec``'s LoRA layers to ``family``'s denoiser (kept in
    fp32, also on a quantized denoiser: peft's quantized LoRA layers compute the frozen path in the
    base's dtype), and apply the run's gradient checkpointing and speed switches."""
    from diffusers.training_utils import cast_training_params

    train_cfg = cfg["train"]
    denoiser = parts.denoiser
    for module in (denoiser, *parts.frozen_modules()):
        module.requires_grad_(False)
        # parts loaded elsewhere (tests, bench) are cast; a quantized part loaded in its dtype stays as
        # it is (diffusers refuses to cast one, and a cast would undo the quantization)
        if module.dtype != dtype and not is_quantized(module):
            module.to(dtype=dtype)
    for module in parts.frozen_modules():
        module.eval()
    denoiser.train()  # LoRA dropout and diffusers' gradient checkpointing act in train mode only
    lora_cfg = cfg["lora"]
    inject(denoiser, spec, dropout=float(lora_cfg.get("dropout", 0.0)), init=lora_cfg.get("init", "gaussian"))
    cast_training_params(denoiser, dtype=torch.float32)  # LoRA weights train in fp32
    if train_cfg.get("gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    apply_speed(parts, cfg.get("speed") or {}, family)
