"""The OmegaConf resolvers sdtune's config files use, registered once per process.

* ``${sdtune_root:}``: the repository root, so configs can find bundled data and caches;
* ``${sdtune_cwd:}``: the folder the command was started in, where outputs go (as with any CLI);
* ``${sdtune_per_family:${model.family},{<family>: <value>, ...}}``: a preset's value for the model's
  family (the table is in the preset file: this module knows no family);
* ``${sdtune_direction:${optimized_metric}}``: the Optuna direction for the metric a sweep optimizes.

Every command registers them before Hydra composes anything; a run folder's replayed overrides may
call only these and Hydra's plain ones (:data:`sdtune.run.resume.SAFE_RESOLVERS`).
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from sdtune.config.paths import ROOT
from sdtune.utils.errors import ConfigError
from sdtune.utils.metrics import sweep_direction


def register_resolvers() -> None:
    """Register sdtune's resolvers (those not registered yet)."""
    if not OmegaConf.has_resolver("sdtune_root"):
        OmegaConf.register_new_resolver("sdtune_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("sdtune_cwd"):
        OmegaConf.register_new_resolver("sdtune_cwd", lambda: os.getcwd(), use_cache=True)
    if not OmegaConf.has_resolver("sdtune_per_family"):
        OmegaConf.register_new_resolver("sdtune_per_family", per_family)
    if not OmegaConf.has_resolver("sdtune_direction"):  # hparams_search: maximize similarities, minimize the rest
        OmegaConf.register_new_resolver("sdtune_direction", sweep_direction)


def per_family(family: str, table: Any) -> Any:
    """``${sdtune_per_family:${model.family},{<family>: <value>, ...}}``: the value given for ``family``."""
    if family not in table:
        raise ConfigError(f"this preset has no setting for model family {family!r} (it covers {sorted(table)}).")
    return table[family]
