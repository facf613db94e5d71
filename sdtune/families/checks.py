"""The ``model:`` section's checks, and the base model's layout read for the checks against it.

:func:`check_config` runs with the other sections' checks (:func:`sdtune.run.checks.validate`),
before anything loads. :func:`base_on_meta` reads the base's own component configs and builds its
UNet on the meta device (no memory, no weights), so that the LoRA, text-encoder and embedding
settings can be checked against the real layers (:func:`sdtune.run.checks.check_against_base`)
before the weights load. Both are model knowledge, so they live here; the checks of the layers
themselves live beside the LoRA and training code.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sdtune.config.values import Settings
from sdtune.families import FAMILIES, ModelFamily, get_family
from sdtune.families.arch import architecture
from sdtune.utils.errors import ConfigError

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """``model.family`` is registered and the hardware preset lists it (else the preset's
    ``refusals`` say why); ``model.path`` is set; ``model.allow_pickle`` is a switch;
    ``model.guidance`` (null: the family's) is > 0. The whole run against the preset's card:
    :func:`sdtune.run.checks.check_hardware` (the memory planner)."""
    s = Settings(cfg)
    family = s.get("model.family")
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is not one of {sorted(FAMILIES)}.")
    preset = s.get("hardware_preset")
    if preset and family not in preset.get("families", []):
        why = (preset.get("refusals") or {}).get(family) or "Fix: a hardware preset that lists it, or none."
        raise ConfigError(f"hardware={preset.name} does not fit a {family} LoRA (it covers {list(preset.families)}): "
                          f"{why}")
    s.boolean("model.allow_pickle", optional=True)
    if not s.get("model.path"):
        raise ConfigError("model.path is not set. Fix: model.path=<diffusers folder or hub id>.")
    s.number("model.guidance", gt=0, optional=True)


@dataclass(frozen=True)
class BaseLayout:
    """A base model's family, component configs (``unet``, ``text_encoder``...) and meta-device denoiser."""

    family: ModelFamily
    arch: dict[str, dict[str, Any]]
    denoiser: Any


def base_on_meta(cfg: Any, source: str) -> BaseLayout | None:
    """The layout of the base at ``source`` (a diffusers folder) without its weights; None where
    there are no configs to read (a hub id, a single file: those are checked once loaded) or
    diffusers cannot build the denoiser's config (the loader then names the problem with its fix)."""
    import diffusers
    import torch

    family = get_family(cfg["model"]["family"])
    try:
        arch = architecture(family, source)
    except (OSError, ValueError, KeyError):  # no diffusers folder: checked after loading
        return None
    try:
        with torch.device("meta"):
            denoiser = getattr(diffusers, family.denoiser_class).from_config(arch[family.denoiser_subfolder])
    except Exception as err:  # a config diffusers cannot build (another class, say)
        log.debug("settings checked after loading: the %s config does not build (%s)", family.denoiser_class, err)
        return None
    return BaseLayout(family, arch, denoiser)


def frozen_weight_bytes(family: ModelFamily, path: str | None, parts: Iterable[str], dtype: Any) -> dict[str, int] | None:
    """Bytes in ``dtype`` of the base's ``parts`` ("denoiser", "vae", "text_encoders"): parameters and
    buffers counted on the meta device from the configs of the diffusers folder at ``path``, or of
    the shipped full-size architecture (``arch_configs/``) for a hub id or a single file. None where
    neither has configs (the check is then left to the load)."""
    folder = path if path and Path(path, family.denoiser_subfolder, "config.json").is_file() else None
    try:
        arch = architecture(family, folder)
    except (OSError, ValueError, KeyError):
        return None
    itemsize = dtype.itemsize
    names = {"denoiser": (family.denoiser_subfolder,), "vae": ("vae",), "text_encoders": family.text_encoder_subfolders}
    out = {}
    for part in parts:
        configs = json.dumps({n: arch[n] for n in names[part]}, sort_keys=True)
        try:
            floats, fixed = _meta_elements(type(family), part, configs)
        except Exception as err:  # a config diffusers cannot build: the loader names the problem
            log.debug("weights counted after loading: the %s configs do not build (%s)", part, err)
            return None
        out[part] = floats * itemsize + fixed
    return out


@functools.lru_cache(maxsize=64)
def _meta_elements(family_class: type[ModelFamily], part: str, configs: str) -> tuple[int, int]:
    """(floating-point elements, bytes of the others) of ``part`` built on the meta device from
    ``configs`` (JSON); cached, as an SDXL UNet takes about a second to build even there."""
    import diffusers
    import torch

    family, arch = family_class(), json.loads(configs)
    with torch.device("meta"):
        if part == "denoiser":
            modules = [getattr(diffusers, family.denoiser_class).from_config(arch[family.denoiser_subfolder])]
        elif part == "vae":
            modules = [diffusers.AutoencoderKL.from_config(arch["vae"])]
        else:
            modules = family.random_text_parts(arch, meta=True)[1]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return (sum(t.numel() for t in tensors if t.is_floating_point()),
            sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point()))
