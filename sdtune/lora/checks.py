"""Checks on what LoRA files and checkpoints hold: finite values, header values, tensors vs header.

A file that is not what it claims (NaN weights, a garbled header, a header that contradicts its
tensors, a PNG renamed to ``.ckpt``) is refused with one message naming the file, the key or
tensor, and the fix, wherever it enters or leaves sdtune.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdtune.lora.keys import KOHYA_ALPHA, denoiser_prefixes, kohya_parts_of
from sdtune.lora.layers import LoraSpec
from sdtune.utils.errors import LoraFileError

#: Text-encoder layers of other tools' files (kohya lora_te*, diffusers text_encoder*): own ranks, not checked
TEXT_ENCODER_KEYS = ("lora_te", "text_encoder")


# -- finite values ------------------------------------------------------------------------------
NONFINITE_FIX = (
    "the training diverged before these weights were saved. Use an earlier checkpoint from the run's "
    "checkpoints/ folder (`python -m sdtune.export RUN/checkpoints/<step>.ckpt --out FILE`), or retrain with a "
    "lower optim.optimizer.lr."
)


def nonfinite_tensors(tensors: Mapping[str, Any]) -> tuple[list[str], int] | None:
    """(sorted names of floating tensors holding NaN/Inf, total count of such values), or None if all finite.

    Non-tensor values and integer tensors are skipped, so a whole checkpoint section can be passed.
    """
    names, count = [], 0
    for name in sorted(tensors):
        value = tensors[name]
        if not torch.is_tensor(value) or not (value.is_floating_point() or value.is_complex()):
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            names.append(name)
            count += int(finite.numel() - finite.sum())
    return (names, count) if names else None


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike, *, fix: str | None = None) -> None:
    """Raise :class:`LoraFileError` if any floating tensor in ``tensors`` holds NaN or Inf.

    A NaN LoRA weight makes every image black and every merged model NaN, and nothing downstream
    complains, so sdtune refuses such weights wherever they enter or leave: reading a LoRA file,
    exporting a checkpoint, writing a LoRA, resuming. ``source`` (a file path) is named in the
    message with the first offending tensors and the count of non-finite values.
    """
    bad = nonfinite_tensors(tensors)
    if bad:
        names, count = bad
        raise LoraFileError(
            f"{str(source)!r} holds non-finite values: {len(names)} tensor(s), {count} value(s) NaN/Inf, "
            f"e.g. {', '.join(names[:3])}. Fix: {fix or NONFINITE_FIX}"
        )


# -- what a file is, when it is not what it should be -------------------------------------------
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (e.g. a WebP image)"),
    (b"PK\x03\x04", "a zip archive, such as a PyTorch .ckpt/.pt/.bin file"),
    (b"\x80", "a Python pickle, such as an old-style PyTorch .ckpt/.pt/.bin file"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run `git lfs pull`)"),
)


def file_kind(head: bytes) -> str | None:
    """What a file whose first bytes are ``head`` evidently is (e.g. 'a PNG image'), or None."""
    if not head:
        return "empty (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return None


def not_safetensors(path: Path) -> str | None:
    """Why ``path`` is evidently not a .safetensors file, or None when it may be one.

    A .safetensors file starts with an 8-byte header length followed by a JSON object.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if len(head) >= 9 and head[8:9] == b"{":
        return None
    return file_kind(head)


def first_line(err: BaseException) -> str:
    """``Type: first non-empty line`` of an exception, never an IndexError for an empty message."""
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {line[:200]}" if line else type(err).__name__


# -- header values -------------------------------------------------------------------------------
HEADER_FIX = (
    "Fix: re-export the file from its training checkpoint (`python -m sdtune.export RUN/checkpoints/last.ckpt "
    "--out FILE`), or correct or delete that header entry."
)


_DOWN_UP = (
    (".lora_A.weight", ".lora_B.weight"),  # peft, in memory and in checkpoints
    (".lora.down.weight", ".lora.up.weight"),  # diffusers files
    (".lora_down.weight", ".lora_up.weight"),  # kohya files
)


