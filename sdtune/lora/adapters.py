"""Adapter variants through peft: DoRA (``lora.use_dora``), LoHa and LoKr (``lora.type``).

peft trains all three (``LoraConfig(use_dora=True)``, ``LoHaConfig``, ``LoKrConfig``; diffusers'
``add_adapter`` takes any peft config). This module names their tensors, checks the config, and
converts between peft's maths and what ComfyUI/Forge compute from a kohya/LyCORIS file:

* **DoRA**: peft's ``lora_magnitude_vector`` ``m`` is per output feature and the layer weight is
  ``m * (W + s·BA) / ||W + s·BA||_row``. ComfyUI's ``weight_decompose`` (comfy/weight_adapter/base.py)
  takes a ``dora_scale`` of shape ``[out, 1]`` as per output feature but divides by the norm of the
  *unpatched* ``W`` (plus float eps): ``dora_scale * (W + s·BA) / (||W||_row + eps)``. So we write
  ``dora_scale = m * (||W||_row + eps) / ||W + s·BA||_row``, computed from the base weights, and read
  a ``dora_scale`` back the same way: the file is then exact in ComfyUI, Forge and sdtune.
  A1111 (v1.10.1, extensions-builtin/Lora/network.py ``apply_weight_decompose``) knows only
  per-*input* DoRA: it divides ``dora_scale`` by the per-column norm ``||W + s·BA||_col`` ([1, in]),
  so an [out, 1] ``dora_scale`` broadcasts to [out, in] and gives a wrong weight with no message.
  No ``dora_scale`` serves both (ComfyUI needs it per row, A1111 divides it per column), so the file
  says which tools read it how (:data:`DORA_READERS`, header ``sdtune.dora_readers``), and
  :func:`dora_as_lora` writes a DoRA as a plain LoRA of its whole weight change, which every tool
  applies alike.
* **LoHa**: ``(w1a @ w1b) * (w2a @ w2b) * alpha / r`` in peft and ComfyUI alike (r = ``w1b`` rows).
* **LoKr**: ``kron(w1, w2) * alpha / r`` in peft; ComfyUI uses ``alpha / dim`` only where a factor
  is stored decomposed (``dim`` = rows of ``w2_b``, else of ``w1_b``) and scale 1 otherwise. A
  layer with a full ``lokr_w2`` is therefore written with ``alpha / r`` baked into ``lokr_w1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from sdtune.families.source import check_weights
from sdtune.utils.errors import ConfigError, LoraFileError

ADAPTER_TYPES = ("lora", "loha", "lokr")
NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}  # for messages
#: peft's parameter names of every variant, as a module-path segment (``<module>.<name>.default``)
PARAM_NAMES = (
    "lora_A", "lora_B", "lora_magnitude_vector",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
)
_PARAM = re.compile(r"\.(" + "|".join(PARAM_NAMES) + r")(?=\.|$)")
#: in-file suffixes of a layer's tensors besides LoRA's down/up: peft name == kohya/LyCORIS name
LYCORIS_SUFFIXES = tuple(f".{n}" for n in PARAM_NAMES if n.startswith(("hada_", "lokr_")))
MAGNITUDE = ".lora_magnitude_vector"  # peft's DoRA magnitude (its state-dict name)
DORA_SCALE = ".dora_scale"  # the kohya/LyCORIS name ComfyUI, Forge and A1111 read
EPS = torch.finfo(torch.float32).eps  # ComfyUI adds finfo(weight.dtype).eps to the norm
#: What each tool computes from a DoRA file sdtune writes, per layout, from each tool's own code:
#: ComfyUI v0.19.3 comfy/weight_adapter/base.py ``weight_decompose`` and Forge backend/patcher/lora.py
#: (per-output branch); A1111 v1.10.1 extensions-builtin/Lora/network.py ``apply_weight_decompose``
#: (per-input only); kohya sd-scripts networks/lora.py ``load_weights`` (``load_state_dict(.., False)``
#: skips ``dora_scale``); diffusers 0.42.1 lora_pipeline.py (filters ``dora_scale`` out, with a warning).
DORA_READERS: dict[str, dict[str, tuple[str, ...]]] = {
    "kohya": {"exact": ("ComfyUI", "Forge", "sdtune"),
              "magnitude_dropped": ("kohya sd-scripts", "diffusers"),  # applied as the plain LoRA W + s·BA
              "wrong": ("A1111",)},  # loads with no message, wrong weight
    "diffusers": {"exact": ("diffusers", "sdtune"),
                  "not_read": ("ComfyUI", "Forge", "A1111", "kohya sd-scripts")},  # they read the kohya layout
}
DORA_AS_LORA_FIX = ("python -m sdtune.export RUN/checkpoints/last.ckpt --dora-as-lora RANK --out FILE "
                    "(a plain LoRA of the DoRA's whole weight change, applied alike by every tool)")


def dora_note(format: str) -> str:
    """What each tool computes from a DoRA file in ``format`` ('kohya', 'diffusers'/'peft'), in words."""
    readers = DORA_READERS["diffusers" if format in ("diffusers", "peft") else "kohya"]
    if "wrong" in readers:
        return (f"DoRA file in the kohya layout: {', '.join(readers['exact'])} apply it exactly; "
                f"{' and '.join(readers['magnitude_dropped'])} drop its dora_scale and apply it as a plain LoRA "
                f"(without the DoRA magnitude); {', '.join(readers['wrong'])} loads it with no message but computes "
                "a wrong weight (its DoRA is per input feature, this file's per output feature, and the two broadcast). "
                f"Do not use it in A1111. For A1111 and kohya sd-scripts: {DORA_AS_LORA_FIX}.")
    return (f"DoRA file in the diffusers layout: {', '.join(readers['exact'])} apply it exactly; "
            f"{', '.join(readers['not_read'])} do not read it as DoRA (use the kohya layout in ComfyUI and Forge). "
            f"For A1111 and kohya sd-scripts: {DORA_AS_LORA_FIX}.")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is a trainable adapter tensor of any variant."""
    return bool(_PARAM.search(key))


