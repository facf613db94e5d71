"""The latent and text caches the run holds on the GPU: their size from the dataset and the model,
their place as :class:`sdtune.data.cache_memory.CacheMemory` decides it.

A cached latent is the VAE's distribution parameters (2 x latent channels x h x w) per picture and
flip, a cached caption the family's text-encoder outputs (:meth:`~sdtune.families.base.ModelFamily.text_shapes`),
both in the training dtype. The dataset at ``data.root`` is listed (not decoded) for the counts;
without one the plan assumes :data:`ASSUMED_IMAGES` pictures, each with its own caption, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdtune.data.cache_memory import DEVICE_SHARE
from sdtune.data.records import load_records
from sdtune.planning.model import RunModel
from sdtune.utils.errors import SdtuneError

#: Pictures (and captions) assumed when ``data.root`` is not set or cannot be listed.
ASSUMED_IMAGES = 100


def dataset_counts(data_cfg: Mapping[str, Any]) -> tuple[int, int, str]:
    """(pictures, distinct captions, "" or the note saying they were assumed)."""
    root = data_cfg.get("root")
    if root and Path(str(root)).exists():
        try:
            records = load_records(root, verify=False, caption_extension=data_cfg.get("caption_extension"),
                                   allow_outside_root=bool(data_cfg.get("allow_outside_root", False)))
        except (SdtuneError, OSError, ValueError) as err:
            return ASSUMED_IMAGES, ASSUMED_IMAGES, f"data.root could not be listed ({err}); {ASSUMED_IMAGES} " \
                "pictures and captions assumed for the caches"
        captions = {c for r in records for c in r.captions}
        return len(records), len(captions), ""
    return ASSUMED_IMAGES, ASSUMED_IMAGES, (f"data.root is not set: the caches are counted for {ASSUMED_IMAGES} pictures "
                                            "and captions")


def cache_sizes(cfg: Mapping[str, Any], run: RunModel, gib: float | None, latents_cached: bool,
                text_cached: bool) -> tuple[int, int, str]:
    """(latent cache bytes on the GPU, text cache bytes on the GPU, note) for the run."""
    data = cfg["data"]
    mode = data.get("cache_memory") or "auto"
    if mode in ("cpu", "disk") or not (latents_cached or text_cached):
        return 0, 0, ""
    images, captions, note = dataset_counts(data)
    itemsize = run.dtype.itemsize
    side = int(data["resolution"]) // run.vae_factor()
    flips = 2 if data.get("random_flip") else 1
    latent = images * flips * 2 * int(run.arch["vae"]["latent_channels"]) * side * side * itemsize if latents_cached else 0
    text = captions * sum(math.prod(s) for s in run.family.text_shapes(run.arch).values()) * itemsize if text_cached else 0
    if mode == "device":
        return latent, text, note
    budget = data.get("cache_budget_gb")
    budget = float(budget) * 2**30 if budget is not None else (DEVICE_SHARE * gib * 2**30 if gib else math.inf)
    placed_latent = latent if latent <= budget else 0  # CacheMemory places the latents first, then the text
    placed_text = text if placed_latent + text <= budget else 0
    return placed_latent, placed_text, note