def check_tensors_match(
    spec: LoraSpec, tensors: Mapping[str, torch.Tensor], source: str, *, origin: str, fix: str = HEADER_FIX,
    kohya_parts: Mapping[str, int] | None = None,
) -> None:
    """Refuse LoRA tensors that contradict ``spec`` (from ``origin``: a header or a run config).

    Checked: every down weight has ``spec.rank`` rows and every up weight ``spec.rank`` columns,
    downs and ups come in pairs, kohya ``.alpha`` scalars equal ``spec.alpha``, and (for peft- and
    diffusers-named tensors, whose module paths are explicit) every layer matches one of
    ``spec.targets`` and every target matches a layer, by peft's rule (``name == t`` or
    ``name.endswith("." + t)``). Text-encoder layers (``lora_te*``, ``text_encoder*``) are skipped.
    The message names ``source``, both values and ``fix``. A fused kohya module of k parts
    (``kohya_parts``, :func:`sdtune.lora.keys.kohya_fused_parts`) has k * rank and k * alpha.
    """

    stems: set[str] = set()
    halves: dict[str, set[str]] = {}
    for key, value in sorted(tensors.items()):
        if key.startswith(TEXT_ENCODER_KEYS):
            continue
        if key.endswith(KOHYA_ALPHA):
            if value.numel() != 1:
                raise LoraFileError(f"{source!r}: tensor {key!r} should be one scalar alpha but has shape {list(value.shape)}")
            if not math.isclose(float(value) / kohya_parts_of(key, kohya_parts or {}), spec.alpha, rel_tol=1e-6):
                raise LoraFileError(
                    f"{source!r}: the {origin} says alpha {spec.alpha!r} but tensor {key!r} holds alpha {float(value)!r}. {fix}"
                )
            continue
        for down, up in _DOWN_UP:
            for half, suffix, dim in (("down", down, 0), ("up", up, 1)):
                if not key.endswith(suffix):
                    continue
                stem = key[: -len(suffix)]
                halves.setdefault(stem, set()).add(half)
                rank = int(value.shape[dim]) // kohya_parts_of(key, kohya_parts or {}) if value.ndim >= 2 else None
                if rank != spec.rank:
                    raise LoraFileError(
                        f"{source!r}: the {origin} says rank {spec.rank} but tensor {key!r} has "
                        f"{'rank ' + str(rank) if rank is not None else 'shape ' + str(list(value.shape))}. {fix}"
                    )
                if suffix in (".lora_A.weight", ".lora.down.weight"):
                    stems.add(next((stem[len(p):] for p in denoiser_prefixes() if stem.startswith(p)), stem))
    unpaired = sorted(stem for stem, got in halves.items() if len(got) != 2)
    if unpaired:
        raise LoraFileError(
            f"{source!r}: {len(unpaired)} LoRA layer(s) have a down or an up weight but not both, e.g. {unpaired[:3]}. "
            f"The LoRA is incomplete. {fix}"
        )
    if spec.targets and stems:
        _check_targets(set(spec.targets), stems, source, origin, fix)


def _check_targets(targets: set[str], stems: set[str], source: str, origin: str, fix: str) -> None:
    """Every layer matches a target and every target a layer, by peft's suffix rule."""

    def matches(stem: str, target: str) -> bool:
        return stem == target or stem.endswith("." + target)

    stray = sorted(s for s in stems if not any(matches(s, t) for t in targets))
    unused = sorted(t for t in targets if not any(matches(s, t) for s in stems))
    if stray or unused:
        parts = []
        if stray:
            parts.append(f"{len(stray)} layer(s) in the file match none of them, e.g. {stray[:3]}")
        if unused:
            parts.append(f"target(s) {unused} match no layer in the file")
        raise LoraFileError(
            f"{source!r}: the {origin} names targets {sorted(targets)} but " + "; ".join(parts) + f". {fix}"
        )
