"""The checks a training command passes before any model loads, as one path every front end shares.

``python -m sdtune`` normalises its overrides (:func:`~sdtune.config.overrides.normalize_overrides`),
Hydra composes ``conf/``, and :func:`~sdtune.run.train.train` calls :func:`preflight`: every
setting's check (:func:`~sdtune.run.checks.validate`), then the dataset read and decoded
(:func:`check_data`). The web app (``sdtune.ui``) checks a form with :func:`check_command`, which
runs the same normalisation and :func:`preflight` on a config composed from the same files, so a
message shown beside a form field is the very message the command line prints.

The checks import torch and the training stack when first called, not when this module is imported,
so a server that only composes configs starts at once. Hydra's compose API keeps global state, so :func:`compose_training` serialises its callers (the
web app checks forms from several threads).
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sdtune.config.overrides import expand_home, normalize_overrides
from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.data.records import Record, load_records
from sdtune.utils.errors import ConfigError

register_resolvers()
_COMPOSE_LOCK = threading.Lock()
#: Where a checked (not run) command's ``paths.output_dir`` points: nothing is written by a check.
UNWRITTEN_OUTPUT_DIR = "/nonexistent-output"


def compose_training(argv: list[str], output_dir: str | os.PathLike = UNWRITTEN_OUTPUT_DIR,
                     config_name: str = "config", *, return_hydra_config: bool = False) -> DictConfig:
    """The config ``python -m sdtune ARGV`` composes (``~`` expanded, overrides normalised as the
    command line does), with ``paths.output_dir`` set to ``output_dir`` instead of Hydra's run folder;
    with ``return_hydra_config``, Hydra's own ``hydra`` section too (what the run's Hydra would use).

    A composition error (an unknown group option, an override Hydra cannot parse) becomes a
    :class:`ConfigError` carrying Hydra's own message."""
    overrides = normalize_overrides(expand_home(list(argv)))
    try:
        with _COMPOSE_LOCK, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=[*overrides, f"paths.output_dir={output_dir}"],
                           return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).strip()) from None


def check_data(cfg: DictConfig) -> list[Record]:
    """The run's dataset, read and (with ``data.verify_images``) decoded, and its repeat counts
    checked: every data problem surfaces here, before a model is loaded."""
    # deferred: the datamodule imports torch (seconds); composing a config (the web app's presets) needs none
    from sdtune.data.datamodule import folder_repeats

    records = load_records(
        cfg.data.root,
        verify=cfg.data.get("verify_images", True),
        bad_images=cfg.data.get("bad_images", "error"),
        allow_outside_root=bool(cfg.data.get("allow_outside_root", False)),
        caption_extension=cfg.data.get("caption_extension"),
        skip_folders=(str(cfg.data.mask_folder),) if cfg.train.get("masked_loss") else (),  # masks are not images
    )
    folder_repeats(records, cfg.data.root, cfg.data.get("repeats"))  # repeat counts within bounds, before any list
    return records


def preflight(cfg: DictConfig) -> list[Record]:
    """Every check of a training config that needs no model: :func:`validate`, then :func:`check_data`.
    Raises the first problem's :class:`~sdtune.utils.errors.SdtuneError`; returns the records."""
    # deferred: every section's checks import torch and the training stack (seconds); see check_data
    from sdtune.run.checks import validate

    validate(cfg)
    return check_data(cfg)


def check_command(argv: list[str], output_dir: str | os.PathLike = UNWRITTEN_OUTPUT_DIR
                  ) -> tuple[DictConfig, list[Record]]:
    """``python -m sdtune ARGV`` checked as the command line checks it before loading a model:
    composed (:func:`compose_training`) and :func:`preflight`-ed. Returns the config and records."""
    cfg = compose_training(argv, output_dir)
    return cfg, preflight(cfg)


@functools.lru_cache(maxsize=4)
def conf_targets(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """Every ``_target_`` value written in the shipped ``conf/**/*.yaml``: the only callables a
    config composed from presets and plain values can name."""
    import yaml

    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(conf_dir.rglob("*.yaml")):
        try:
            walk(yaml.safe_load(path.read_text(encoding="utf-8")))
        except yaml.YAMLError:  # a file Hydra would refuse anyway names nothing that can run
            continue
    return frozenset(found)
