"""The known-keys schema: which settings sdtune's own sections have, read from ``conf/`` itself.

A key sdtune does not know under one of its own sections (``+lora.rnak=8``, a typo in a config
file) would be silently ignored; it is refused with the closest known key, both on the command
line (:func:`sdtune.config.overrides.check_override_key`, before Hydra composes) and in the
composed config (:func:`check_known_keys`, the first of the training checks).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable

from omegaconf import DictConfig

from sdtune.config.paths import CONF_DIR, yaml_file
from sdtune.config.values import setting
from sdtune.utils.errors import ConfigError

#: Sections whose settings sdtune reads itself, so a key it does not know is a typo, not a setting
#: (trainer.*, optim.optimizer.*, callbacks and loggers go to the classes they build and stay open).
#: Each maps to where its keys are defined: a config group folder, or the root config.
CLOSED_SECTIONS = {"model": "model", "lora": "lora", "data": "data", "train": None, "speed": None, "resume": None,
                   "eval": None, "embedding": "embedding"}
#: What lora.text_encoder takes (sdtune.training.text_encoders).
TEXT_ENCODER_KEYS = ("rank", "alpha", "targets", "lr")
#: Nested mappings whose keys are closed too (see :func:`nested_keys`).
NESTED_SECTIONS = ("lora.text_encoder", "train.ema", "model.quantize")
#: The parts model.quantize takes one by one (sdtune.families.quantize.choice).
QUANTIZE_KEYS = ("denoiser", "text_encoder")


@functools.cache
def schema_keys(section: str) -> frozenset[str]:
    """Every key ``section`` has in sdtune's own config files (all of its group's options)."""
    group = CLOSED_SECTIONS[section]
    files = sorted((CONF_DIR / group).glob("*.yaml")) if group else [CONF_DIR / "config.yaml"]
    keys: set[str] = set()
    for file in files:
        data = yaml_file(file)
        data = data if group else data.get(section) or {}
        keys.update(k for k in data if k != "defaults")
    return frozenset(keys)


def nested_keys(path: str) -> frozenset[str] | None:
    """The keys of the nested mapping ``path`` (``train.ema``, ``lora.text_encoder``) that sdtune
    reads itself; None where ``path`` is not one of them (its keys are then not checked)."""
    if path == "lora.text_encoder":
        return frozenset(TEXT_ENCODER_KEYS)
    if path == "model.quantize":
        return frozenset(QUANTIZE_KEYS)
    if path == "train.ema":
        return frozenset(yaml_file(CONF_DIR / "config.yaml")["train"]["ema"])
    return None


def unknown_key_error(parent: str, key: str, known: Iterable[str]) -> ConfigError:
    """Our "did you mean" message for ``parent.key``, which is not a setting."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    hint = f"Did you mean {parent}.{close[0]}? " if close else f"Known keys: {', '.join(sorted(known))}. "
    return ConfigError(
        f"{parent}.{key} is not a setting of sdtune and would be ignored. {hint}"
        f"Fix: {parent}.{close[0] if close else '<key>'}=<value> (without +), or remove {parent}.{key}."
    )


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a key sdtune does not know under one of its own sections or nested mappings."""
    for section in CLOSED_SECTIONS:
        node = cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        known = schema_keys(section)
        for key in node:
            if key not in known:
                raise unknown_key_error(section, key, known)
    for parent in NESTED_SECTIONS:
        node, known = setting(cfg, parent), nested_keys(parent)
        for key in node if isinstance(node, DictConfig) else ():
            if key not in known:
                raise unknown_key_error(parent, key, known)
