"""Kolors: SDXL's UNet layout driven by a ChatGLM-6B text encoder (256 tokens, Chinese prompts).

Embeddings are taken exactly as ``KolorsPipeline.encode_prompt`` does: the penultimate hidden
state (ChatGLM is sequence-first, so it is transposed) and the last token of the final hidden state
as the pooled embedding. Micro-conditioning is SDXL's.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelFamily, ModelParts
from .sdxl import micro_conditioning

MAX_LENGTH = 256  # KolorsPipeline's max_sequence_length


class Kolors(ModelFamily):
    name = "kolors"
    default_resolution = 1024
    default_guidance = 5.0
    base_model_version = "kolors"

    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None):
        from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        text_encoder = ChatGLMModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype)
        return [tokenizer], [text_encoder]

    def text_max_length(self, parts: ModelParts) -> int:
        return MAX_LENGTH

    def encode_prompts(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = parts.tokenizers[0], parts.text_encoders[0]
        inputs = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").to(encoder.device)
        out = encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            output_hidden_states=True,
        )
        return {
            "encoder_hidden_states": out.hidden_states[-2].permute(1, 0, 2).contiguous(),  # (seq, b, d) -> (b, seq, d)
            "text_embeds": out.hidden_states[-1][-1, :, :].clone(),
        }

    def unet_conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return micro_conditioning(text, batch)

    def build_pipeline(self, parts: ModelParts):
        from diffusers import EulerDiscreteScheduler, KolorsPipeline

        return KolorsPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            unet=parts.unet,
            scheduler=EulerDiscreteScheduler.from_config(parts.noise_scheduler.config),
        )
