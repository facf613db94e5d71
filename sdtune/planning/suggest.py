"""Which switches bring a run's planned peak down, with the peak each gives.

Each suggestion is an override of the run's command line applied alone to the plan's config and
planned again (the model and its step measurements are cached, so this costs no new step):
gradient checkpointing, a quantized base (int8, then nf4), batch 1, the text and latent caches
(and no latent cache, whose encoding can be the caching phase's peak), 8-bit AdamW, no sample
images (the sampling phase). Only those
that lower the peak are kept (:meth:`sdtune.planning.memory_plan.MemoryPlan.suggestions`).
When a budget is given and none fits alone, all of them together is the last suggestion.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from sdtune.config.paths import CONF_DIR, yaml_file
from sdtune.families.quantize import choice


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return apply


def _adamw8bit(cfg: dict[str, Any]) -> None:
    """``optim=adamw8bit``: its optimizer section, at the run's learning rate."""
    optimizer = dict(yaml_file(CONF_DIR / "optim" / "adamw8bit.yaml")["optimizer"])
    optimizer["lr"] = cfg["optim"]["optimizer"].get("lr", optimizer["lr"])
    cfg["optim"]["optimizer"] = optimizer


def candidates(cfg: dict[str, Any]) -> list[tuple[str, Callable[[dict[str, Any]], None]]]:
    """The overrides worth planning for ``cfg`` (those that change something in it)."""
    out = []
    if not cfg["train"].get("gradient_checkpointing"):
        out.append(("train.gradient_checkpointing=true", _set("train.gradient_checkpointing", True)))
    denoiser_mode = choice(cfg["model"])["denoiser"]
    for mode in ("int8", "nf4"):
        if denoiser_mode != mode:
            out.append((f"model.quantize={mode}", _set("model.quantize", mode)))
    if int(cfg["data"]["batch_size"]) > 1:
        out.append(("data.batch_size=1", _set("data.batch_size", 1)))
    if not cfg["train"].get("cache_text_embeddings", True):
        out.append(("train.cache_text_embeddings=true", _set("train.cache_text_embeddings", True)))
    if not cfg["data"].get("cache_latents"):
        out.append(("data.cache_latents=true", _set("data.cache_latents", True)))
    else:  # the cache's VAE encoding can be the caching phase's peak
        out.append(("data.cache_latents=false", _set("data.cache_latents", False)))
    if not str(cfg["optim"]["optimizer"].get("_target_", "")).startswith("bitsandbytes."):
        out.append(("optim=adamw8bit", _adamw8bit))
    if (cfg.get("callbacks") or {}).get("samples"):  # the sample grid brings every frozen part back to the card
        out.append(("callbacks.samples=null", _set("callbacks.samples", None)))
    return out


def combined(overrides: list[str]) -> list[str]:
    """The overrides of several suggestions applied together (nf4 supersedes int8)."""
    if "model.quantize=nf4" in overrides:
        overrides = [o for o in overrides if o != "model.quantize=int8"]
    return overrides


def apply_all(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``cfg`` with ``overrides`` (names from :func:`candidates`) applied in order."""
    cfg = copy.deepcopy(cfg)
    table = dict(candidates(cfg))
    for override in overrides:
        table[override](cfg)
    return cfg
