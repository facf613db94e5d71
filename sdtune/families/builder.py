"""The one way a base model is built, for training, generate, merge and the bench.

``model_source`` finds the weights (building a tiny model first when the config asks for one, and
failing in seconds when the path or hub id is unreachable); ``build_parts`` loads them through the
family and freezes every part. Training then adds LoRA layers (``LoRATrainingModule.attach``);
generate and merge load LoRA files onto the frozen parts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from sdtune.families import get_family
from sdtune.families.base import ModelFamily, ModelParts
from sdtune.families.quantize import choice, quantized_text_encoders, stored_bytes
from sdtune.families.source import check_weights, resolve_model_source
from sdtune.families.tiny import prepare_tiny

log = logging.getLogger(__name__)


def model_source(model_cfg: Mapping[str, Any]) -> str:
    """Where ``model_cfg``'s weights are: a local folder or file, or a reachable hub id. The base
    model and its VAE pass the pickle gate (:func:`~sdtune.families.source.check_weights`)."""
    prepare_tiny(model_cfg)
    allow_pickle = model_cfg.get("allow_pickle", False) is True
    check_weights(model_cfg.get("vae_path"), key="model.vae_path", allow_pickle=allow_pickle)
    return resolve_model_source(
        str(model_cfg["path"]),
        family=get_family(model_cfg["family"]).name,
        revision=model_cfg.get("revision"),
        allow_pickle=allow_pickle,
    )


def build_parts(model_cfg: Mapping[str, Any], *, dtype: torch.dtype = torch.float32,
                source: str | None = None) -> tuple[ModelFamily, ModelParts]:
    """Load ``model_cfg``'s base model in ``dtype`` with every part frozen and in eval mode, the parts
    ``model.quantize`` names quantized.

    ``source`` is a :func:`model_source` result the caller already has (it is not resolved again).
    """
    family = get_family(model_cfg["family"])
    parts = family.load(
        source or model_source(model_cfg),
        dtype=dtype,
        vae_path=model_cfg.get("vae_path"),
        revision=model_cfg.get("revision"),
        config=model_cfg.get("config"),
        quantize=choice(model_cfg),
    )
    family.configure_parts(parts, model_cfg)
    for module in (parts.denoiser, *parts.frozen_modules()):
        module.requires_grad_(False).eval()
    log_quantized(family, parts, choice(model_cfg))
    return family, parts


def log_quantized(family: ModelFamily, parts: ModelParts, modes: Mapping[str, str | None]) -> None:
    """One line per quantized part: its mode and the bytes its weights hold now, so a run's log
    shows what ``model.quantize`` did (and that it did)."""
    quantized = [("the denoiser", parts.denoiser, modes.get("denoiser"))]
    quantized += [(f"text encoder {i} ({family.text_encoder_kinds[i]})", parts.text_encoders[i], modes.get("text_encoder"))
                  for i in quantized_text_encoders(family)]
    for what, module, mode in quantized:
        if mode:
            log.info("model.quantize: %s holds its Linear weights in %s (%.1f MiB of weights; LoRA layers train in fp32)",
                     what, mode, stored_bytes(module) / 2**20)
