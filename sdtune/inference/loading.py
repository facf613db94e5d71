"""A base model with weighted LoRAs on it: what ``generate`` and ``merge`` share.

The base model defaults to the one recorded in the first LoRA's header (the run config sdtune
writes into every file), so ``python -m sdtune.generate loras=[run/lora.safetensors]`` needs
nothing else. Each LoRA becomes its own peft adapter and ``set_adapters`` mixes them with their
weights, which is exactly what diffusers' ``set_adapters`` and A1111's ``<lora:name:0.7>`` do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdtune.config.values import number
from sdtune.families import ModelFamily, ModelParts, get_family
from sdtune.families.source import check_weights
from sdtune.lora.apply import Component, activate, apply_lora
from sdtune.lora.files import LoraFile, check_family, read_lora
from sdtune.utils.errors import ConfigError, LoraFileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraRef:
    path: str
    weight: float = 1.0


def parse_loras(items: Sequence[Any] | None) -> list[LoraRef]:
    """``loras`` entries: ``{path: ..., weight: ...}`` or the shorthand ``"path"`` / ``"path@weight"``."""
    refs = []
    for i, item in enumerate(items or []):
        if isinstance(item, (dict, DictConfig)):
            if "path" not in item:
                raise ConfigError(f"loras[{i}] needs a 'path' (got keys {list(item)}).")
            path, weight = str(item["path"]), item.get("weight", 1.0)
        else:
            path, _, w = str(item).partition("@")
            weight = w or 1.0
        try:  # "a.safetensors@0.7" gives a text
            weight = float(weight) if isinstance(weight, str) else weight
        except ValueError:
            pass  # refused below with the value as given
        refs.append(LoraRef(path=path, weight=number(f"loras[{i}] weight", weight,
                                                     fix=f"e.g. {path}@0.8 (a finite number; 0 turns the LoRA off).")))
    return refs


def read_loras(refs: Sequence[LoraRef]) -> list[LoraFile]:
    """Read and vet every LoRA before any base model loads, so a bad file fails in seconds."""
    return [read_lora(ref.path) for ref in refs]


def base_model_config(
    model_cfg: Mapping[str, Any] | None, refs: Sequence[LoraRef], loras: Sequence[LoraFile] | None = None
) -> dict[str, Any]:
    """``model`` as given, else the model the first LoRA was trained on (from its header).

    ``loras``, when given, are ``refs`` already read by :func:`read_loras` (not read again).
    """
    if model_cfg:
        return dict(OmegaConf.to_container(model_cfg, resolve=True)) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    for i, ref in enumerate(refs):
        trained = (loras[i] if loras is not None else read_lora(ref.path)).config
        if trained and "model" in trained:
            log.info("base model from %s: %s", ref.path, trained["model"]["path"])
            return header_model(trained["model"], ref.path)
    raise ConfigError(
        "no base model: pass one (e.g. model=sdxl model.path=/models/sdxl), or a LoRA written by sdtune, "
        "whose header records the model it was trained on."
    )


def check_families(refs: Sequence[LoraRef], loras: Sequence[LoraFile], model_cfg: Mapping[str, Any]) -> None:
    """Refuse LoRAs of different model families, and any LoRA of another family than the base model,
    from the headers :func:`read_loras` already read: before any model loads, naming the files."""
    recorded = [(ref.path, lora.family) for ref, lora in zip(refs, loras, strict=True) if lora.family]
    for path, family in recorded[1:]:
        first_path, first = recorded[0]
        if family != first:
            raise LoraFileError(
                f"{first_path!r} is a {first} LoRA and {path!r} is a {family} LoRA: LoRAs of different model families "
                f"cannot be used on one base model. Fix: pass only {first} LoRAs (with a {first} base model) or only "
                f"{family} LoRAs (with a {family} base model).")
    base = get_family(model_cfg["family"]).name
    for ref, lora in zip(refs, loras, strict=True):
        check_family(lora, base, ref.path)


#: What a LoRA header may say about its base model: data only. ``allow_pickle`` (a safety switch)
#: is never taken from a file; every other key is dropped too.
HEADER_MODEL_KEYS = ("family", "path", "vae_path", "revision", "config", "resolution", "tiny", "guidance")


def header_model(model: Mapping[str, Any], lora_path: str) -> dict[str, Any]:
    """The base model a LoRA header records, as data: the known keys only, ``allow_pickle`` off,
    and its weight paths through the pickle gate at once (a header naming a pickle is refused
    before anything loads, whatever it says about ``allow_pickle``)."""
    if model.get("allow_pickle"):
        log.warning("%s: its header says model.allow_pickle=%r; ignored (a safety switch is never taken from a file)",
                    lora_path, model.get("allow_pickle"))
    out = {k: model[k] for k in HEADER_MODEL_KEYS if k in model}
    out["allow_pickle"] = False
    for key in ("path", "vae_path"):
        check_weights(out.get(key), key=f"model.{key}", allow_pickle=False, origin=f"from the header of {lora_path}")
    return out


def pick_device(name: str = "auto") -> torch.device:
    """The device ``name`` says: ``auto`` is the CUDA GPU when there is one, else the CPU; ``gpu``
    (Lightning's word, ``trainer.accelerator=gpu``) is ``cuda``; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if name == "gpu" else name)


def apply_loras(
    parts: ModelParts, family: ModelFamily, refs: Sequence[LoraRef], loras: Sequence[LoraFile] | None = None
) -> dict[Component, list[str]]:
    """Each LoRA as adapter ``lora_<i>`` on every model it has layers for (UNet, text encoders),
    all active at their weights; the adapter names per model. Bad files fail loudly.

    ``loras``, when given, are ``refs`` already read by :func:`read_loras` (not read again).
    """
    adapters: dict[Component, list[str]] = {}
    weights = {}
    for i, ref in enumerate(refs):
        name = f"lora_{i}"
        lora = loras[i] if loras is not None else read_lora(ref.path)
        for component in apply_lora(parts, lora, family=family, path=ref.path, adapter_name=name):
            adapters.setdefault(component, []).append(name)
        weights[name] = ref.weight
    activate(parts, adapters, weights)
    return adapters
