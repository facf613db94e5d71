"""The ``model:`` section's checks, and the base model's layout read for the checks against it.

:func:`check_config` runs with the other sections' checks (:func:`sdtune.run.checks.validate`),
before anything loads. :func:`base_on_meta` reads the base's own component configs and builds its
UNet on the meta device (no memory, no weights), so that the LoRA, text-encoder and embedding
settings can be checked against the real layers (:func:`sdtune.run.checks.check_against_base`)
before the weights load. Both are model knowledge, so they live here; the checks of the layers
themselves live beside the LoRA and training code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from sdtune.config.values import Settings
from sdtune.families import FAMILIES, ModelFamily, get_family
from sdtune.families.arch import architecture
from sdtune.utils.errors import ConfigError

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """``model.family`` is registered and fits the hardware preset; ``model.path`` is set;
    ``model.allow_pickle`` is a switch; ``model.guidance`` (null: the family's) is > 0."""
    s = Settings(cfg)
    family = s.get("model.family")
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is not one of {sorted(FAMILIES)}.")
    preset = s.get("hardware_preset")
    if preset and family not in preset.get("families", []):
        raise ConfigError(
            f"hardware={preset.name} does not fit a {family} LoRA (it covers {list(preset.families)}; Kolors' text "
            "encoder alone needs about 12.5 GB). Fix: hardware=16gb or more, or another model."
        )
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
