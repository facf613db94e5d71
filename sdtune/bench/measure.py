"""What the bench measures with: step clocks, peak memory, and the machine's matmul peak.

* Step time is the wall time between the ends of consecutive training iterations, so it covers
  fetching the batch, the step and the optimizer; on a GPU the clock synchronises first.
* Peak memory on a GPU is ``torch.cuda.max_memory_allocated`` over the training loop (reset once
  the caches are filled and the text encoders have left the GPU). On the CPU it is the process's
  peak resident set size over the loop (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
  minus its RSS just before the case was built, after ``gc`` and ``malloc_trim``: what this case
  alone holds at its peak (weights, activations, optimizer state, caches), independent of which
  cases ran before it. Without ``clear_refs`` it falls back to ``ru_maxrss``, which never goes
  down, so rows would no longer compare; the CSV says which method was used.
* The matmul peak is a large ``torch.mm`` loop on the same device in the same run: bf16 on a GPU,
  fp32 on the CPU; MFU is achieved model FLOP/s over that.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS reflects live data."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of one case; see the module docstring for how each device is measured."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline_kb = 0
        self.method = ""

    def begin_case(self) -> None:
        """Before anything of the case is built: the CPU baseline."""
        release_memory()
        self.baseline_kb = _status_kb("VmRSS") or 0

    def begin_loop(self) -> None:
        """When the training loop starts: reset the peak counters."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "peak RSS over loop - RSS before case (VmHWM, clear_refs)"
        except OSError:
            self.method = "ru_maxrss - RSS before case (never reset: rows do not compare)"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak_kb = _status_kb("VmHWM") if self.method.startswith("peak RSS") else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        return max(0, peak_kb - self.baseline_kb) / 1024


@dataclass
class StepClock:
    """End-of-iteration timestamps and batch sizes; ``stats`` drops warm-up and partial batches."""

    device: torch.device
    stamps: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def start(self) -> None:
        _sync(self.device)
        self.stamps = [time.perf_counter()]
        self.sizes = []

    def tick(self, batch_size: int) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        self.sizes.append(int(batch_size))

    def durations(self, warmup: int, full_batch: int) -> list[float]:
        """Seconds per timed step: after ``warmup`` steps, full batches only."""
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return [d for i, (d, n) in enumerate(zip(steps, self.sizes)) if i >= warmup and n == full_batch]


@dataclass
class Timing:
    """Timed steps of one case, per round.

    The reported step time is the median step of the fastest round: other processes on a shared
    machine only ever slow a round down (on 2 cores, two busy processes oversubscribe the OpenMP
    threads and single steps take 10x longer), so the fastest round's median is the best estimate
    of the undisturbed step, and every case gets the same treatment. Memory likewise keeps the
    smallest round's peak: one-off allocations (kernels, thread pools) only ever inflate a round.
    """

    batch_size: int
    rounds: list[list[float]] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    memory_method: str = ""

    def add(self, seconds: list[float], peak_mb: float, method: str) -> None:
        self.rounds.append(list(seconds))
        self.peaks.append(peak_mb)
        self.memory_method = method

    @property
    def seconds(self) -> list[float]:
        """Every timed step of every round."""
        return [s for r in self.rounds for s in r]

    @property
    def ms_per_step(self) -> float:
        return min(statistics.median(r) for r in self.rounds) * 1000

    @property
    def spread(self) -> float:
        """Slowest over fastest round median (1.0 = the rounds agree)."""
        medians = [statistics.median(r) for r in self.rounds]
        return max(medians) / min(medians)

    @property
    def peak_mb(self) -> float:
        return min(self.peaks)

    @property
    def images_per_s(self) -> float:
        return self.batch_size * 1000 / self.ms_per_step


def batch_size_of(batch: dict) -> int:
    """Images in a collated batch (its caption list is always there)."""
    return len(batch["text"])


def matmul_peak(device: torch.device, *, size: int | None = None, seconds: float = 1.0) -> dict[str, float | str]:
    """Achieved FLOP/s of a square ``torch.mm`` loop: bf16 on CUDA, fp32 on the CPU."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, thread pool start
        torch.mm(a, b, out=out)
    _sync(device)
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        count += 1
        if count % 4 == 0 or device.type != "cuda":
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return {"flops": 2 * n**3 * count / elapsed, "dtype": str(dtype).replace("torch.", ""), "size": n}