def module_of(key: str) -> str:
    """``<module>`` of a peft-named adapter key (``<module>.hada_w1_a``, ``<module>.lora_A.weight``...)."""
    match = _PARAM.search(key)
    if match is None:
        return key.rsplit(".", 1)[0] if key.endswith(DORA_SCALE) else key
    return key[: match.start()]


def strip_adapter_name(key: str, adapter: str) -> str:
    """A module state-dict key -> the key peft's ``get_peft_model_state_dict`` gives it:
    ``.lora_A.<a>.weight`` -> ``.lora_A.weight``, ``.lora_magnitude_vector.<a>.weight`` ->
    ``.lora_magnitude_vector``, ``.hada_w1_a.<a>`` -> ``.hada_w1_a``."""
    key = key.replace(f"{MAGNITUDE}.{adapter}.weight", MAGNITUDE)
    return re.sub(r"\.(" + "|".join(PARAM_NAMES) + rf")\.{re.escape(adapter)}(?=\.|$)", r".\1", key)


def kind_of(keys) -> str:
    """'lora', 'dora', 'loha' or 'lokr' from tensor names."""
    keys = list(keys)
    if any(".hada_" in k for k in keys):
        return "loha"
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(k.endswith((MAGNITUDE, DORA_SCALE)) for k in keys):
        return "dora"
    return "lora"


# -- config --------------------------------------------------------------------------------------
def check_adapter_config(lora_cfg: Mapping[str, Any], export_format: str | None = None) -> None:
    """Refuse adapter settings that do not go together, naming the keys and the fix (part of
    :func:`sdtune.lora.layers.check_config`, the ``lora:`` section's check)."""
    kind = lora_cfg.get("type", "lora")
    if kind not in ADAPTER_TYPES:
        raise ConfigError(f"lora.type must be one of {list(ADAPTER_TYPES)}, got {kind!r}.")
    dora = lora_cfg.get("use_dora", False)
    if not isinstance(dora, bool):
        raise ConfigError(f"lora.use_dora must be true or false, got {dora!r}.")
    if dora and kind != "lora":
        raise ConfigError(f"lora.use_dora=true works with lora.type=lora only (DoRA decomposes a LoRA's weight), got "
                          f"lora.type={kind}. Fix: lora.type=lora lora.use_dora=true, or lora.use_dora=false.")
    if kind != "lora" and float(lora_cfg.get("dropout") or 0.0) > 0:
        raise ConfigError(f"lora.dropout applies to lora.type=lora only; peft's {NAMES[kind]} has no such dropout. "
                          f"Fix: lora.dropout=0 with lora.type={kind}.")
    if kind != "lora" and export_format == "diffusers":
        raise ConfigError(f"callbacks.lora_export.format=diffusers cannot hold a lora.type={kind} adapter: diffusers' "
                          "load_lora_weights loads LoRA and DoRA only. Fix: callbacks.lora_export.format=kohya "
                          "(ComfyUI, Forge and A1111 load LoHa/LoKr files).")


