"""SDXL: two CLIP text encoders and size/crop micro-conditioning.

The context is the penultimate hidden state of both encoders, concatenated; the pooled embedding
is the second encoder's projection. ``time_ids`` = (original h, w, crop top, left, target h, w)
come from each training sample's real geometry, as recorded by the data pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdtune.families.base import ModelFamily, ModelParts
from sdtune.families.tiny_parts import (
    build_clip_tokenizer,
    clip_config,
    sdxl_noise_scheduler,
    tiny_clip_text_encoder,
    tiny_vae,
    tiny_xl_unet,
)


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
    single_file_text_encoders = (("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "openclip"))
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    text_encoder_kinds = ("clip", "clip")
    kohya_sgm_names = True
    embedding_keys = ("clip_l", "clip_g")  # A1111/ComfyUI SDXL embeddings: one vector set per encoder
    # The stock SDXL VAE overflows in fp16; model.vae_path lets users load the fp16-fix VAE.

    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None, quantize: str | None = None):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s, revision=revision) for s in ("tokenizer", "tokenizer_2")]
        text_encoders = [
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", revision=revision, dtype=dtype),
        ]
        return tokenizers, text_encoders

    def text_max_length(self, parts: ModelParts) -> int:
        return parts.tokenizers[0].model_max_length

    def tokenize(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids_<i>``: the ids of encoder i's tokenizer (the two may differ, e.g. added words)."""
        return {
            f"input_ids_{i}": tokenizer(
                captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            for i, tokenizer in enumerate(parts.tokenizers)
        }

    def encode_tokens(self, parts: ModelParts, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for i, encoder in enumerate(parts.text_encoders):
            out = encoder(tokens[f"input_ids_{i}"].to(encoder.device, non_blocking=True), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return micro_conditioning(text, batch)

    # The img2img classes' defaults (requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    # are the text2img class's: the same micro-conditioning (size/crop time ids) and empty negative prompt.
    pipelines = {
        ("text2img", False): "StableDiffusionXLPipeline",
        ("img2img", False): "StableDiffusionXLImg2ImgPipeline",
        ("text2img", True): "StableDiffusionXLControlNetPipeline",
        ("img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    }

    def pipeline_components(self, parts: ModelParts) -> dict[str, Any]:
        from diffusers import EulerDiscreteScheduler

        return {
            "vae": parts.vae,
            "text_encoder": parts.text_encoders[0],
            "text_encoder_2": parts.text_encoders[1],
            "tokenizer": parts.tokenizers[0],
            "tokenizer_2": parts.tokenizers[1],
            "unet": parts.denoiser,
            "scheduler": EulerDiscreteScheduler.from_config(parts.noise_scheduler.config),
        }

    def build_tiny(self, folder: Path) -> None:
        """Tiny SDXL: CLIP encoders of width 32 and 48 (80-d context), pooled 48-d, text_time conditioning.

        The widths differ as in the real model (768 and 1280); diffusers' single-file reader tells
        the two encoders apart by width.
        """
        from diffusers import StableDiffusionXLPipeline

        torch.manual_seed(0)
        tokenizer = build_clip_tokenizer()
        tokenizer_2 = build_clip_tokenizer()
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(),
            text_encoder=tiny_clip_text_encoder(tokenizer),
            text_encoder_2=tiny_clip_text_encoder(tokenizer_2, hidden_size=48, projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=tiny_xl_unet(cross_attention_dim=80, pooled_dim=48),
            scheduler=sdxl_noise_scheduler(),
        )
        pipe.save_pretrained(folder)

    def random_text_parts(self, arch, *, meta):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        encoders = [CLIPTextModel(clip_config(arch["text_encoder"])),
                    CLIPTextModelWithProjection(clip_config(arch["text_encoder_2"]))]
        return ([] if meta else [build_clip_tokenizer(), build_clip_tokenizer()]), encoders

    def text_shapes(self, arch):
        te, te2 = arch["text_encoder"], arch["text_encoder_2"]
        return {
            "encoder_hidden_states": (te["max_position_embeddings"], te["hidden_size"] + te2["hidden_size"]),
            "text_embeds": (te2["projection_dim"],),
        }
