"""The frozen base held in 8 bits or less (``model.quantize``): the modes, what each stores, and
which layers it replaces.

A mode quantizes every ``nn.Linear`` weight of a part (the denoiser, a large text encoder) when
the part is loaded, through the library's own quantization config: torchao for ``int8`` and
``fp8`` (weight-only: the weight is stored in 8 bits and dequantized inside the matmul, so peft's
``TorchaoLoraLinear`` trains a LoRA on top in full precision), bitsandbytes for ``nf4`` (QLoRA's
4-bit NormalFloat, peft's ``Linear4bit``). Convolutions, norms, embeddings and the modules a model
class keeps in fp32 (``_keep_in_fp32_modules``) stay in the run's weight dtype.

:meth:`QuantMode.weight_bytes` is the bytes one quantized ``Linear`` weight takes as the backend
stores it; :func:`part_bytes` applies it to a model built on the meta device, so the memory
planner counts a quantized base before any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sdtune.families.base import ModelFamily


@dataclass(frozen=True)
class QuantMode:
    """One ``model.quantize`` value."""

    name: str
    #: The quantization library ("torchao" or "bitsandbytes").
    backend: str
    #: What the mode needs of the device, for the refusal on machines without it.
    needs: str
    #: The smallest CUDA compute capability that runs it; None: the CPU runs it too.
    min_capability: tuple[int, int] | None
    #: Bits per weight, for the planner's table.
    bits: int

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of one quantized ``Linear`` weight of shape (out, in), as the backend stores it."""
        n = out_features * in_features
        if self.name == "int8":
            # torchao Int8Tensor: int8 qdata (out, in), fp32 scale and int8 zero point per row.
            return n + out_features * (4 + 1)
        if self.name == "fp8":
            # torchao Float8Tensor: float8_e4m3fn qdata (out, in), fp32 scale per row.
            return n + out_features * 4
        # bitsandbytes nf4 with double quantization (QLoRA): two weights a byte, a uint8 absmax per
        # 64-weight block, the absmaxes' own fp32 absmax per 256 blocks, and the two code books
        # (16 and 256 fp32) with the fp32 offset.
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


MODES: dict[str, QuantMode] = {
    "int8": QuantMode("int8", "torchao", "any device (weight-only int8 runs on the CPU too)", None, 8),
    "fp8": QuantMode("fp8", "torchao", "a CUDA GPU with float8 support (compute capability 8.9+: Ada, Hopper or newer)",
                     (8, 9), 8),
    "nf4": QuantMode("nf4", "bitsandbytes", "a CUDA GPU (bitsandbytes' 4-bit kernels)", (7, 0), 4),
}


def quantized_linears(model: torch.nn.Module, mode: str = "int8") -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules ``mode`` replaces in ``model``, by the rule of the library that loads
    it (each skips the modules it keeps in full precision, and the libraries match those names
    differently, so the rule is theirs, called where it is public):

    * diffusers (``ModelMixin``): ``_keep_in_fp32_modules``, matched as ``name + "."`` inside the
      weight's name (torchao) or the module's (bitsandbytes, which also skips a child so named);
    * transformers (``PreTrainedModel``): ``_keep_in_fp32_modules`` plus its default skips (tied
      weights, the last parameter's module, the output embeddings), matched by
      ``should_convert_module`` against the *weight's* name for torchao and the *module's* for
      bitsandbytes. So torchao quantizes T5's ``wo`` (``...wo.weight`` neither starts nor ends with
      ``wo``) and bitsandbytes keeps it; both keep ChatGLM's ``output_layer`` (the last parameter).
    """
    backend = MODES[mode].backend
    if hasattr(model, "all_tied_weights_keys"):  # a transformers model
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)

        def converts(name: str, module: torch.nn.Module) -> bool:
            if backend == "bitsandbytes":
                return type(module) is torch.nn.Linear and should_convert_module(name, skip)
            return isinstance(module, torch.nn.Linear) and should_convert_module(f"{name}.weight", skip)
    else:
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])

        def converts(name: str, module: torch.nn.Module) -> bool:
            if not isinstance(module, torch.nn.Linear):
                return False
            key = name if backend == "bitsandbytes" else f"{name}.weight"
            child = name.rsplit(".", 1)[-1]
            return not any(k + "." in key or k == key or (backend == "bitsandbytes" and k == child) for k in keep)
    return {name: module for name, module in model.named_modules() if converts(name, module)}


def part_bytes(model: torch.nn.Module, mode: str | None, dtype: torch.dtype, *, frozen_only: bool = False) -> int:
    """Bytes of ``model``'s parameters and buffers once loaded in ``dtype`` (floating-point tensors;
    others keep theirs) with ``mode`` (None: unquantized). ``model`` may be on the meta device.
    A transformers model keeps the modules of its dtype plan in fp32 (T5's ``wo`` in fp16).
    ``frozen_only``: leave out the parameters that train (a LoRA injected into a frozen base: the
    planner counts those apart, in their own dtype)."""
    quantized = {id(m.weight): m for m in quantized_linears(model, mode).values()} if mode else {}
    fp32 = _fp32_names(model, dtype)
    total = 0
    seen: set[int] = set()
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if id(tensor) in seen or (frozen_only and tensor.requires_grad):  # tied weights are stored once
            continue
        seen.add(id(tensor))
        linear = quantized.get(id(tensor))
        if linear is not None:
            total += MODES[mode].weight_bytes(linear.out_features, linear.in_features)
        elif not tensor.is_floating_point():
            total += tensor.numel() * tensor.element_size()
        else:
            total += tensor.numel() * (4 if fp32 is not None and fp32.search(name) else dtype.itemsize)
    return total


def _fp32_names(model: torch.nn.Module, dtype: torch.dtype):
    """transformers' pattern of the tensors it loads in fp32 whatever ``dtype`` (None: none)."""
    if not hasattr(model, "_get_dtype_plan"):
        return None
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype)
    return build_glob_alternation(list(plan))[0] if plan else None


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes a loaded ``model``'s parameters and buffers really take, quantized tensors included
    (torchao's tensor subclasses are counted by their inner tensors): what :func:`part_bytes`
    predicts, for the tests."""
    total = 0
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            total += sum(getattr(tensor, n).nbytes for n in names)
        else:
            total += tensor.nbytes
    return total


#: Text encoders large enough to quantize (T5-XXL 4.8 B, ChatGLM3-6B); the CLIPs stay in the
#: run's dtype (0.1-0.7 B: a few hundred MB saved, and their pooled output steers every step).
LARGE_TEXT_ENCODER_KINDS = ("t5", "chatglm")


def quantized_text_encoders(family: ModelFamily) -> tuple[int, ...]:
    """Indices of ``family``'s text encoders that ``model.quantize``'s text-encoder choice applies to."""
    return tuple(i for i, kind in enumerate(family.text_encoder_kinds) if kind in LARGE_TEXT_ENCODER_KINDS)


def choice(model_cfg: Mapping[str, Any]) -> dict[str, str | None]:
    """``model.quantize`` as {"denoiser": mode, "text_encoder": mode}: a plain mode applies to both
    (the text encoder's only where the family has a large one), a mapping sets each; null: none.
    Values are checked by the config check, not here."""
    value = model_cfg.get("quantize")
    if value is None or isinstance(value, str):
        return {"denoiser": value, "text_encoder": value}
    return {"denoiser": value.get("denoiser"), "text_encoder": value.get("text_encoder")}
