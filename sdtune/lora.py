"""LoRA layers on the UNet, through peft.

peft does the injection and the maths (``W x + (alpha / r) · B A x``); this module only turns our
config into a ``LoraConfig`` and names the trainable tensors consistently between the live model,
Lightning checkpoints and exported files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

ADAPTER = "default"  # peft's adapter name inside the training UNet


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA is, independent of its weights: written to every file and checkpoint."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_from_config(lora_cfg: Mapping[str, Any], default_targets: tuple[str, ...]) -> LoraSpec:
    targets = lora_cfg.get("targets") or default_targets
    alpha = lora_cfg.get("alpha")
    return LoraSpec(
        rank=int(lora_cfg["rank"]),
        alpha=float(lora_cfg["rank"] if alpha is None else alpha),
        targets=tuple(targets),
    )


def peft_config(spec: LoraSpec, *, dropout: float = 0.0, init: str | bool = "gaussian"):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=dropout,
        init_lora_weights=init,
    )


def inject(
    unet: torch.nn.Module,
    spec: LoraSpec,
    *,
    dropout: float = 0.0,
    init: str | bool = "gaussian",
    adapter_name: str = ADAPTER,
) -> None:
    """Add trainable LoRA layers to ``unet`` in place (diffusers' peft integration)."""
    unet.add_adapter(peft_config(spec, dropout=dropout, init=init), adapter_name=adapter_name)


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def module_key_to_peft(key: str, prefix: str = "unet.") -> str:
    """``unet.<m>.lora_A.default.weight`` (a module's state dict) -> ``<m>.lora_A.weight`` (peft's)."""
    if key.startswith(prefix):
        key = key[len(prefix):]
    return key.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")


def lora_tensors(module_state: Mapping[str, torch.Tensor], prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """peft-named LoRA tensors from a (LightningModule) state dict, contiguous and on the CPU.

    Used both for the live model at the end of ``fit`` and for a checkpoint's ``state_dict``, so the
    two exports agree key for key and value for value.
    """
    return {
        module_key_to_peft(k, prefix): v.detach().to("cpu", copy=True).contiguous()
        for k, v in module_state.items()
        if k.startswith(prefix) and is_lora_key(k)
    }


def trainable_lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if is_lora_key(n) and p.requires_grad]
