"""An exponential moving average of the LoRA weights (``train.ema``).

diffusers' :class:`~diffusers.training_utils.EMAModel` over the trainable LoRA parameters does the
maths: after optimizer step ``n`` (one per accumulated batch, not per micro-batch) every shadow
tensor moves ``s <- s - (1 - d_n) (s - w)`` with ``d_n = min(decay, (1 + (n-1)) / (10 + (n-1)))``
and ``d_1 = 0`` (so the EMA starts at the weights after the first step, not at the initial ones).

Its state (the shadow tensors, under their peft names, and the step count) lives in every
checkpoint's ``sdtune.ema`` section, so a resume continues it exactly. With
``train.ema.use_for_export`` the run's ``lora.safetensors``, ``python -m sdtune.export <ckpt>``
and the sample grids and concept probe (during and at the end of training) all draw the EMA weights (the
header records ``sdtune.ema=true`` and ``sdtune.ema_decay``); otherwise all of them use the raw ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from omegaconf import DictConfig

from sdtune.config.values import Settings
from sdtune.lora.layers import module_key_to_peft, named_trainable_lora_parameters
from sdtune.utils.errors import ConfigError, LoraFileError

log = logging.getLogger(__name__)


def ema_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``train.ema`` of a run config (absent in configs written before it existed: off)."""
    ema = (cfg.get("train") or {}).get("ema") or {}
    return {"enabled": bool(ema.get("enabled")), "decay": float(ema.get("decay", 0.999)),
            "use_for_export": bool(ema.get("use_for_export"))}


def exports_ema(cfg: Mapping[str, Any]) -> bool:
    settings = ema_settings(cfg)
    return settings["enabled"] and settings["use_for_export"]


def check_config(cfg: DictConfig) -> None:
    """``train.ema``: switches that are true or false, a decay in (0, 1), ``use_for_export`` only
    with the EMA on."""
    s = Settings(cfg)
    if s.get("train.ema") is None:
        return
    s.boolean("train.ema.enabled")
    s.boolean("train.ema.use_for_export")
    s.number("train.ema.decay", gt=0)  # 0 is "must be > 0", the upper bound next
    s.number("train.ema.decay", gt=0, lt=1, fix="e.g. train.ema.decay=0.999.")
    if s.get("train.ema.use_for_export") and not s.get("train.ema.enabled"):
        raise ConfigError(
            "train.ema.use_for_export=true, but train.ema.enabled=false keeps no EMA weights to export. "
            "Fix: add train.ema.enabled=true, or drop use_for_export."
        )


class LoraEMA:
    """EMAModel over ``denoiser``'s trainable LoRA parameters, with the peft name of each shadow tensor."""

    def __init__(self, denoiser: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        named = named_trainable_lora_parameters(denoiser)
        self.names = [module_key_to_peft(n, prefix="") for n, _ in named]  # the keys LoRA files are written from
        self.params = [p for _, p in named]
        self.model = EMAModel(self.params, decay=decay)

    @property
    def step(self) -> int:
        return int(self.model.optimization_step)

    def update(self) -> None:
        """One EMA step; called once per optimizer step."""
        self.model.step(self.params)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The EMA weights as peft-named CPU tensors (what :func:`sdtune.lora.layers.live_lora_state` gives for the raw ones)."""
        return {n: s.detach().to("cpu", copy=True).contiguous() for n, s in zip(self.names, self.model.shadow_params)}

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.model.state_dict())
        state["shadow_params"] = [s.detach().to("cpu", copy=True) for s in state["shadow_params"]]
        return {"names": list(self.names), **state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise LoraFileError("the checkpoint's EMA tensors do not match this run's LoRA layers; "
                                "Fix: resume with the run's own lora settings, or start a new run.")
        self.model.load_state_dict({k: v for k, v in state.items() if k != "names"})
        self.model.to(device=self.params[0].device)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the live LoRA layers for the duration; the raw ones restored bit for bit after."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)


def start_ema(denoiser: torch.nn.Module, cfg: Mapping[str, Any], saved: Mapping[str, Any] | None) -> LoraEMA | None:
    """The run's EMA (None when ``train.ema.enabled`` is off), continued from a checkpoint's ``saved`` state."""
    settings = ema_settings(cfg)
    if not settings["enabled"]:
        return None
    ema = LoraEMA(denoiser, settings["decay"])
    if saved is not None:
        ema.load_state_dict(saved)
        ema.model.decay = settings["decay"]  # the config rules (a resume may change it on purpose)
        log.info("EMA of the LoRA weights continued from the checkpoint (step %d)", ema.step)
    return ema


def exported_weights(pl_module: Any) -> contextlib.AbstractContextManager:
    """The weights a run exports, live in ``pl_module``'s LoRA layers (for the end-of-run samples)."""
    ema = getattr(pl_module, "ema", None)
    if ema is None or not exports_ema(pl_module.cfg):
        return contextlib.nullcontext()
    return ema.swapped_in()


def with_ema_facts(header: Any, cfg: Mapping[str, Any]) -> Any:
    """``header`` (a :class:`sdtune.lora.files.LoraHeader`) recording that the weights are the EMA ones."""
    if not exports_ema(cfg):
        return header
    facts = {"sdtune.ema": "true", "sdtune.ema_decay": repr(ema_settings(cfg)["decay"])}
    return replace(header, carried={**header.carried, **facts})


def checkpoint_export_tensors(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], raw: dict[str, torch.Tensor],
                              source: str) -> dict[str, torch.Tensor]:
    """What ``python -m sdtune.export <ckpt>`` writes: the EMA tensors when the run exports them, else ``raw``."""
    if not exports_ema(cfg):
        return raw
    saved = (ckpt.get("sdtune") or {}).get("ema")
    if not saved or len(saved.get("names", ())) != len(saved.get("shadow_params", ())):
        raise LoraFileError(
            f"{source!r} was trained with train.ema.use_for_export=true but holds no EMA weights. Fix: export "
            "another checkpoint of the run (RUN/checkpoints/last.ckpt)."
        )
    return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in zip(saved["names"], saved["shadow_params"])}
