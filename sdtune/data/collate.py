"""Collate: a list of samples into one training batch (as torchtune's ``data/_collate.py``).

Kept apart from the datasets so that both the plain dataset (:mod:`sdtune.data.datamodule`) and
DreamBooth prior preservation (:mod:`sdtune.data.prior`) batch through the same function without
importing each other.
"""

from __future__ import annotations

from typing import Any

import torch

#: Per-sample tensors stacked along a new batch dimension when the samples have them.
STACKED = ("pixel_values", "latent_params", "mask", "latent_mask", "seed", "original_size", "crop_top_left",
           "target_size")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch: the captions as a list, every tensor of :data:`STACKED` stacked; samples served from
    a device-held latent store give their store group (one per batch) and rows instead of latents."""
    batch: dict[str, Any] = {"text": [s["text"] for s in samples]}
    if "latent_index" in samples[0]:  # a device-held latent store: the module gathers these rows
        groups = {s["latent_index"][0] for s in samples}
        if len(groups) != 1:
            raise ValueError(f"a batch mixes cached latents of different shapes (store groups {sorted(groups)})")
        batch["latent_group"] = groups.pop()  # a host int: choosing the group never syncs with the device
        batch["latent_row"] = torch.tensor([s["latent_index"][1] for s in samples])
    for key in STACKED:
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


def collate_prior(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of the instance samples followed by their class samples; ``prior`` marks the class half
    (DreamBooth prior preservation: each sample is ``{"instance": ..., "class": ...}``)."""
    batch = collate([s["instance"] for s in samples] + [s["class"] for s in samples])
    batch["prior"] = torch.tensor([False] * len(samples) + [True] * len(samples))
    return batch
