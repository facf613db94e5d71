"""Speed switches applied to the loaded model: memory format, attention kernel, TF32, compile.

Each is a plain config switch under ``speed:`` and each is measured in ``make bench``
(docs/benchmarks.md); :func:`check_config` checks them, and refuses those a family's denoiser has
no use for, before anything loads. They change how the denoiser runs, never what it computes beyond float
rounding, so the loss stays within tolerance of the default path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from sdtune.config.values import Settings
from sdtune.families import ModelFamily, ModelParts, get_family
from sdtune.utils.errors import ConfigError

log = logging.getLogger(__name__)
ATTENTION = ("sdpa", "xformers")


def check_config(cfg: DictConfig) -> None:
    """``speed.*``: the attention kernel is one sdtune has, the switches are switches, and none is
    one the family refuses for its denoiser (:attr:`~sdtune.families.base.ModelFamily.speed_refusals`)."""
    s = Settings(cfg)
    if s.get("speed.attention") is not None:
        s.choice("speed.attention", ATTENTION, fix="speed.attention=sdpa (PyTorch's fused attention, the default).")
    for key in ("speed.channels_last", "speed.tf32", "speed.compile"):
        s.boolean(key, optional=True)
    family = get_family(s.get("model.family"))
    for setting, why in family.speed_refusals.items():
        key, _, value = setting.partition("=")
        current = s.get(key)
        if str(current).lower() == value.lower():
            raise ConfigError(f"{setting} does not apply to model.family={family.name}: {why}.")


def apply_speed(parts: ModelParts, speed: Mapping[str, Any], family: ModelFamily) -> None:
    """Apply the ``speed`` settings to ``parts`` in place (after the LoRA layers are added); the
    default attention is ``family``'s SDPA path (:meth:`~sdtune.families.base.ModelFamily.enable_sdpa`)."""
    if speed.get("tf32"):
        # Ampere and newer: TF32 tensor cores for fp32 matmuls and convolutions.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    attention = speed.get("attention", "sdpa")
    if attention not in ATTENTION:
        raise ConfigError(f"speed.attention={attention!r}; choose one of {list(ATTENTION)}.")
    if attention == "xformers":
        try:
            parts.denoiser.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as err:
            raise ConfigError(f"speed.attention=xformers needs the xformers package and a GPU ({err}). Fix: speed.attention=sdpa.") from None
    else:
        family.enable_sdpa(parts.denoiser)  # PyTorch's fused scaled-dot-product attention
    if speed.get("channels_last"):
        parts.denoiser.to(memory_format=torch.channels_last)
        parts.vae.to(memory_format=torch.channels_last)
    if speed.get("compile"):
        # In place (nn.Module.compile), so parameter names and checkpoints stay the same.
        parts.denoiser.compile(mode=speed.get("compile_mode") or None)
        log.info("denoiser compiled with torch.compile (first steps are slow while it compiles)")
