"""The optimizer and learning-rate schedule of a run, from ``optim.*`` (what ``configure_optimizers`` returns).

* ``optim.optimizer`` is a Hydra ``_target_`` (AdamW, 8-bit AdamW, Prodigy, Adafactor, ...).
* ``optim.lora_plus_ratio`` (LoRA+, Hayou et al. 2024; kohya's ``loraplus_lr_ratio``): the LoRA B
  ("up") matrices learn at ``lr * ratio``, the A matrices at ``lr``, as two optimizer param groups.
* ``optim.scheduler`` goes to diffusers' ``get_scheduler``, except ``cosine`` and
  ``cosine_with_restarts`` with an ``eta_min`` floor, which diffusers cannot do: those are a
  LambdaLR of our own (:func:`cosine_factor`). Every schedule multiplies every group's own lr, so
  the LoRA+ ratio holds throughout (the floor of the B group is ``eta_min * ratio``).

:func:`check_config` checks the whole ``optim:`` section before anything loads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sdtune.config.values import Settings
from sdtune.utils.errors import ConfigError

log = logging.getLogger(__name__)

#: Schedules that honour ``optim.scheduler.eta_min`` (an absolute floor for ``optim.optimizer.lr``).
FLOOR_SCHEDULES = ("cosine", "cosine_with_restarts")
# What diffusers.optimization.get_scheduler takes besides the optimizer and the step count.
# eta_min is ours: a floor for the cosine schedules.
SCHEDULER_KEYS = {"name", "warmup_steps", "num_cycles", "power", "step_rules", "eta_min"}
# Optimizers from optional packages: the command that installs each (an extra of pyproject.toml).
# (bitsandbytes is not checked here: the GPU presets name it and are validated on CPU machines too.)
OPTIONAL_OPTIMIZERS = {"prodigyopt": "pip install prodigyopt==1.1.2"}


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


# -- checks of the optim: section --------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """``optim.scheduler`` (keys diffusers' ``get_scheduler`` really uses: anything else would be
    ignored), ``optim.optimizer.lr``, ``eta_min``, ``optim.lora_plus_ratio``, one lr for Prodigy, and
    the optimizer's optional package."""
    from diffusers.optimization import SchedulerType

    s = Settings(cfg)
    sched = s.get("optim.scheduler")
    if not isinstance(sched, DictConfig):
        raise ConfigError(f"optim.scheduler must be a mapping with a name, got {sched!r}.")
    unknown = sorted(set(sched.keys()) - SCHEDULER_KEYS)
    if unknown:
        raise ConfigError(
            f"optim.scheduler.{unknown[0]} is not a setting of diffusers' get_scheduler and would be ignored "
            f"(it takes {', '.join(sorted(SCHEDULER_KEYS))}; a floor for cosine is eta_min). "
            f"Fix: remove optim.scheduler.{unknown[0]} (~optim.scheduler.{unknown[0]} on the command line)."
        )
    names = [t.value for t in SchedulerType]
    if sched.get("name") not in names:
        raise ConfigError(f"optim.scheduler.name={sched.get('name')!r} is not one of {names}.")
    s.integer("optim.scheduler.warmup_steps", ge=0)
    if s.get("lora.text_encoder") is not None and s.get("lora.text_encoder.lr") is not None:
        lr = s.number("optim.optimizer.lr", ge=0)  # 0 freezes the UNet LoRA: only the text encoders learn
    else:
        lr = s.number("optim.optimizer.lr", gt=0)
    eta_min = s.number("optim.scheduler.eta_min", ge=0, optional=True)
    name = sched.get("name")
    if eta_min is not None and name not in FLOOR_SCHEDULES:
        raise ConfigError(
            f"optim.scheduler.eta_min={eta_min} is a floor for the cosine schedules only; {name} cannot honour it. "
            f"Fix: optim.scheduler.name=cosine (or cosine_with_restarts), or optim.scheduler.eta_min=null."
        )
    if eta_min is not None and eta_min >= lr:
        raise ConfigError(
            f"optim.scheduler.eta_min={eta_min} must be below optim.optimizer.lr={lr} (it is the lowest lr the "
            f"schedule decays to). Fix: e.g. optim.scheduler.eta_min={lr / 10:g}."
        )
    s.number("optim.lora_plus_ratio", gt=0, optional="off",
             fix="e.g. optim.lora_plus_ratio=16 (the LoRA+ paper's choice: the LoRA B matrices learn at lr * ratio).")
    _check_one_lr_optimizer(s)
    target = str(s.get("optim.optimizer._target_") or "")
    package = target.split(".")[0]
    if package in OPTIONAL_OPTIMIZERS:
        import importlib

        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError(
                f"optim.optimizer._target_={target} needs the package {package}, which is not installed. "
                f"Fix: {OPTIONAL_OPTIMIZERS[package]}, or pick another optimizer (e.g. optim=adamw)."
            ) from None


def _check_one_lr_optimizer(s: Settings) -> None:
    """Prodigy (``optim=prodigy``) takes one lr for all parameter groups (0 freezes one): prodigyopt
    raises a RuntimeError at the first step otherwise. LoRA+, the text encoders' own ``lr`` and the
    embeddings' ``lr`` each make a group at another lr."""
    target = str(s.get("optim.optimizer._target_") or "")
    if not target.endswith(".Prodigy"):
        return
    lr = s.get("optim.optimizer.lr")
    embedding = s.get("embedding")
    with_lora = not isinstance(embedding, DictConfig) or embedding.get("with_lora") is not False
    ratio = s.get("optim.lora_plus_ratio")
    preset = f"optim.optimizer._target_={target} (optim=prodigy) uses one learning rate for every parameter group"
    if with_lora and ratio is not None and ratio != 1 and lr:
        raise ConfigError(
            f"{preset}, but optim.lora_plus_ratio={ratio} trains the LoRA B matrices at optim.optimizer.lr * {ratio}; "
            "prodigyopt would stop at the first step. Fix: optim.lora_plus_ratio=null (Prodigy sets its own step "
            "size), or another optimizer for LoRA+ (e.g. optim=adamw)."
        )
    groups = {"optim.optimizer.lr": lr} if with_lora else {}
    te_lr = s.get("lora.text_encoder.lr") if isinstance(s.get("lora.text_encoder"), DictConfig) else None
    if te_lr is not None:
        groups["lora.text_encoder.lr"] = te_lr
    if isinstance(embedding, DictConfig) and embedding.get("lr") is not None:
        groups["embedding.lr"] = embedding.get("lr")
    used = [(key, value) for key, value in groups.items() if value != 0]  # lr 0: a frozen group, which Prodigy allows
    if len({value for _, value in used}) > 1:
        (first, a), (second, b) = used[0], next(item for item in used[1:] if item[1] != used[0][1])
        raise ConfigError(
            f"{preset}, but {second}={b} differs from {first}={a}; prodigyopt would stop at the first step. "
            f"Fix: {second}={a} (with Prodigy an lr multiplies the step size it estimates), or another "
            "optimizer for different learning rates (e.g. optim=adamw)."
        )
