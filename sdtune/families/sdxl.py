"""SDXL: two CLIP text encoders and size/crop micro-conditioning.

The context is the penultimate hidden state of both encoders, concatenated; the pooled embedding
is the second encoder's projection. ``time_ids`` = (original h, w, crop top, left, target h, w)
come from each training sample's real geometry, as recorded by the data pipeline.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelFamily, ModelParts


def micro_conditioning(text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
    """UNet kwargs for SDXL-style ``text_time`` conditioning (shared with Kolors)."""
    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
    pooled = text["text_embeds"]
    return {
        "encoder_hidden_states": text["encoder_hidden_states"],
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device=pooled.device, dtype=pooled.dtype)},
    }


class SDXL(ModelFamily):
    name = "sdxl"
    default_resolution = 1024
    default_guidance = 5.0
    base_model_version = "sdxl_base_v1-0"
    single_file_pipeline = "StableDiffusionXLPipeline"
    # The stock SDXL VAE overflows in fp16; model.vae_path lets users load the fp16-fix VAE.

    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s, revision=revision) for s in ("tokenizer", "tokenizer_2")]
        text_encoders = [
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", revision=revision, dtype=dtype),
        ]
        return tokenizers, text_encoders

    def text_max_length(self, parts: ModelParts) -> int:
        return parts.tokenizers[0].model_max_length

    def encode_prompts(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
            ids = tokenizer(
                captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def unet_conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return micro_conditioning(text, batch)

    def build_pipeline(self, parts: ModelParts):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1],
            unet=parts.unet,
            scheduler=EulerDiscreteScheduler.from_config(parts.noise_scheduler.config),
        )
