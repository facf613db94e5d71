"""Stable Diffusion 1.x: one CLIP text encoder, last hidden state as cross-attention context."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelFamily, ModelParts


class SD15(ModelFamily):
    name = "sd15"
    default_resolution = 512
    default_guidance = 7.5
    base_model_version = "sd_v1"
    single_file_pipeline = "StableDiffusionPipeline"

    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype)
        return [tokenizer], [text_encoder]

    def encode_prompts(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = parts.tokenizers[0], parts.text_encoders[0]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        return {"encoder_hidden_states": encoder(ids, return_dict=False)[0]}

    def unet_conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def build_pipeline(self, parts: ModelParts):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            unet=parts.unet,
            scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
