"""Command-line overrides rewritten into the form Hydra takes, before it composes anything.

* :func:`normalize_overrides`: a documented key of a mapping that is off by default turns it on
  (``lora.text_encoder.rank=4``), and a key sdtune does not know gets our "did you mean" message
  (:func:`check_override_key`) instead of Hydra's "not in struct".
* :func:`expand_home`: ``key=~/x`` becomes an absolute path (the shell does not expand it there).
* :func:`hydra_quote`: a value written back into an override (a run folder) is quoted when needed.
* :func:`complete_optional_mappings`: after composing, a mapping switched on by one of its keys gets
  its other keys.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, open_dict

from sdtune.config.paths import CONF_DIR, yaml_file
from sdtune.config.schema import (
    CLOSED_SECTIONS,
    QUANTIZE_KEYS,
    TEXT_ENCODER_KEYS,
    nested_keys,
    schema_keys,
    unknown_key_error,
)
from sdtune.config.values import setting

#: Mappings that default to null (off) but whose keys are documented one by one: each key is a plain
#: dotted override (``lora.text_encoder.rank=4``, ``embedding.tokens=[olq]``), and setting one turns
#: the mapping on (:func:`normalize_overrides`). The embedding group's full mapping is conf/embedding/ti.yaml.
OPTIONAL_MAPPINGS = ("lora.text_encoder", "embedding", "model.quantize")


def check_override_key(key: str) -> None:
    """Refuse a dotted override ``key`` that names no setting of sdtune's own sections (before Hydra
    composes anything, so its "Key ... is not in struct" never reaches the user)."""
    parts = key.split(".")
    if parts[0] not in CLOSED_SECTIONS or len(parts) < 2:
        return
    if parts[1] not in schema_keys(parts[0]):
        raise unknown_key_error(parts[0], parts[1], schema_keys(parts[0]))
    for depth in range(2, len(parts)):
        parent = ".".join(parts[:depth])
        known = nested_keys(parent)
        if known is not None and parts[depth] not in known:
            raise unknown_key_error(parent, parts[depth], known)


def normalize_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides as Hydra should get them.

    * A key under one of :data:`OPTIONAL_MAPPINGS` (null by default) is passed as ``++key=value``,
      which creates the mapping: ``lora.text_encoder.rank=4`` turns text-encoder LoRA on, and
      ``embedding.tokens=[olq]`` without ``embedding=`` trains embeddings as ``embedding=ti`` does
      (:func:`complete_optional_mappings` fills in the other keys).
    * A key sdtune does not know in its own sections gets our "did you mean" :class:`ConfigError`.
    Group choices (``embedding=ti``), deletions (``~key``) and Hydra's own keys pass unchanged.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+")
        if arg.startswith(("-", "~")) or not sep or "." not in bare or "/" in bare or "@" in bare:
            out.append(arg)
            continue
        if key == bare:  # +key / ++key add keys: the known-keys check names an unknown one after composing
            check_override_key(bare)
            if any(bare.startswith(m + ".") for m in OPTIONAL_MAPPINGS):
                arg = f"++{bare}={value}"
        out.append(arg)
    return out


def complete_optional_mappings(cfg: DictConfig) -> None:
    """Fill in the keys a mapping of :data:`OPTIONAL_MAPPINGS` that was switched on by one of its keys
    left out: ``embedding`` takes conf/embedding/ti.yaml's values (textual inversion unless
    ``embedding.with_lora=true``); ``lora.text_encoder``'s alpha, targets and lr default to null, and ``model.quantize``'s parts to null."""
    te = setting(cfg, "lora.text_encoder")
    if isinstance(te, DictConfig):
        with open_dict(te):
            for key in TEXT_ENCODER_KEYS:
                if key != "rank" and key not in te:
                    te[key] = None
    quantize = setting(cfg, "model.quantize")
    if isinstance(quantize, DictConfig):  # model.quantize.denoiser=int8 alone leaves the text encoder unquantized
        with open_dict(quantize):
            for key in QUANTIZE_KEYS:
                if key not in quantize:
                    quantize[key] = None
    emb = cfg.get("embedding")
    if isinstance(emb, DictConfig):
        defaults = yaml_file(CONF_DIR / "embedding" / "ti.yaml")
        with open_dict(emb):
            for key, value in defaults.items():
                if key not in emb:
                    emb[key] = value


def expand_home(argv: list[str]) -> list[str]:
    """``key=~/x`` -> ``key=/home/me/x`` in command-line overrides.

    The shell does not expand ``~`` after ``key=`` (a dotted key is no shell variable), and Hydra's
    override grammar refuses a bare ``~`` in a value, so users would get a lexer error for the
    most ordinary way to name a folder in their home.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("-", "~")) and (value == "~" or value.startswith("~/")):
            path = os.path.expanduser(value)
            safe = all(c.isalnum() or c in "/._-" for c in path)
            arg = f"{key}={path}" if safe else key + "='" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(arg)
    return out


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra override value: as is when plain, else single-quoted with escapes
    (a run folder like ``lora.rank=8,seed=1`` would otherwise be parsed as a list)."""
    if all(c.isalnum() or c in "/._-:" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