def peft_config(rank: int, alpha: float, targets, *, kind: str = "lora", use_dora: bool = False,
                dropout: float = 0.0, init: str | bool = "gaussian"):
    """The peft config that trains this adapter (LoHa/LoKr start at a zero delta, peft's default init)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=list(targets), init_weights=True)
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                      init_lora_weights=init, use_dora=use_dora)


# -- DoRA: peft magnitude <-> ComfyUI dora_scale ---------------------------------------------------
def _rows(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-feature L2 norm, shaped to broadcast over ``weight`` ([out, 1] or [out, 1, 1, 1])."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def lora_delta(tensors: Mapping[str, torch.Tensor], module: str, scale: float, shape) -> torch.Tensor:
    up, down = tensors[f"{module}.lora_B.weight"].float(), tensors[f"{module}.lora_A.weight"].float()
    return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def magnitude_to_dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """peft's ``m`` -> the ``dora_scale`` with which ComfyUI's merge gives peft's weight exactly."""
    weight = weight.float()
    return (magnitude.float().reshape(_rows(weight).shape) * (_rows(weight) + EPS) / _rows(weight + delta)).contiguous()


def dora_scale_to_magnitude(dora_scale: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, where: str) -> torch.Tensor:
    """A file's ``dora_scale`` -> peft's ``m`` giving the weight ComfyUI computes from it."""
    weight = weight.float()
    if dora_scale.shape[0] != weight.shape[0] or dora_scale.numel() != weight.shape[0]:
        raise LoraFileError(
            f"{where}: dora_scale has shape {list(dora_scale.shape)}, a per-input-feature DoRA (kohya's convention); "
            f"sdtune applies per-output-feature DoRA (shape [{weight.shape[0]}, 1], LyCORIS/peft) only. "
            "Fix: use the file in A1111 or ComfyUI."
        )
    magnitude = (dora_scale.float().reshape(_rows(weight).shape) * _rows(weight + delta) / (_rows(weight) + EPS)).flatten()
    return magnitude if weight.dim() == 2 else magnitude.reshape(1, -1, *[1] * (weight.dim() - 2))  # peft's conv shape


