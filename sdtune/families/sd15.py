"""Stable Diffusion 1.x: one CLIP text encoder, last hidden state as cross-attention context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import ModelFamily, ModelParts


class SD15(ModelFamily):
    name = "sd15"
    default_resolution = 512
    base_model_version = "sd_v1"

    def load(
        self,
        path: str,
        *,
        dtype: torch.dtype = torch.float32,
        vae_path: str | None = None,
        revision: str | None = None,
        config: str | None = None,
    ) -> ModelParts:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if Path(path).is_file():
            from diffusers import StableDiffusionPipeline

            return self._load_single_file(StableDiffusionPipeline, path, config=config, dtype=dtype, vae_path=vae_path)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype)
            if vae_path:
                vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype)
            else:
                vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, torch_dtype=dtype)
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, torch_dtype=dtype)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        except (OSError, ValueError) as err:
            raise self._load_error(path, err) from err
        return ModelParts(
            unet=unet,
            vae=vae,
            text_encoders=[text_encoder],
            tokenizers=[tokenizer],
            noise_scheduler=scheduler,
            source=path,
        )

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
