"""Read what a LoRA file's header says: the rank, alpha and targets (sdtune's keys, else diffusers'
adapter metadata, else the tensors themselves) and the run config, refusing garbled values with
the key, the value and the fix."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import LoraFileError
from .lora import LoraSpec
from .lora_checks import COMPONENT_PREFIX, DIFFUSERS_METADATA_KEY, HEADER_FIX, check_tensors_match
from .lora_keys import KOHYA_ALPHA


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


SDTUNE_SPEC_KEYS = ("sdtune.rank", "sdtune.alpha", "sdtune.targets")


def _sdtune_spec(metadata: Mapping[str, str], path: Path) -> LoraSpec | None:
    """The LoRA spec from our ``sdtune.*`` header keys; None when the file has none of them."""
    present = [k for k in SDTUNE_SPEC_KEYS if k in metadata]
    if not present:
        return None
    missing = [k for k in SDTUNE_SPEC_KEYS if k not in metadata]
    if missing:
        raise LoraFileError(
            f"{str(path)!r}: the header has {present} but lacks {missing}; the three go together. {HEADER_FIX}"
        )
    targets = _header_json(metadata, "sdtune.targets", path, list, 'a non-empty JSON list of module names like ["to_q", "to_k"]')
    return LoraSpec(
        rank=_rank_value(metadata["sdtune.rank"], "sdtune.rank", path),
        alpha=_alpha_value(metadata["sdtune.alpha"], "sdtune.alpha", path),
        targets=_targets_value(targets, "sdtune.targets", path),
    )


def _diffusers_spec(metadata: Mapping[str, str], path: Path) -> LoraSpec | None:
    """The LoRA spec in diffusers' ``lora_adapter_metadata`` header (what ``load_lora_weights`` uses).

    None when the key is absent or holds no UNet entries. A target regex (a string) gives empty
    targets: the layers are then taken from the tensors, as for a headerless file.
    """
    key = DIFFUSERS_METADATA_KEY
    meta = _header_json(metadata, key, path, dict, "a JSON object (diffusers' LoRA adapter config)")
    if not meta or not any(k.startswith(COMPONENT_PREFIX) for k in meta):
        return None
    for name in ("r", "lora_alpha"):
        if f"{COMPONENT_PREFIX}{name}" not in meta:
            raise _bad_header(path, key, metadata[key], f"an adapter config with {COMPONENT_PREFIX}{name}")
    rank = _rank_value(meta[f"{COMPONENT_PREFIX}r"], f"{key}.{COMPONENT_PREFIX}r", path)
    alpha = _alpha_value(meta[f"{COMPONENT_PREFIX}lora_alpha"], f"{key}.{COMPONENT_PREFIX}lora_alpha", path)
    targets = meta.get(f"{COMPONENT_PREFIX}target_modules")
    if targets is None or isinstance(targets, str):
        return LoraSpec(rank, alpha, ())
    return LoraSpec(rank, alpha, _targets_value(targets, f"{key}.{COMPONENT_PREFIX}target_modules", path))


def spec_from_header(metadata: Mapping[str, str], raw: Mapping[str, torch.Tensor], fmt: str, path: Path) -> LoraSpec:
    """The file's LoRA spec: from our header, else diffusers' header, else the tensors themselves.

    When a header gives the spec it must agree with the other header and with the tensors: a file
    whose header says one rank and whose weights have another would load differently (or not at
    all) in each tool, so it is refused here with both values named.
    """
    declared = metadata.get("sdtune.format")
    if declared is not None and declared != fmt:
        raise LoraFileError(
            f"{str(path)!r}: header key 'sdtune.format' says {declared!r} but its tensor names are {fmt} format. {HEADER_FIX}"
        )
    ours = _sdtune_spec(metadata, path)
    theirs = _diffusers_spec(metadata, path)
    if ours is not None and theirs is not None:
        for name, a, b in (("rank", ours.rank, theirs.rank), ("alpha", ours.alpha, theirs.alpha),
                           ("targets", sorted(ours.targets), sorted(theirs.targets) or sorted(ours.targets))):
            if a != b:
                raise LoraFileError(
                    f"{str(path)!r}: the header contradicts itself: sdtune.{name} is {a!r} but "
                    f"{DIFFUSERS_METADATA_KEY} gives {name} {b!r}; diffusers and sdtune would load it differently. {HEADER_FIX}"
                )
    if ours is not None:
        spec, origin = ours, "sdtune.*"
    elif theirs is not None and fmt == "diffusers":
        spec, origin = theirs, DIFFUSERS_METADATA_KEY
    else:
        downs = [v for k, v in raw.items() if k.endswith((".lora.down.weight", ".lora_down.weight")) and not k.startswith("lora_te")]
        if not downs:
            raise LoraFileError(f"{str(path)!r} holds no UNet LoRA down weights")
        rank = int(downs[0].shape[0])
        alphas = [float(v) for k, v in raw.items() if k.endswith(KOHYA_ALPHA) and k.startswith("lora_unet_") and v.numel() == 1]
        # No header: kohya files carry .alpha tensors; diffusers' own convention is alpha = rank.
        return LoraSpec(rank=rank, alpha=alphas[0] if alphas else float(rank), targets=())
    check_tensors_match(spec, raw, str(path), origin=f"header ({origin})")
    return spec
