"""Loading a part of the base quantized (``model.quantize``), through the libraries' own configs.

A diffusers folder loads its denoiser with diffusers' ``quantization_config`` and its large text
encoder (T5, ChatGLM) with transformers' equivalent, layer by layer, straight into the run's
weight dtype: the unquantized weights are never all in memory at once. Parts that exist before
their quantization is chosen (a single-file checkpoint, which diffusers 0.42.1's ``from_single_file``
loads unquantized although it takes a ``TorchAoConfig``; the bench's random-init full-size parts)
are quantized in place by :func:`quantize_in_place`, with the same torchao call the loaders make
(``quantize_``) or bitsandbytes' ``Linear4bit``, on the layers :func:`~sdtune.families.quantize.quantized_linears`
names: the result is what the loader gives (same tensors, same bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from sdtune.families.quantize import MODES, quantized_linears, quantized_text_encoders

if TYPE_CHECKING:
    from sdtune.families.base import ModelFamily, ModelParts


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ W.T + b`` with the 8-bit ``W`` dequantized for this one matmul, in the forward and again
    in the backward, so autograd keeps no full-precision copy of it (torchao's own int8/fp8 linear
    saves the dequantized weight for the backward: a bf16 copy of every Linear of the base, which
    undoes the saving). Dequantizing first also keeps the product in range: torchao's int8 path
    multiplies by the raw int8 values and scales after, which overflows fp16 (65504) for outputs
    above ~36 at typical scales. Only ``x`` gets a gradient: the base is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the quantized parameter itself: no new memory
        w = weight.dequantize().to(x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.matmul(ctx.weight.dequantize().to(grad.dtype)), None, None


class WeightOnlyLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao 8-bit tensor (``model.quantize=int8|fp8``), computed
    through :class:`_DequantizedMatmul`. Swapped in by class (:func:`dequantize_in_matmul`), so the
    module keeps its name, state dict and peft's torchao LoRA wrapper."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedMatmul.apply(x, self.weight, self.bias)


def dequantize_in_matmul(module: torch.nn.Module) -> int:
    """Make every ``nn.Linear`` of ``module`` whose weight torchao quantized a :class:`WeightOnlyLinear`;
    returns how many."""
    count = 0
    for layer in module.modules():
        if type(layer) is torch.nn.Linear and hasattr(layer.weight, "__tensor_flatten__") \
                and hasattr(layer.weight, "dequantize"):
            layer.__class__ = WeightOnlyLinear
            count += 1
    return count


def torchao_config(mode: str) -> Any:
    """torchao's weight-only config of ``mode`` (int8 or fp8)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()


def library_config(mode: str, dtype: torch.dtype, library: str) -> Any:
    """``quantization_config`` for ``library`` ("diffusers" or "transformers") loading a part in ``mode``:
    torchao weight-only for int8/fp8, bitsandbytes NF4 with double quantization (QLoRA) computing in ``dtype``."""
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig, TorchAoConfig
    else:
        from transformers import BitsAndBytesConfig, TorchAoConfig
    if MODES[mode].backend == "torchao":
        return TorchAoConfig(torchao_config(mode))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_kwargs(mode: str | None, dtype: torch.dtype, library: str = "diffusers") -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` for a part in ``mode`` (None: unquantized, none)."""
    return {} if mode is None else {"quantization_config": library_config(mode, dtype, library)}


def text_encoder_kwargs(family: ModelFamily, index: int, mode: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """:func:`load_kwargs` for ``family``'s text encoder ``index``: the large ones only (CLIPs never)."""
    return load_kwargs(mode if index in quantized_text_encoders(family) else None, dtype, "transformers")


def quantize_in_place(module: torch.nn.Module, mode: str, dtype: torch.dtype) -> torch.nn.Module:
    """Quantize ``module``'s layers as loading it in ``mode`` would (int8/fp8: torchao's ``quantize_``;
    nf4: bitsandbytes ``Linear4bit`` layers, which quantize when moved to a CUDA device)."""
    names = set(quantized_linears(module, mode))
    if not names:
        return module
    if MODES[mode].backend == "torchao":
        from torchao.quantization import quantize_

        quantize_(module, torchao_config(mode), filter_fn=lambda _, fqn: fqn in names)
        return module
    import bitsandbytes as bnb

    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        old = getattr(owner, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                                compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data.to("cpu", dtype), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", module=new)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data.to(dtype), requires_grad=False)
        device = old.weight.device
        setattr(owner, child, new.to(device) if device.type == "cuda" else new)
    return module


def quantize_parts(family: ModelFamily, parts: ModelParts, quantize: Mapping[str, str | None],
                   dtype: torch.dtype) -> None:
    """Quantize ``parts`` built or loaded unquantized as loading them in ``quantize``'s modes
    ({"denoiser": mode, "text_encoder": mode}) would: the denoiser and ``family``'s large text encoders."""
    if quantize.get("denoiser"):
        quantize_in_place(parts.denoiser, quantize["denoiser"], dtype)
    if quantize.get("text_encoder"):
        for index in quantized_text_encoders(family):
            quantize_in_place(parts.text_encoders[index], quantize["text_encoder"], dtype)
    for module in (parts.denoiser, *parts.text_encoders):
        dequantize_in_matmul(module)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds quantized weights (a loader's quantizer, torchao tensors or bitsandbytes')."""
    if getattr(module, "hf_quantizer", None) is not None:
        return True
    return any(hasattr(p, "__tensor_flatten__") or hasattr(p, "quant_state") for p in module.parameters())
