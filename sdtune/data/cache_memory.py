"""Where the latent and text caches live once filled: the training device, CPU memory or the disk.

A cache read from disk every step costs a file open and parse per sample, and one held on the CPU
costs a host-to-device copy per batch. So once filled, each cache is read once into memory in the
training dtype and placed by ``data.cache_memory``:

- ``auto`` (default): on the training device (a GPU) while the caches together fit
  ``data.cache_budget_gb`` (null: 10% of the device's memory), else in CPU memory;
- ``device``: on the training device whatever their size (on a CPU run: CPU memory, looked up by
  the module as on a GPU);
- ``cpu``: in CPU memory, served by the data loader (and pinned there by ``data.pin_memory``);
- ``disk``: not held, read from disk each time it is used (what sdtune did before; for caches larger
  than the memory).

A cache that does not fit in half the available CPU memory stays on disk, with a warning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from sdtune.config.values import choice
from sdtune.utils.errors import ConfigError

log = logging.getLogger(__name__)
MODES = ("auto", "device", "cpu", "disk")
DEVICE_SHARE = 0.10  # auto budget: this share of the device's memory
RAM_SHARE = 0.5  # a CPU-held cache may take at most this share of the available RAM


def check_config(cfg: Mapping[str, Any]) -> None:
    """``data.cache_memory`` (null: auto) and ``data.cache_budget_gb`` are well formed (part of
    :func:`sdtune.data.config.check_config`)."""
    data_cfg = cfg.get("data") or {}
    choice("data.cache_memory", data_cfg.get("cache_memory") or "auto", MODES, said=f"one of {', '.join(MODES)}",
           fix="e.g. data.cache_memory=auto (the GPU while the caches fit data.cache_budget_gb).")
    budget = data_cfg.get("cache_budget_gb")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget < 0):
        raise ConfigError(f"data.cache_budget_gb must be a finite number of GB >= 0 or null (10% of the GPU's memory), "
                          f"got {budget!r}. Fix: e.g. data.cache_budget_gb=4.")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume it fits
        return 1 << 62


class CacheMemory:
    """Places caches one after another (latents, then text), sharing one device budget."""

    def __init__(self, device: torch.device, mode: str = "auto", budget_gb: float | None = None):
        self.device = torch.device(device)
        self.mode = mode
        if budget_gb is not None:
            self.budget = int(float(budget_gb) * 2**30)
        elif self.device.type == "cuda":
            self.budget = int(DEVICE_SHARE * torch.cuda.get_device_properties(self.device).total_memory)
        else:
            self.budget = 0
        self.used = 0

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any], device: torch.device) -> CacheMemory:
        return cls(device, data_cfg.get("cache_memory", "auto"), data_cfg.get("cache_budget_gb"))

    def place(self, size: int, what: str, *, on_disk: bool = True) -> str:
        """``device`` (held on :attr:`device`, looked up by the module), ``cpu`` (held in CPU memory,
        served by the data loader) or ``disk`` (read when used) for a cache of ``size`` bytes;
        ``on_disk=False``: the cache has no files, so it is held in CPU memory instead of ``disk``."""
        tier = self.mode
        if tier == "disk" and not on_disk:
            tier = "cpu"
        if tier == "auto":
            fits = self.device.type != "cpu" and self.used + size <= self.budget
            tier = "device" if fits else "cpu"
        if tier == "cpu" and on_disk and size > RAM_SHARE * available_ram():
            log.warning("%s: %.1f MiB is more than half the available memory; it stays on disk and is read "
                        "when used (data.cache_memory)", what, size / 2**20)
            tier = "disk"
        if tier == "device":
            self.used += size
        where = {"device": f"on {self.device}", "cpu": "in CPU memory", "disk": "on disk, read when used"}[tier]
        log.info("%s: %.1f MiB %s", what, size / 2**20, where)
        return tier
