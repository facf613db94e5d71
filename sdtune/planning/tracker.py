"""The peak memory of one step on the meta device, by PyTorch's own memory tracker.

``torch.distributed._tools.mem_tracker.MemTracker`` is a dispatch mode that follows every tensor
storage an operation creates (by weak reference, so a freed tensor leaves the count when it dies)
and sorts it into parameters, buffers, gradients, activations (forward and recomputation),
temporaries (backward) and optimizer states; its peak snapshot is the step's high-water mark.
It works on meta tensors, whose storages have sizes but no memory, so a full-size FLUX.1 step
costs seconds and no RAM.

:class:`LoraMemTracker` adapts it to a frozen base: MemTracker puts a gradient hook on every
parameter of each module it enters, which PyTorch refuses for tensors that do not require grad
(all of the base), and it updates a snapshot of every module ever entered on every operation,
which makes an SDXL step take minutes. Here hooks go on trainable parameters only and only the
global peak is kept (the planner reads no per-module figures).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _State

from sdtune.planning.autocast import CudaAutocast, restore_checkpointing, route_checkpointing


class LoraMemTracker(MemTracker):
    """:class:`MemTracker` for a model whose base is frozen; keeps the global peak only."""

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        params = 0
        for param in module.parameters():
            params += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(param, _MemRefType.PARAM))
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                )
        buffers = 0
        for buffer in module.buffers():
            buffers += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER))
        return params, buffers

    def _update_peak_stats(self, peak_state: _State) -> None:
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[device] = snap[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snap)


@dataclass(frozen=True)
class StepPeak:
    """What one tracked step kept at its high-water mark, in bytes (all devices together)."""

    #: Activations and temporaries (forward outputs kept for backward, recomputed ones, gradients
    #: of activations): what the planner adds on top of the weights, LoRA, gradients and optimizer.
    activations: int
    #: Gradients alive at that moment (the planner counts all of them separately).
    gradients: int
    #: Parameters and buffers the step touched (the weights, counted separately too).
    weights: int


def track_step(step: Callable[[], None], models: list[torch.nn.Module], dtype: torch.dtype | None) -> StepPeak:
    """Run ``step`` (a forward, or a forward and backward) under :class:`LoraMemTracker` and CUDA's
    autocast in ``dtype`` (None: full precision; :class:`~sdtune.planning.autocast.CudaAutocast`),
    with ``models``' checkpointed blocks routed through the same autocast; gradients it leaves
    on trainable parameters are cleared after."""
    mode = CudaAutocast(dtype)
    routed = [pair for model in models for pair in route_checkpointing(model, mode)]
    tracker = LoraMemTracker()
    try:
        with tracker, mode:
            step()
    finally:
        restore_checkpointing(routed)
        for model in models:
            for param in model.parameters():
                param.grad = None
    snaps = tracker.get_tracker_snapshot("peak").values()
    total = {kind: sum(snap.get(kind, 0) for snap in snaps) for kind in _MemRefType}
    return StepPeak(activations=total[_MemRefType.ACT] + total[_MemRefType.TEMP],
                    gradients=total[_MemRefType.GRAD],
                    weights=total[_MemRefType.PARAM] + total[_MemRefType.BUFFER])
