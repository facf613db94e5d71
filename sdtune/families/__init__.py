"""Model-family registry: ``get_family(cfg.model.family)`` is the only lookup by name.

Everything sdtune knows about one family lives in its ``families/<name>.py`` (loading, prompts,
conditioning, LoRA targets, kohya naming, single-file layout, tiny builders, bench shapes); a new
family is one such file plus :func:`register_family`.
"""

from __future__ import annotations

from sdtune.families.base import FAMILIES, ModelFamily, ModelParts, register_family
from sdtune.families.flux import Flux
from sdtune.families.kolors import Kolors
from sdtune.families.sd15 import SD15
from sdtune.families.sd35 import SD35
from sdtune.families.sdxl import SDXL
from sdtune.families.source import resolve_model_source
from sdtune.utils.errors import ConfigError

for _builtin in (SD15, SDXL, Kolors, Flux, SD35):
    register_family(_builtin)


def as_family(family: str | ModelFamily) -> ModelFamily:
    """``family`` itself, or the registered family of that name."""
    return family if isinstance(family, ModelFamily) else get_family(family)


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]()
    except KeyError:
        raise ConfigError(
            f"model.family={name!r} is not a known model family; choose one of {sorted(FAMILIES)}."
        ) from None


__all__ = ["FAMILIES", "as_family", "ModelFamily", "ModelParts", "get_family", "register_family", "resolve_model_source"]
