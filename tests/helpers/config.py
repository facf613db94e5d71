"""Configs as the commands compose them: ``compose_cfg`` for training, ``compose_tool`` for the
other Hydra configs (generate, merge, bench), and ``resolved`` to a plain dict."""

from __future__ import annotations

import os

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from sdtune.config.overrides import normalize_overrides
from sdtune.config.resolvers import register_resolvers

from .paths import ROOT

register_resolvers()


def compose_cfg(*overrides: str, output_dir: str | os.PathLike = "/nonexistent-output") -> DictConfig:
    """The config ``python -m sdtune OVERRIDES`` would see, with the run folder set explicitly."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*normalize_overrides(list(overrides)), f"paths.output_dir={output_dir}"])
    return cfg


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def bench_cfg(*overrides: str) -> dict:
    """``conf/bench.yaml`` composed with ``overrides`` and resolved (the bench's own config)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[*overrides, "paths.output_dir=/nonexistent-output"])
    return OmegaConf.to_container(cfg, resolve=True)


def compose_tool(name: str, *overrides: str) -> DictConfig:
    """``conf/NAME.yaml`` (generate, merge, ...) as ``python -m sdtune.NAME OVERRIDES`` composes it."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))
