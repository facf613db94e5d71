"""Stable Diffusion 1.x: one CLIP text encoder, last hidden state as cross-attention context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdtune.families.base import ModelFamily, ModelParts
from sdtune.families.tiny_parts import (
    build_clip_tokenizer,
    clip_config,
    sd_noise_scheduler,
    tiny_clip_text_encoder,
    tiny_vae,
)


class SD15(ModelFamily):
    name = "sd15"
    default_resolution = 512
    default_guidance = 7.5
    base_model_version = "sd_v1"
    single_file_pipeline = "StableDiffusionPipeline"
    single_file_text_encoders = (("cond_stage_model.transformer.", "clip"),)
    embedding_keys = ("emb_params",)  # A1111's safetensors embedding: {"emb_params": [n_vectors, 768]}

    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None, quantize: str | None = None):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype)
        return [tokenizer], [text_encoder]

    def tokenize(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = parts.tokenizers[0]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"input_ids": ids}

    def encode_tokens(self, parts: ModelParts, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder = parts.text_encoders[0]
        return {"encoder_hidden_states": encoder(tokens["input_ids"].to(encoder.device, non_blocking=True), return_dict=False)[0]}

    def conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    pipelines = {
        ("text2img", False): "StableDiffusionPipeline",
        ("img2img", False): "StableDiffusionImg2ImgPipeline",
        ("text2img", True): "StableDiffusionControlNetPipeline",
        ("img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    }

    def pipeline_components(self, parts: ModelParts) -> dict[str, Any]:
        from diffusers import DDIMScheduler

        return {
            "vae": parts.vae,
            "text_encoder": parts.text_encoders[0],
            "tokenizer": parts.tokenizers[0],
            "unet": parts.denoiser,
            "scheduler": DDIMScheduler.from_config(parts.noise_scheduler.config),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    def build_tiny(self, folder: Path) -> None:
        """Tiny SD1.5: cross-attention dim 32, 8x8 latents, one 2-layer CLIP encoder."""
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        tokenizer = build_clip_tokenizer()
        text_encoder = tiny_clip_text_encoder(tokenizer)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sd_noise_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder)

    def random_text_parts(self, arch, *, meta):
        from transformers import CLIPTextModel

        encoders = [CLIPTextModel(clip_config(arch["text_encoder"]))]
        return ([] if meta else [build_clip_tokenizer()]), encoders

    def text_shapes(self, arch):
        te = arch["text_encoder"]
        return {"encoder_hidden_states": (te["max_position_embeddings"], te["hidden_size"])}
