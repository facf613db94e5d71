"""One LoRA for several diffusers modules that the original model fuses into one weight, and back.

The flow transformers' original layouts (BFL's FLUX, SAI's MMDiT) stack q, k and v (and, in a
FLUX single block, the MLP input) into one Linear; kohya, ComfyUI and Forge read LoRA files in
those names (:class:`sdtune.families.kohya.KohyaModule`). For a kohya module with parts
p1..pk, each a peft LoRA (A_p: r x in, B_p: out_p x r, alpha):

* down = cat(A_p) (k*r x in), up = block-diag(B_p) (sum(out_p) x k*r), alpha = k*alpha, so every
  reader's alpha/rank is the trained alpha/r and up @ down stacks the parts' B_p @ A_p exactly
  (kohya's own ``split_qkv`` save). A part that was not trained gets a zero (A, B) pair: every
  part keeps rank r, which is what puts diffusers' FLUX reader on its exact per-part path.
* Reading reverses it: the diagonal blocks, alpha/k. A file whose up is not block-diagonal (kohya
  trained the fused Linear as one) is split the way diffusers does: every part keeps the whole
  down, with its row slice of the up and the file's alpha.
* The halves of the up rows swap where the original orders its modulation (shift, scale).

Only plain LoRA fuses: DoRA's kohya ``dora_scale`` is a per-column norm of the whole fused weight,
and LoHa/LoKr factors cannot be stacked, so those are refused for fused or swapped modules.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdtune.families.kohya import KohyaModule
from sdtune.utils.errors import LoraFileError

DOWN, UP = ".lora_down.weight", ".lora_up.weight"  # kohya's suffixes
Part = tuple[torch.Tensor, torch.Tensor]  # (A / down, B / up) of one diffusers module


def refuse_variant(km: KohyaModule, key: str) -> LoraFileError:
    """The error for a DoRA/LoHa/LoKr tensor on a module the original layout fuses or swaps."""
    what = f"fuses {list(km.parts)} into one weight" if km.fused else "stores with its output halves swapped"
    return LoraFileError(
        f"tensor {key!r}: the kohya layout of this family {what} ({km.name}), and only a plain LoRA can be written "
        "that way (a DoRA scale is a norm of the whole weight; LoHa/LoKr factors cannot be stacked). Fix: write the "
        "diffusers layout (--format diffusers, callbacks.lora_export.format=diffusers), which keeps every module apart."
    )


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """The up rows with their two halves exchanged (diffusers' (scale, shift) <-> (shift, scale))."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse(km: KohyaModule, parts: Mapping[str, Part], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of kohya module ``km`` from the peft (A, B) of the parts trained (others: zeros)."""
    ranks = {m: int(a.shape[0]) for m, (a, _) in parts.items()}
    if len(set(ranks.values())) != 1:
        raise LoraFileError(f"{where}: the modules fused into {km.name} have different ranks {ranks}; a fused kohya "
                            "module needs one rank. Fix: write the diffusers layout (--format diffusers).")
    any_a, any_b = next(iter(parts.values()))
    rank, fan_in = int(any_a.shape[0]), int(any_a.shape[1])
    downs, ups = [], []
    for module, dim in zip(km.parts, km.dims, strict=True):
        a, b = parts.get(module, (None, None))
        if a is None:  # not trained: a zero pair keeps every part at rank r
            a, b = any_a.new_zeros(rank, fan_in), any_b.new_zeros(dim, rank)
        elif b.ndim != 2 or int(b.shape[0]) != dim or a.shape[1:] != any_a.shape[1:]:
            raise LoraFileError(f"{where}: {module} has LoRA shapes down {list(a.shape)}, up {list(b.shape)}, but as part "
                                f"of {km.name} it needs {fan_in} inputs and {dim} outputs. Was it trained on another base?")
        downs.append(a)
        ups.append(b)
    return torch.cat(downs), torch.block_diag(*ups)


def split(km: KohyaModule, down: torch.Tensor, up: torch.Tensor, alpha: float | None, where: str,
          keep=lambda module: True) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """peft (A, B, alpha) per part of a fused kohya module; a block-diagonal part whose B is zero is
    kept only where ``keep(module)`` (a module the header targets)."""
    k, fan_rank = len(km.parts), int(down.shape[0])
    if down.ndim != 2 or up.ndim != 2 or int(up.shape[1]) != fan_rank or int(up.shape[0]) != sum(km.dims):
        raise LoraFileError(f"{where}: {km.name} stacks {list(km.parts)} with {sum(km.dims)} outputs {list(km.dims)}, "
                            f"but the file's up is {list(up.shape)} and its down {list(down.shape)}. Was it trained on "
                            "another base?")
    starts = [sum(km.dims[:i]) for i in range(k)]
    rank = fan_rank // k
    diagonal = fan_rank % k == 0 and all(
        not up[s:s + d, q * rank:(q + 1) * rank].any()
        for p, (s, d) in enumerate(zip(starts, km.dims, strict=True)) for q in range(k) if q != p)
    out = {}
    for p, (module, s, d) in enumerate(zip(km.parts, starts, km.dims, strict=True)):
        if diagonal:
            b = up[s:s + d, p * rank:(p + 1) * rank]
            if not b.any() and not keep(module):
                continue
            out[module] = (down[p * rank:(p + 1) * rank], b, None if alpha is None else alpha / k)
        else:  # trained fused: the whole down for every part, as diffusers' converter splits it
            out[module] = (down, up[s:s + d], alpha)
    return out