def to_kohya_maths(tensors: Mapping[str, torch.Tensor], rank: int, alpha: float,
                   base_weights: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """peft-named tensors rewritten so that ComfyUI's formulas give peft's weights: DoRA
    magnitudes become ``.dora_scale`` (needs ``base_weights``, module -> frozen weight), full
    LoKr layers get ``alpha / rank`` baked into ``lokr_w1``."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(MAGNITUDE)]:
        module = key[: -len(MAGNITUDE)]
        if base_weights is None or module not in base_weights:
            raise LoraFileError(
                "a DoRA LoRA in kohya layout needs the base model's weights (ComfyUI's dora_scale is relative to them), "
                "and they are not at hand. Fix: make model.path reachable when exporting, or export with --format "
                "diffusers (peft layout with lora_magnitude_vector, which diffusers' load_lora_weights reads)."
            )
        weight = base_weights[module]
        delta = lora_delta(tensors, module, alpha / rank, weight.shape)
        out[module + DORA_SCALE] = magnitude_to_dora_scale(out.pop(key), weight, delta)
    for key in [k for k in tensors if k.endswith(".lokr_w1")]:
        module = key[: -len(".lokr_w1")]
        if f"{module}.lokr_w2" in tensors:
            out[key] = tensors[key] * (alpha / rank)
    return out


def dora_weight(tensors: Mapping[str, torch.Tensor], module: str, scale: float, weight: torch.Tensor) -> torch.Tensor:
    """The weight peft's DoRA gives ``module``: ``m * (W + s·BA) / ||W + s·BA||_row``."""
    weight = weight.float()
    merged = weight + lora_delta(tensors, module, scale, weight.shape)
    return tensors[module + MAGNITUDE].float().reshape(_rows(weight).shape) * merged / _rows(merged)


def _top_subspace(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with ``up @ down`` the best rank-``rank`` approximation of ``change`` (Eckart-Young):
    the projection onto its top singular vectors, found by ``eigh`` of the smaller Gram matrix, so
    that at full rank the projection is the identity and the product exact. Zero-padded to ``rank``."""
    rows, cols = change.shape
    r = min(rank, rows, cols)
    up = torch.zeros(rows, rank, dtype=change.dtype)
    down = torch.zeros(rank, cols, dtype=change.dtype)
    if rows <= cols:
        basis = torch.linalg.eigh(change @ change.T).eigenvectors[:, -r:]  # eigenvalues ascend
        up[:, :r], down[:r] = basis, basis.T @ change
    else:
        basis = torch.linalg.eigh(change.T @ change).eigenvectors[:, -r:]
        up[:, :r], down[:r] = change @ basis, basis.T
    return up, down


def dora_as_lora(tensors: Mapping[str, torch.Tensor], rank: int, alpha: float, base_weights: Mapping[str, torch.Tensor],
                 out_rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """A DoRA's peft tensors as a plain LoRA of rank ``out_rank`` and alpha ``out_rank`` (scale 1):
    per layer, the best rank-``out_rank`` approximation (truncated SVD) of the whole change
    ``W_dora - W`` (a layer narrower than ``out_rank`` is padded with zeros, which changes nothing). Every tool applies a plain LoRA
    alike. Returns the tensors and the worst relative Frobenius error of a layer's change (0 when
    ``out_rank`` reaches every layer's full rank)."""
    if out_rank < 1:
        raise ConfigError(f"--dora-as-lora must be a rank of at least 1, got {out_rank}.")
    out, worst = {}, 0.0
    for module in sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")):
        if module not in base_weights:
            raise LoraFileError(f"a DoRA written as a plain LoRA needs the base weight of {module!r}, which is not at "
                                "hand. Fix: make model.path reachable when exporting.")
        weight = base_weights[module].float()
        changed = dora_weight(tensors, module, alpha / rank, weight) if module + MAGNITUDE in tensors else \
            weight + lora_delta(tensors, module, alpha / rank, weight.shape)
        change = (changed - weight).reshape(weight.shape[0], -1).double()
        up, down = _top_subspace(change, out_rank)
        norm = change.norm().item()
        worst = max(worst, (change - up @ down).norm().item() / norm if norm > 0 else 0.0)
        extra = [1] * (weight.dim() - 2)  # a conv's lora_B is a 1x1 conv, its lora_A has the kernel
        out[f"{module}.lora_B.weight"] = up.float().reshape(weight.shape[0], out_rank, *extra).contiguous()
        out[f"{module}.lora_A.weight"] = down.float().reshape(out_rank, *weight.shape[1:]).contiguous()
    return out, worst


def base_weights(unet: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen weight of every DoRA layer in ``tensors`` (what its kohya ``dora_scale`` is relative to)."""
    out = {}
    for key in tensors:
        if key.endswith(MAGNITUDE):
            module = key[: -len(MAGNITUDE)]
            layer = unet.get_submodule(module)
            out[module] = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight.detach().float().cpu()
    return out


def base_weights_from(model_path: str, tensors: Mapping[str, torch.Tensor], *, origin: str) -> dict[str, torch.Tensor] | None:
    """:func:`base_weights` read from the base model's UNet at ``model_path`` (offline), or None.
    ``origin``: the file that named ``model_path``; pickle weights are never loaded from such a path."""
    if not any(k.endswith(MAGNITUDE) for k in tensors):
        return {}
    from diffusers import UNet2DConditionModel

    check_weights(model_path, key="model.path", allow_pickle=False, origin=origin)

    try:
        unet = UNet2DConditionModel.from_pretrained(str(model_path), subfolder="unet", local_files_only=True)
    except Exception:
        return None
    return base_weights(unet, tensors)


# -- read back: a layer group in ComfyUI's maths -> peft config and tensors -------------------------
def load_plan(tensors: Mapping[str, torch.Tensor], alphas: Mapping[str, float],
              model: torch.nn.Module | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """(peft config, peft tensors) giving exactly the weights ComfyUI computes from a DoRA, LoHa
    or LoKr file's layers (``alphas``: per module, absent = rank). ``model`` holds the base
    weights a ``dora_scale`` is relative to."""
    kind = kind_of(tensors)
    tensors = dict(tensors)
    modules = sorted({module_of(k) for k in tensors})
    ranks, alpha_of = {}, {}
    if kind == "loha":
        if any(".hada_t" in k for k in tensors):
            raise LoraFileError("LoHa layers with Tucker factors (hada_t1/hada_t2) cannot be applied by sdtune. "
                                "Fix: use the file in ComfyUI or A1111.")
        for m in modules:
            ranks[m] = int(tensors[f"{m}.hada_w1_b"].shape[0])
            alpha_of[m] = float(alphas.get(m, ranks[m]))
    elif kind == "lokr":
        for m in modules:
            ranks[m], alpha_of[m] = _lokr_layer(tensors, m, alphas.get(m))
    else:  # DoRA
        modules = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
        for m in modules:
            ranks[m] = int(tensors[f"{m}.lora_A.weight"].shape[0])
            alpha_of[m] = float(alphas.get(m, ranks[m]))
            if f"{m}{DORA_SCALE}" in tensors:
                if model is None:
                    raise LoraFileError("a kohya DoRA file's dora_scale needs the base model to be applied")
                layer = model.get_submodule(m)
                weight = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight.detach()
                delta = lora_delta(tensors, m, alpha_of[m] / ranks[m], weight.shape)
                tensors[m + MAGNITUDE] = dora_scale_to_magnitude(tensors.pop(f"{m}{DORA_SCALE}"), weight, delta, m)
    return _config(kind, ranks, alpha_of), tensors


def _lokr_layer(tensors: dict[str, torch.Tensor], m: str, alpha: float | None) -> tuple[int, float]:
    """Rewrite one LoKr layer into peft's form (full ``lokr_w1``; ``lokr_w2`` full or ``_a @ _b``),
    returning the peft (rank, alpha) that reproduce ComfyUI's scale for it."""
    if f"{m}.lokr_t2" in tensors:
        raise LoraFileError(f"LoKr layer {m!r} has a Tucker factor (lokr_t2), which sdtune cannot apply. "
                            "Fix: use the file in ComfyUI or A1111.")
    dim = None
    if f"{m}.lokr_w1" not in tensors:  # peft keeps w1 whole: multiply a decomposed one out (exact)
        a, b = tensors.pop(f"{m}.lokr_w1_a"), tensors.pop(f"{m}.lokr_w1_b")
        dim = int(b.shape[0])
        tensors[f"{m}.lokr_w1"] = a.float() @ b.float()
    if f"{m}.lokr_w2" not in tensors:
        dim = int(tensors[f"{m}.lokr_w2_b"].shape[0])
    scale = alpha / dim if alpha is not None and dim is not None else 1.0  # ComfyUI's rule
    if f"{m}.lokr_w2" in tensors:  # peft keeps w2 whole when r >= max(w2 shape) / 2
        rank = max(tensors[f"{m}.lokr_w2"].shape)
    else:
        rank = int(tensors[f"{m}.lokr_w2_b"].shape[0])
    return rank, scale * rank


def _config(kind: str, ranks: Mapping[str, int], alpha_of: Mapping[str, float]):
    from collections import Counter

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alpha_of.values()).most_common(1)[0][0]
    patterns = {"rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
                "alpha_pattern": {re.escape(m): a for m, a in alpha_of.items() if a != alpha}}
    targets = sorted(ranks)
    if kind in ("loha", "lokr"):
        from peft import LoHaConfig, LoKrConfig

        cls = LoHaConfig if kind == "loha" else LoKrConfig
        return cls(r=rank, alpha=alpha, target_modules=targets, init_weights=False, **patterns)
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_dora=True, **patterns)
