"""GPU memory planning: what a training run will need, by component, before any weight is read
(``python -m sdtune.plan``, the training warning, the hardware presets).

:func:`plan_memory` builds the run's model on the meta device through the training code and
measures one step with PyTorch's memory tracker; :class:`MemoryPlan` holds the figures, the
verdict for a card and the switches that bring the peak down. The method: docs/memory.md.
"""

from sdtune.planning.memory_plan import CUDA_OVERHEAD, MemoryPlan, plan_memory

__all__ = ["CUDA_OVERHEAD", "MemoryPlan", "plan_memory"]
