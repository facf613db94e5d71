"""Where the repository and its Hydra config files are, and the config files read as plain data.

Every tool composes its config from :data:`CONF_DIR` by an absolute path (Hydra would resolve a
relative one against whichever module imported it first); the known-keys schema
(:mod:`sdtune.config.schema`) and the optional mappings' defaults (:mod:`sdtune.config.overrides`)
read the same files with :func:`yaml_file`.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: The repository root: ``conf/``, ``examples/`` and the default ``.cache`` live here.
ROOT = Path(__file__).resolve().parents[2]
#: Hydra's config folder (``config.yaml`` and one folder per config group).
CONF_DIR = ROOT / "conf"


@functools.cache
def yaml_file(path: Path) -> dict:
    """A config file as plain data, parsed once per process (libyaml when present: ~10x faster,
    and every run validates against some 20 files before its first step)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
