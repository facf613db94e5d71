"""Read what a LoRA file's header says: the rank, alpha and targets (diffusers' adapter metadata or
the tensors themselves, plus sdtune's keys) and the run config, refusing garbled values with
the key, the value and the fix."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdtune.lora.adapters import kind_of
from sdtune.lora.checks import (
    HEADER_FIX,
    TEXT_ENCODER_KEYS,
    check_tensors_match,
)
from sdtune.lora.keys import DIFFUSERS_PREFIX, KOHYA_ALPHA, KOHYA_PREFIX, denoiser_prefixes, kohya_parts_of
from sdtune.lora.layers import LoraSpec
from sdtune.utils.errors import LoraFileError

#: The header key of diffusers' adapter config (a JSON dict), as diffusers' ``save_lora_weights`` writes
#: it (``diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY``) ...
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
#: ... whose keys carry the component's prefix: ``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``
#: (``transformer.`` for a transformer denoiser: :func:`denoiser_header_prefix`).
COMPONENT_PREFIX = DIFFUSERS_PREFIX
ALPHA_IN_TENSORS = "sdtune.alpha_in_tensors"
#: How many diffusers modules each fused kohya module stacks ({"lora_unet_double_blocks_#_img_attn_qkv": 3}).
KOHYA_PARTS = "sdtune.kohya_parts"


def denoiser_header_prefix(adapter_metadata: Mapping[str, Any]) -> str:
    """The denoiser prefix diffusers' adapter metadata uses (``unet.`` when it has none)."""
    return next((p for p in denoiser_prefixes() if any(k.startswith(p) for k in adapter_metadata)), COMPONENT_PREFIX)


