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
    """Timed steps of one case, by round.

    ``ms_per_step`` is the median of every timed step of every round. The cases of one round run
    back to back and their order flips every round, so a slow minute on a shared machine lands on
    every case alike. Memory keeps the smallest round's peak: one-off allocations (kernels, thread
    pools) only ever inflate a round.
    """

    batch_size: int
    rounds: dict[int, list[float]] = field(default_factory=dict)
    peaks: list[float] = field(default_factory=list)
    memory_method: str = ""

    def add(self, round_: int, seconds: list[float], peak_mb: float, method: str) -> None:
        self.rounds[round_] = list(seconds)
        self.peaks.append(peak_mb)
        self.memory_method = method

    @property
    def seconds(self) -> list[float]:
        """Every timed step of every round."""
        return [s for r in self.rounds.values() for s in r]

    @property
    def ms_per_step(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def spread(self) -> float:
        """Slowest over fastest round median (1.0 = the rounds agree; large = a noisy machine)."""
        medians = [statistics.median(r) for r in self.rounds.values()]
        return max(medians) / min(medians)

    @property
    def peak_mb(self) -> float:
        return min(self.peaks)

    @property
    def images_per_s(self) -> float:
        return self.batch_size * 1000 / self.ms_per_step


def shared_round_ratio(case: Timing, base: Timing) -> float | None:
    """Median step of ``case`` over median step of ``base``, both over the rounds they share.

    For cases timed in every round this is exactly the ratio of their ``ms_per_step``; a speed
    switch timed in fewer rounds is compared with its base case's steps from those same rounds.
    """
    shared = set(case.rounds) & set(base.rounds)
    if not shared:
        return None
    steps = [[s for r in shared for s in t.rounds[r]] for t in (case, base)]
    return statistics.median(steps[0]) / statistics.median(steps[1])


def batch_size_of(batch: dict) -> int:
    """Images in a collated batch (its caption list is always there)."""
    return len(batch["text"])


def matmul_peak(device: torch.device, *, size: int | None = None, seconds: float = 1.0) -> dict[str, float | str]:
    """Achieved FLOP/s of a square ``torch.mm`` loop: bf16 on CUDA, fp32 on the CPU.

    The loop runs for ``seconds`` in chunks of about 0.1 s and the fastest chunk counts: like the
    step times, a peak is only ever lowered by other work on the machine.
    """
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, thread pool start
    _sync(device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    _sync(device)
    per_chunk = max(1, int(0.1 / max(time.perf_counter() - start, 1e-6)))
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(per_chunk):
            torch.mm(a, b, out=out)
        _sync(device)
        best = max(best, 2 * n**3 * per_chunk / (time.perf_counter() - start))
    return {"flops": best, "dtype": str(dtype).replace("torch.", ""), "size": n}
