"""``data.num_workers: auto`` and ``data.pin_memory: auto``: data-loader settings for the device.

On a CUDA GPU the step is short and runs asynchronously, so the host must have the next batch
ready: worker processes decode and crop images while the GPU trains, pinned (page-locked) batches
copy to the GPU without blocking, and persistent workers are not re-spawned every epoch. On the
CPU the same workers only take cores from the step's own compute threads: measured on the 2-core
CPU bench, 2 workers did not help (docs/benchmarks.md), and pinning needs a GPU. So ``auto`` is

- CUDA: ``min(4, cores per process - 1)`` workers (one core stays with the training process, which
  drives the GPU; 4 decode a batch of 8 at 512² well within a step at full-size SD1.5/SDXL speeds,
  and more only add start-up time and memory: each worker holds a copy of the dataset), pinned
  memory, persistent workers;
- anything else: no workers, no pinning.

Explicit values (an integer >= 0, true/false) are used as given.
"""

from __future__ import annotations

import os
from typing import Any

AUTO = "auto"
#: Most worker processes ``auto`` starts per training process on a GPU.
MAX_AUTO_WORKERS = 4


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroup cpusets), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_settings(num_workers: Any, pin_memory: Any, *, device_type: str, processes_per_node: int = 1,
                    cores: int | None = None) -> tuple[int, bool]:
    """(workers, pin memory) for training on ``device_type`` ("cuda", "cpu", ...) with
    ``processes_per_node`` training processes sharing this machine's ``cores``."""
    gpu = device_type == "cuda"
    if num_workers == AUTO:
        share = (cores or available_cores()) // max(1, int(processes_per_node))
        num_workers = max(0, min(MAX_AUTO_WORKERS, share - 1)) if gpu else 0
    if pin_memory == AUTO:
        pin_memory = gpu
    return int(num_workers), bool(pin_memory)