def _shown(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _bad_header(path: str | os.PathLike, key: str, value: Any, expected: str) -> LoraFileError:
    return LoraFileError(
        f"{str(path)!r}: header key {key!r} holds {_shown(value)}, which is not {expected}. "
        f"The file was damaged or edited by another tool. {HEADER_FIX}"
    )


def _header_json(metadata: Mapping[str, str], key: str, path: str | os.PathLike, kind: type, expected: str) -> Any:
    """Parse header ``key`` as JSON of type ``kind``; None when absent."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except ValueError:
        raise _bad_header(path, key, metadata[key], expected) from None
    if not isinstance(value, kind):
        raise _bad_header(path, key, metadata[key], expected)
    return value


def _rank_value(value: Any, key: str, path: str | os.PathLike) -> int:
    try:
        rank = int(value) if isinstance(value, str) else value
    except ValueError:
        rank = None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _bad_header(path, key, value, "an integer rank >= 1")
    return rank


def _alpha_value(value: Any, key: str, path: str | os.PathLike) -> float:
    try:
        alpha = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    except ValueError:
        alpha = None
    if alpha is None or not math.isfinite(alpha):
        raise _bad_header(path, key, value, "a finite number (the LoRA alpha)")
    return alpha


def _targets_value(value: Any, key: str, path: str | os.PathLike) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise _bad_header(path, key, value, 'a non-empty JSON list of module names like ["to_q", "to_k"]')
    return tuple(value)


def run_config(metadata: Mapping[str, str], path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sdtune.config`` header as a dict, None when absent; a garbled one is a LoraFileError."""
    config = _header_json(metadata, "sdtune.config", path, dict, "a JSON object (the training run's config)")
    if config is not None and "model" in config:
        model = config["model"]
        if not isinstance(model, dict) or not all(isinstance(model.get(k), str) and model.get(k) for k in ("family", "path")):
            raise _bad_header(path, "sdtune.config", metadata["sdtune.config"],
                              "a run config whose 'model' entry has a 'family' and a 'path'")
    return config


def _sdtune_fields(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The spec fields our ``sdtune.*`` keys give: ``sdtune.targets`` (kohya files) and, in files
    written by earlier sdtune versions, ``sdtune.rank`` and ``sdtune.alpha``. Each is validated."""
    fields: dict[str, Any] = {}
    if "sdtune.rank" in metadata:
        fields["rank"] = _rank_value(metadata["sdtune.rank"], "sdtune.rank", path)
    if "sdtune.alpha" in metadata:
        fields["alpha"] = _alpha_value(metadata["sdtune.alpha"], "sdtune.alpha", path)
    if "sdtune.targets" in metadata:
        targets = _header_json(metadata, "sdtune.targets", path, list, 'a non-empty JSON list of module names like ["to_q", "to_k"]')
        fields["targets"] = _targets_value(targets, "sdtune.targets", path)
    return fields


def _diffusers_spec(metadata: Mapping[str, str], path: Path) -> LoraSpec | None:
    """The LoRA spec in diffusers' ``lora_adapter_metadata`` header (what ``load_lora_weights`` uses).

    None when the key is absent or holds no UNet entries. A target regex (a string) gives empty
    targets: the layers are then taken from the tensors, as for a headerless file.
    """
    key = DIFFUSERS_METADATA_KEY
    meta = _header_json(metadata, key, path, dict, "a JSON object (diffusers' LoRA adapter config)")
    prefix = denoiser_header_prefix(meta or {})
    if not meta or not any(k.startswith(prefix) for k in meta):
        return None
    for name in ("r", "lora_alpha"):
        if f"{prefix}{name}" not in meta:
            raise _bad_header(path, key, metadata[key], f"an adapter config with {prefix}{name}")
    rank = _rank_value(meta[f"{prefix}r"], f"{key}.{prefix}r", path)
    alpha = _alpha_value(meta[f"{prefix}lora_alpha"], f"{key}.{prefix}lora_alpha", path)
    targets = meta.get(f"{prefix}target_modules")
    if targets is None or isinstance(targets, str):
        return LoraSpec(rank, alpha, ())
    return LoraSpec(rank, alpha, _targets_value(targets, f"{key}.{prefix}target_modules", path))


def _tensor_spec(raw: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None,
                 kohya_parts: Mapping[str, int] | None = None) -> LoraSpec:
    """What the tensors alone say: the rank of the first down weight, alpha from kohya ``.alpha``
    scalars (diffusers' convention without a header is alpha = rank), no targets; a fused kohya
    module's (``kohya_parts``) per part."""
    parts = kohya_parts or {}
    downs = [int(v.shape[0]) // kohya_parts_of(k, parts) for k, v in raw.items()
             if k.endswith((".lora.down.weight", ".lora_down.weight", ".lora_A.weight", ".hada_w1_b", ".lokr_w2_b",
                            ".lokr_w1_b")) and not k.startswith(TEXT_ENCODER_KEYS)]
    declared = str((metadata or {}).get("ss_network_dim", ""))
    if downs:
        rank = downs[0]
    elif any(k.endswith(".lokr_w2") for k in raw):  # a LoKr of whole factors has no rank in its tensors
        rank = int(declared) if declared.isdigit() and int(declared) > 0 else 1
    else:
        raise LoraFileError(f"{str(path)!r} holds no UNet LoRA down weights")
    alphas = [float(v) / kohya_parts_of(k, parts) for k, v in raw.items()
              if k.endswith(KOHYA_ALPHA) and k.startswith(KOHYA_PREFIX) and v.numel() == 1]
    kind = kind_of(raw)
    return LoraSpec(rank=rank, alpha=alphas[0] if alphas else float(rank), targets=(),
                    type=kind if kind in ("loha", "lokr") else "lora", use_dora=kind == "dora")


def spec_from_header(metadata: Mapping[str, str], raw: Mapping[str, torch.Tensor], fmt: str, path: Path,
                     kohya_parts: Mapping[str, int] | None = None) -> LoraSpec:
    """The file's LoRA spec: diffusers' adapter header (diffusers files) or the tensors (kohya and
    headerless files), with whatever our ``sdtune.*`` keys add.

    When a header gives the spec it must agree with the other header and with the tensors: a file
    whose header says one rank and whose weights have another would load differently (or not at
    all) in each tool, so it is refused here with both values named. A diffusers file that holds
    alpha/rank in its tensors (``sdtune.alpha_in_tensors``) declares alpha = rank to diffusers and
    its true alpha as ``sdtune.alpha``. ``kohya_parts``: the family's fused kohya modules (a fused
    module's down has k * rank rows and its alpha is k * alpha).
    """
    declared = metadata.get("sdtune.format")
    if declared is not None and declared != fmt:
        raise LoraFileError(
            f"{str(path)!r}: header key 'sdtune.format' says {declared!r} but its tensor names are {fmt} format. {HEADER_FIX}"
        )
    ours = _sdtune_fields(metadata, path)
    theirs = _diffusers_spec(metadata, path)
    baked = metadata.get(ALPHA_IN_TENSORS)
    if baked not in (None, "true", "false"):
        raise _bad_header(path, ALPHA_IN_TENSORS, baked, '"true" or "false"')
    if baked == "true":
        if theirs is None or theirs.alpha != theirs.rank or "alpha" not in ours:
            raise LoraFileError(
                f"{str(path)!r}: header key {ALPHA_IN_TENSORS!r} says its tensors hold alpha/rank, so "
                f"{DIFFUSERS_METADATA_KEY} must give lora_alpha = r and sdtune.alpha the true alpha, but it gives "
                f"{theirs and (theirs.rank, theirs.alpha)!r} and sdtune.alpha {ours.get('alpha')!r}. {HEADER_FIX}")
        theirs = replace(theirs, alpha=ours["alpha"])
    if theirs is not None:
        for name, value in ours.items():
            other = getattr(theirs, name)
            differs = bool(other) and sorted(value) != sorted(other) if name == "targets" else value != other
            if differs:
                raise LoraFileError(
                    f"{str(path)!r}: the header contradicts itself: sdtune.{name} is {value!r} but "
                    f"{DIFFUSERS_METADATA_KEY} gives {name} {other!r}; diffusers and sdtune would load it differently. {HEADER_FIX}"
                )
    if theirs is not None and fmt in ("diffusers", "peft"):
        spec = replace(theirs, use_dora=kind_of(raw) == "dora", **ours)
    elif ours:
        spec = replace(_tensor_spec(raw, path, metadata, kohya_parts), **ours)
    else:
        return _tensor_spec(raw, path, metadata, kohya_parts)
    origin = "sdtune.*" if ours else DIFFUSERS_METADATA_KEY  # the key a user would look at first
    check_tensors_match(spec, raw, str(path), origin=f"header ({origin})", kohya_parts=kohya_parts)
    return spec


def kohya_parts_header(metadata: Mapping[str, str], path: str | os.PathLike) -> dict[str, int]:
    """The fused kohya modules a header records (``sdtune.kohya_parts``), {} when absent."""
    value = _header_json(metadata, KOHYA_PARTS, path, dict, 'a JSON object like {"lora_unet_double_blocks_#_img_attn_qkv": 3}')
    if value is None:
        return {}
    if not all(isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 2 for k, n in value.items()):
        raise _bad_header(path, KOHYA_PARTS, metadata[KOHYA_PARTS], "a JSON object of kohya names to part counts >= 2")
    return value


def text_encoder_spec_from_header(metadata: Mapping[str, str], path: str | os.PathLike) -> LoraSpec | None:
    """The text-encoder LoRA sdtune recorded (``sdtune.text_encoder``: rank, alpha, targets), None when absent."""
    key = "sdtune.text_encoder"
    value = _header_json(metadata, key, path, dict, 'a JSON object like {"rank": 4, "alpha": 4.0, "targets": ["q_proj"]}')
    if value is None:
        return None
    return LoraSpec(_rank_value(value.get("rank"), f"{key}.rank", path), _alpha_value(value.get("alpha"), f"{key}.alpha", path),
                    _targets_value(value.get("targets"), f"{key}.targets", path))
