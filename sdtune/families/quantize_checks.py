"""The checks of ``model.quantize``: its value, the settings that do not work on a quantized base,
and (before anything loads) whether this machine can run the mode.

Each refusal was found by training on the tiny models with the base quantized (torchao int8 and
fp8 run on the CPU too): LoRA, LoHa, LoKr, every ``lora.init``, text-encoder LoRA on a quantized
ChatGLM, gradient checkpointing, channels_last, EMA, resume, every CPU precision and single-file
bases all train and export the same file as without quantization. What does not:

* DoRA: training works, but the DoRA magnitude is normalised by the rows of the *rounded* base
  weight, and the kohya file's ``dora_scale`` is computed from the base's full-precision weights,
  which a quantized base no longer holds (torchao's tensors refuse the reshape; measured).
* LoHa and LoKr on NF4: peft sizes their factors from ``base_layer.weight.shape``, which
  bitsandbytes packs to (out·in/2, 1) (peft/tuners/loha/layer.py); torchao keeps the logical shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdtune.config.values import Settings
from sdtune.families import get_family
from sdtune.families.quantize import MODES, choice, quantized_text_encoders
from sdtune.utils.errors import ConfigError

PARTS = ("denoiser", "text_encoder")
VALUES = "null, int8, fp8, nf4, or {denoiser: MODE|null, text_encoder: MODE|null}"
CPU_FIX = "model.quantize=int8 runs on any device (torchao weight-only int8, the CPU included)"


def _value(cfg: DictConfig) -> Any:
    value = Settings(cfg).get("model.quantize")
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _key(value: Any, part: str) -> str:
    """How the user wrote the setting of ``part``: ``model.quantize`` or ``model.quantize.<part>``."""
    return "model.quantize" if isinstance(value, str) else f"model.quantize.{part}"


def check_config(cfg: DictConfig) -> None:
    """``model.quantize`` is a mode, null or a per-part mapping of them; a text-encoder choice only
    where the family has a large encoder; no setting that does not work on a quantized denoiser."""
    value = _value(cfg)
    if value is None:
        return
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(PARTS))
        if unknown:
            raise ConfigError(f"model.quantize.{unknown[0]} is not a part that can be quantized. Fix: "
                              f"model.quantize='{{denoiser: int8, text_encoder: null}}' (parts: {', '.join(PARTS)}).")
        pairs = [(f"model.quantize.{p}", value.get(p)) for p in PARTS]
    elif isinstance(value, str):
        pairs = [("model.quantize", value)]
    else:
        raise ConfigError(f"model.quantize={value!r} is not a quantization mode. It takes {VALUES}. "
                          "Fix: e.g. model.quantize=int8.")
    for key, mode in pairs:
        if mode is not None and mode not in MODES:
            raise ConfigError(f"{key}={mode!r} is not a quantization mode. It takes {VALUES}. Fix: {key}=int8 "
                              "(weight-only int8, any device), fp8 (CUDA, compute capability 8.9+) or nf4 (CUDA, QLoRA).")
    family = get_family(Settings(cfg).get("model.family"))
    parts = choice({"quantize": value})
    if isinstance(value, Mapping) and parts["text_encoder"] and not quantized_text_encoders(family):
        raise ConfigError(
            f"model.quantize.text_encoder={parts['text_encoder']}: {family.name}'s text encoders are CLIPs (0.1-0.7 B "
            "parameters), which stay in the run's dtype; only the large ones are quantized (T5 in FLUX.1 and SD3.5, "
            "ChatGLM in Kolors). Fix: model.quantize.text_encoder=null.")
    _check_one_device(cfg, value)
    _check_with_lora(cfg, value, parts["denoiser"])


def _check_one_device(cfg: DictConfig, value: Any) -> None:
    """A quantized base trains on one device: DDP syncs every parameter and buffer at start-up, which
    torchao's 8-bit tensors do not implement (``aten.view``), and FSDP and DeepSpeed shard and cast
    every parameter."""
    s = Settings(cfg)
    strategy, devices = str(s.get("trainer.strategy") or "auto"), str(s.get("trainer.devices") or 1)
    nodes = s.get("trainer.num_nodes") or 1
    if strategy in ("auto", "single_device") and devices == "1" and str(nodes) == "1":
        return
    raise ConfigError(
        f"model.quantize={value!r} with trainer.strategy={strategy}, trainer.devices={devices}: a quantized base "
        "trains on one GPU only (DDP cannot synchronise torchao's 8-bit tensors, FSDP and DeepSpeed shard and cast "
        "every weight). Fix: trainer=gpu trainer.devices=1, or model.quantize=null for a multi-GPU run.")


def _check_with_lora(cfg: DictConfig, value: Any, mode: str | None) -> None:
    """The LoRA variants that do not train or export on a denoiser quantized in ``mode``."""
    if mode is None:
        return
    s, key = Settings(cfg), _key(value, "denoiser")
    if s.get("lora.use_dora") is True:
        raise ConfigError(
            f"{key}={mode} with lora.use_dora=true: a DoRA magnitude is normalised by the base weight's rows, which "
            "a quantized base holds rounded, and the file's dora_scale is computed from the full-precision base "
            "weights the run no longer has, so the file would not be the one an unquantized run writes. "
            f"Fix: lora.use_dora=false (plain LoRA trains on a quantized base), or {key}=null.")
    kind = s.get("lora.type")
    if mode == "nf4" and kind in ("loha", "lokr"):
        raise ConfigError(
            f"{key}=nf4 with lora.type={kind}: peft sizes {kind.replace('lo', 'Lo', 1)} factors from the base layer's "
            "weight shape, which bitsandbytes packs to (out*in/2, 1) in 4 bits. Fix: "
            f"{key}=int8 or fp8 (torchao keeps the weight's shape), or lora.type=lora.")


def check_device(cfg: DictConfig) -> None:
    """The modes ``model.quantize`` asks for run on this machine (before the weights load): fp8 needs
    a CUDA GPU of compute capability 8.9+, nf4 a CUDA GPU and bitsandbytes; int8 runs anywhere."""
    import importlib.util

    import torch

    value = _value(cfg)
    parts = choice({"quantize": value})
    accelerator = str(Settings(cfg).get("trainer.accelerator") or "auto")
    on_cuda = torch.cuda.is_available() and accelerator not in ("cpu", "mps", "tpu")
    for part in PARTS:
        mode = parts[part]
        if mode is None or MODES[mode].min_capability is None:
            continue
        key, needs = _key(value, part), MODES[mode].needs
        if not on_cuda:
            where = ("trainer.accelerator=cpu" if torch.cuda.is_available() else "this machine has no CUDA device")
            raise ConfigError(f"{key}={mode} needs {needs}, and {where}. Fix: {CPU_FIX}, or run on such a GPU.")
        capability = torch.cuda.get_device_capability()
        if capability < MODES[mode].min_capability:
            raise ConfigError(
                f"{key}={mode} needs {needs}; this {torch.cuda.get_device_name()} has compute capability "
                f"{capability[0]}.{capability[1]}. Fix: {key}=int8 (8-bit, any GPU) or nf4 (4-bit, any CUDA GPU).")
        if MODES[mode].backend == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{key}=nf4 needs the bitsandbytes package, which is not installed. "
                              f"Fix: pip install bitsandbytes (or pip install 'sdtune[nf4]'), or {key}=int8.")
