"""The tiny random models (built once per checkout into the shared cache) and fixed UNet inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.families.tiny import ensure_tiny_model

from .paths import CACHE


def tiny_model(family: str) -> Path:
    return ensure_tiny_model(family, CACHE / f"tiny-{family}")


def unet_inputs(family: str, batch: int = 2, seed: int = 0) -> tuple:
    """A fixed random (sample, timesteps, kwargs) for a tiny UNet of ``family``."""
    g = torch.Generator().manual_seed(seed)
    ctx_dim, seq, pooled = {"sd15": (32, 77, None), "sdxl": (80, 77, 48), "kolors": (32, 256, 32)}[family]
    kwargs = {"encoder_hidden_states": torch.randn(batch, seq, ctx_dim, generator=g)}
    if pooled:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)), kwargs
