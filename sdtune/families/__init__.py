"""Model-family registry: ``get_family(cfg.model.family)`` is the only lookup by name."""

from __future__ import annotations

from ..errors import ConfigError
from .base import ModelFamily, ModelParts
from .kolors import Kolors
from .sd15 import SD15
from .sdxl import SDXL
from .source import resolve_model_source

FAMILIES: dict[str, type[ModelFamily]] = {cls.name: cls for cls in (SD15, SDXL, Kolors)}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]()
    except KeyError:
        raise ConfigError(
            f"model.family={name!r} is not a known model family; choose one of {sorted(FAMILIES)}."
        ) from None


__all__ = ["FAMILIES", "ModelFamily", "ModelParts", "get_family", "resolve_model_source"]
