"""The optimizer and learning-rate schedule of a run, from ``optim.*`` (what ``configure_optimizers`` returns)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate


def build_optimization(optim_cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any], params: Iterable[torch.nn.Parameter],
                       *, device: torch.device, total_steps: int) -> dict[str, Any]:
    """``optim.optimizer`` (a ``_target_`` users swap) over ``params`` and diffusers' ``get_scheduler``
    stepping every optimizer step over ``total_steps``, in Lightning's return form."""
    from diffusers.optimization import get_scheduler

    extra = {}
    if optim_cfg["optimizer"].get("fused", "absent") is None:
        # The fused kernel needs CUDA, and Lightning cannot clip gradients of an optimizer that
        # unscales them itself under mixed precision.
        clipping = bool(trainer_cfg.get("gradient_clip_val"))
        mixed = str(trainer_cfg.get("precision", "32")).endswith("mixed")
        extra["fused"] = device.type == "cuda" and not (clipping and mixed)
    optimizer = instantiate(optim_cfg["optimizer"], **extra)(params=list(params))
    sched_cfg = optim_cfg["scheduler"]
    extra_sched = {k: sched_cfg[k] for k in ("num_cycles", "power", "step_rules") if sched_cfg.get(k) is not None}
    scheduler = get_scheduler(
        sched_cfg["name"],
        optimizer,
        num_warmup_steps=int(sched_cfg.get("warmup_steps", 0)),
        num_training_steps=total_steps,
        **extra_sched,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
