"""CUDA's mixed precision and attention kernels, played on meta tensors for the memory planner.

The planner runs a training step on the meta device (shapes and dtypes, no memory), where neither
``torch.autocast("cuda")`` nor CUDA's fused attention exists: meta tensors take no autocast, and
``scaled_dot_product_attention`` falls back to its math path, which materialises the full
attention matrix (15 GB instead of 4 GB for an SD1.5 step at batch 4, 512²). What a CUDA step
keeps depends on both, so :class:`CudaAutocast` replays them:

- autocast: a function of CUDA autocast's lower-precision list (matmuls, convolutions, attention)
  gets its floating-point inputs cast to the run's half dtype, one of its float32 list (norms,
  softmax, ``pow``, ``exp``, ``sum``, the losses...) to float32, exactly as
  ``torch.autocast("cuda", dtype)`` does (the lists of PyTorch's autocast documentation, "CUDA Ops
  that can autocast to float16 / to float32"). Casts of leaf tensors that require grad (the LoRA
  weights) are cached for the step, as autocast's weight cache does.
- attention: ``scaled_dot_product_attention`` runs the kernel CUDA picks, FlashAttention-2 for
  fp16/bf16 without a mask, memory-efficient attention otherwise; both keep the output and a
  float32 log-sum-exp per query, not the attention matrix. Their meta kernels give the shapes.

A torch-function mode is not seen by the autograd engine, so the recomputation of a checkpointed
block (``train.gradient_checkpointing``) gets its own instance through ``checkpoint``'s
``context_fn`` (:func:`checkpoint_with`), as real autocast state is restored there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Functions CUDA autocast runs in the half dtype (by ``__name__``: functional, torch and Tensor forms).
LOWER = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "matmul",
    "__matmul__", "__rmatmul__", "bmm", "baddbmm", "mm", "addmm", "addbmm", "mv", "addmv", "einsum", "prelu",
    "scaled_dot_product_attention",
})
#: Functions CUDA autocast runs in float32.
FLOAT32 = frozenset({
    "layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "kl_div", "cross_entropy", "nll_loss", "pow", "__pow__", "__rpow__", "exp", "expm1", "log", "log2",
    "log10", "log1p", "rsqrt", "reciprocal", "__rtruediv__", "__rdiv__", "sum", "prod", "cumsum", "cumprod", "norm",
    "normalize", "softplus", "erfinv", "acos", "asin", "cosh", "sinh", "tan", "cosine_similarity", "dist", "cdist",
    "pdist", "renorm", "binary_cross_entropy_with_logits",
})
CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


class CudaAutocast(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` and CUDA's attention kernels on meta tensors; ``dtype``
    None: no autocast (full precision), attention kernels only."""

    def __init__(self, dtype: torch.dtype | None, cache: dict | None = None):
        super().__init__()
        self.dtype = dtype
        self.cache = {} if cache is None else cache  # shared with the recomputation's instance

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not (isinstance(value, torch.Tensor) and value.dtype in CASTABLE and value.dtype != dtype):
            return value
        if value.is_leaf and value.requires_grad:  # autocast's weight cache
            key = (id(value), dtype)
            if key not in self.cache:
                self.cache[key] = (value, value.to(dtype))  # the tensor itself is kept so the id stays its
            return self.cache[key][1]
        return value.to(dtype)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.dtype is not None and name in LOWER:
            dtype = self.dtype
        elif self.dtype is not None and name in FLOAT32:
            dtype = torch.float32
        elif name == "scaled_dot_product_attention":
            return cuda_attention(*args, **kwargs)
        else:
            return func(*args, **kwargs)
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            return func(*args, **kwargs)  # integer sums and the like: autocast leaves them alone
        args = tuple(self._cast(a, dtype) for a in args)
        kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        if name == "scaled_dot_product_attention":
            return cuda_attention(*args, **kwargs)
        return func(*args, **kwargs)


def cuda_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor:
    """The attention kernel PyTorch dispatches to on a CUDA GPU for these inputs (meta kernels)."""
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


def checkpoint_with(mode: CudaAutocast) -> Callable[..., Any]:
    """A diffusers/transformers ``_gradient_checkpointing_func`` whose recomputation runs under a
    copy of ``mode`` (the outer mode does not reach the autograd engine's recomputation)."""

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), CudaAutocast(mode.dtype, mode.cache)

    def run(module: Callable, *args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


def route_checkpointing(model: torch.nn.Module, mode: CudaAutocast) -> list[tuple[torch.nn.Module, Any]]:
    """Point every checkpointed block of ``model`` at :func:`checkpoint_with` ``mode``; returns the
    (module, previous function) pairs for :func:`restore_checkpointing`."""
    previous = []
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            previous.append((module, module._gradient_checkpointing_func))
            module._gradient_checkpointing_func = checkpoint_with(mode)
    return previous


def restore_checkpointing(previous: list[tuple[torch.nn.Module, Any]]) -> None:
    for module, func in previous:
        module._gradient_checkpointing_func = func
