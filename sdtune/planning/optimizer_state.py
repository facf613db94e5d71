"""Bytes of the optimizer's state for the run's LoRA parameters, from the optimizer class itself.

The state an optimizer keeps for a parameter depends on the parameter's shape and dtype only
(AdamW: two moments and a step count; Adafactor: factored row and column moments for a matrix;
Prodigy: two moments, its ``s`` and a copy of the start weights). So :func:`state_bytes` builds
the run's optimizer (:func:`sdtune.training.optimization.build_optimization`, the one training
uses) over one real, zero-filled CPU tensor per distinct (shape, dtype), runs one step, counts
what each parameter's state holds, and multiplies by how many LoRA parameters have that shape:
the figure of the real class for a few kilobytes of CPU memory.

bitsandbytes' 8-bit optimizers need a CUDA device to step, so they are counted by their
documented layout (``Optimizer2State.init_state`` in bitsandbytes 0.4x-0.5x): a parameter with at
least ``min_8bit_size`` elements keeps each state in uint8 plus one float32 absmax per block of
:data:`BNB_BLOCK` elements; a smaller one keeps float32 states; the two 256-entry quantization
maps are shared.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sdtune.training.optimization import build_optimization

#: bitsandbytes' block size of the 8-bit optimizers' block-wise absmax (fixed in ``init_state``).
BNB_BLOCK = 256
#: bitsandbytes' default ``min_8bit_size``: smaller tensors keep 32-bit states.
BNB_MIN_8BIT = 4096
#: States per parameter of the bitsandbytes optimizers by class name (Adam's two moments; 1 for the others).
BNB_STATES = {"Adam8bit": 2, "AdamW8bit": 2, "PagedAdamW8bit": 2, "PagedAdam8bit": 2, "AdEMAMix8bit": 3}


def optimizer_name(optim_cfg: Mapping[str, Any]) -> str:
    """``torch.optim.AdamW`` -> ``AdamW`` (the class name of ``optim.optimizer._target_``)."""
    return str(optim_cfg["optimizer"].get("_target_", "")).rpartition(".")[2]


def state_bytes(optim_cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any], params: Iterable[torch.Tensor]) -> int:
    """Bytes of the optimizer state ``optim_cfg`` keeps for ``params`` (shapes and dtypes are read,
    meta tensors are fine)."""
    counts = Counter((tuple(p.shape), str(p.dtype)) for p in params)
    if not counts:
        return 0
    key = json.dumps({"optim": dict(optim_cfg), "precision": str(trainer_cfg.get("precision"))}, sort_keys=True,
                     default=str)
    return _state_bytes(key, tuple(sorted(counts.items())))


@functools.lru_cache(maxsize=64)
def _state_bytes(key: str, counts: tuple[tuple[tuple[tuple[int, ...], str], int], ...]) -> int:
    spec = json.loads(key)
    optim_cfg = spec["optim"]
    if str(optim_cfg["optimizer"].get("_target_", "")).startswith("bitsandbytes."):
        return bnb_state_bytes(optim_cfg, counts)
    per_shape = _per_parameter_state(key, tuple(shape for shape, _ in counts))
    return sum(per_shape[shape] * n for shape, n in counts)


def _per_parameter_state(key: str, shapes: tuple[tuple[tuple[int, ...], str], ...]) -> dict:
    """State bytes of one parameter of each (shape, dtype), by one step of the real optimizer."""
    spec = json.loads(key)
    params = []
    for shape, dtype in shapes:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch."))))
        param.grad = torch.full_like(param, 1e-3)
        params.append(param)
    named = [(f"p{i}.lora_{'B' if i % 2 else 'A'}.w", p) for i, p in enumerate(params)]  # LoRA+ splits by name
    optimizer = build_optimization(spec["optim"], {"precision": spec["precision"]}, named, device=torch.device("cpu"),
                                   total_steps=10)["optimizer"]
    optimizer.step()
    out = {}
    for (shape, dtype), param in zip(shapes, params):
        seen: set[int] = set()
        total = 0
        for value in optimizer.state[param].values():
            if isinstance(value, torch.Tensor) and id(value.untyped_storage()) not in seen:
                seen.add(id(value.untyped_storage()))
                total += value.untyped_storage().nbytes()
        out[(shape, dtype)] = total
    return out


def bnb_state_bytes(optim_cfg: Mapping[str, Any], counts: Iterable[tuple[tuple[tuple[int, ...], str], int]]) -> int:
    """bitsandbytes' 8-bit optimizer state by its layout (see the module's docstring)."""
    name = str(optim_cfg["optimizer"]["_target_"]).rpartition(".")[2]
    states = BNB_STATES.get(name, 1)
    minimum = int(optim_cfg["optimizer"].get("min_8bit_size") or _bnb_default_min(name))
    total = 2 * 256 * 4  # the signed and unsigned quantization maps, shared by all parameters
    for (shape, _dtype), n in counts:
        elements = math.prod(shape)
        if elements < minimum:
            each = states * 4 * elements
        else:
            each = states * (elements + 4 * math.ceil(elements / BNB_BLOCK))
        total += each * n
    return total


def _bnb_default_min(name: str) -> int:
    """``min_8bit_size``'s default of the installed bitsandbytes class, else :data:`BNB_MIN_8BIT`."""
    try:
        import bitsandbytes.optim as bnb_optim  # optional; its default only
    except Exception:  # not installed, or no CUDA build: the documented default
        return BNB_MIN_8BIT
    cls = getattr(bnb_optim, name, None)
    default = inspect.signature(cls).parameters.get("min_8bit_size") if cls else None
    return int(default.default) if default is not None else BNB_MIN_8BIT
