"""The optimizer and learning-rate schedule of a run, from ``optim.*`` (what ``configure_optimizers`` returns).

* ``optim.optimizer`` is a Hydra ``_target_`` (AdamW, 8-bit AdamW, Prodigy, Adafactor, ...).
* ``optim.lora_plus_ratio`` (LoRA+, Hayou et al. 2024; kohya's ``loraplus_lr_ratio``): the LoRA B
  ("up") matrices learn at ``lr * ratio``, the A matrices at ``lr``, as two optimizer param groups.
* ``optim.scheduler`` goes to diffusers' ``get_scheduler``, except ``cosine`` and
  ``cosine_with_restarts`` with an ``eta_min`` floor, which diffusers cannot do: those are a
  LambdaLR of our own (:func:`cosine_factor`). Every schedule multiplies every group's own lr, so
  the LoRA+ ratio holds throughout (the floor of the B group is ``eta_min * ratio``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate

log = logging.getLogger(__name__)

#: Schedules that honour ``optim.scheduler.eta_min`` (an absolute floor for ``optim.optimizer.lr``).
FLOOR_SCHEDULES = ("cosine", "cosine_with_restarts")


def cosine_factor(step: int, *, warmup: int, total: int, floor: float, cycles: float, restarts: bool) -> float:
    """The lr multiplier at ``step``: linear warmup from 0, then cosine from 1 down to ``floor``.

    ``restarts=False`` is diffusers' ``cosine`` (``cycles`` cosine periods, 0.5 = one half-wave down
    to the floor); ``restarts=True`` is ``cosine_with_restarts`` (``cycles`` half-waves, each jumping
    back to 1). ``floor=0`` gives exactly diffusers' curves.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if restarts:
        if progress >= 1.0:
            return floor
        wave = 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    else:
        wave = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * cycles * progress)))
    return floor + (1.0 - floor) * wave


def lora_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float,
                      ratio: float | None) -> list[dict[str, Any]] | list[torch.nn.Parameter]:
    """All parameters as one group (``ratio`` None), or LoRA+'s two: A matrices at ``lr``, B at ``lr * ratio``."""
    named = list(named_params)
    if ratio is None:
        return [p for _, p in named]
    up = [p for n, p in named if ".lora_B." in n]
    down = [p for n, p in named if ".lora_B." not in n]
    return [{"params": down, "lr": lr, "name": "lora_A"}, {"params": up, "lr": lr * float(ratio), "name": "lora_B"}]


def build_optimization(optim_cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any],
                       named_params: Iterable[tuple[str, torch.nn.Parameter]], *, device: torch.device,
                       total_steps: int, extra_groups: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``optim.optimizer`` over ``named_params`` (grouped for LoRA+) and the schedule stepping every
    optimizer step over ``total_steps``, in Lightning's return form."""
    from diffusers.optimization import get_scheduler

    extra = {}
    if optim_cfg["optimizer"].get("fused", "absent") is None:
        # The fused kernel needs CUDA, and Lightning cannot clip gradients of an optimizer that
        # unscales them itself under mixed precision.
        clipping = bool(trainer_cfg.get("gradient_clip_val"))
        mixed = str(trainer_cfg.get("precision", "32")).endswith("mixed")
        extra["fused"] = device.type == "cuda" and not (clipping and mixed)
    lr = float(optim_cfg["optimizer"]["lr"])
    if str(optim_cfg["optimizer"].get("_target_", "")).endswith("Prodigy") and lr < 0.1:
        log.warning("Prodigy with optim.optimizer.lr=%g: its lr multiplies the step size it estimates, so it "
                    "barely trains below ~0.1. Fix: optim.optimizer.lr=1.0 (an experiment preset may have lowered it).", lr)
    params = lora_param_groups(named_params, lr, optim_cfg.get("lora_plus_ratio"))
    if extra_groups:  # e.g. the text encoders' LoRA at its own lr, after the UNet's group(s)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        params = [g for g in (*groups, *extra_groups) if g["params"]]  # no UNet LoRA: textual inversion alone
    optimizer = instantiate(optim_cfg["optimizer"], **extra)(params=params)
    sched_cfg = optim_cfg["scheduler"]
    warmup = int(sched_cfg.get("warmup_steps", 0))
    if sched_cfg.get("eta_min") is not None:  # validated: a cosine schedule, 0 <= eta_min < lr
        restarts = sched_cfg["name"] == "cosine_with_restarts"
        cycles = sched_cfg.get("num_cycles")
        cycles = float(cycles if cycles is not None else (1 if restarts else 0.5))  # diffusers' defaults
        floor = float(sched_cfg["eta_min"]) / lr

        def factor(step: int) -> float:
            return cosine_factor(step, warmup=warmup, total=total_steps, floor=floor, cycles=cycles, restarts=restarts)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        extra_sched = {k: sched_cfg[k] for k in ("num_cycles", "power", "step_rules") if sched_cfg.get(k) is not None}
        scheduler = get_scheduler(sched_cfg["name"], optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps, **extra_sched)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
