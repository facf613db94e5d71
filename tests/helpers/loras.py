"""LoRA files made in the test: random non-zero weights on a tiny base, with a full sdtune header."""

from __future__ import annotations

import torch

from sdtune.families import get_family
from sdtune.lora.files import LoraHeader, save_lora
from sdtune.lora.layers import LoraSpec, inject, lora_tensors, trainable_lora_parameters

from .models import tiny_model


def lora_file(tmp_path, family: str, seed: int, *, targets=("to_q", "to_k", "to_v", "to_out.0"), alpha=3.0, mutate=None,
              model_extra=None) -> str:
    """A LoRA file with random non-zero weights and a full sdtune header (model config included).

    ``mutate`` rewrites the tensors before saving (to make a file that does not fit); ``model_extra``
    adds keys to the header's model config (e.g. the base's own ``guidance``)."""
    parts = get_family(family).load(str(tiny_model(family)))
    spec = LoraSpec(rank=2, alpha=alpha, targets=tuple(targets))
    inject(parts.unet, spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.unet):
            p.normal_(std=0.2)
    holder = torch.nn.Module()
    holder.unet = parts.unet
    tensors = lora_tensors(holder.state_dict())
    if mutate:
        tensors = mutate(tensors)
    cfg = {"model": {"family": family, "path": str(tiny_model(family)), "tiny": True, "resolution": 64, **(model_extra or {})}}
    meta = LoraHeader(spec, family=family, base_model="tiny", base_model_version="x", resolution=64, config=cfg)
    return str(save_lora(tmp_path / f"{family}_{seed}.safetensors", tensors, meta, format="diffusers"))
