"""SD3.5 (Large and Medium): an MMDiT transformer over CLIP-L, CLIP-G and T5-XXL, trained by flow matching.

The conditioning is what ``StableDiffusion3Pipeline.encode_prompt`` builds: the penultimate hidden
states of both CLIP encoders side by side (768 + 1280 = 2048 features), zero-padded to T5's width
(4096) and followed on the sequence axis by T5's last hidden state (77 + 256 tokens); the pooled
vector is both CLIP projections side by side (2048). Medium is MMDiT-X: its first 13 blocks add a
second image self-attention (``attn2``), which the default LoRA targets reach because the target
names carry no ``attn.`` prefix. Only the CLIP encoders take LoRA layers (diffusers' SD3 loader
reads none for T5); the LoRA file defaults to diffusers' layout, the only one diffusers reads for SD3.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdtune.families import sd35_keys
from sdtune.families.base import ModelParts
from sdtune.families.flow import FlowFamily
from sdtune.families.quantize_load import text_encoder_kwargs
from sdtune.families.tiny_flow_parts import build_t5_tokenizer, t5_config, tiny_t5, tiny_vae16
from sdtune.families.tiny_parts import build_clip_tokenizer, clip_config, tiny_clip_text_encoder

#: T5 tokens per prompt: the SD3 pipelines' ``max_sequence_length`` default (the tokenizer's own
#: limit, if shorter, wins: the tiny model's is 32).
T5_LENGTH = 256
#: The SD3 VAE's latent shift and scale (``vae/config.json`` of SD3 and SD3.5).
VAE_SHIFT, VAE_SCALE = 0.0609, 1.5305


def variant(denoiser_config: Mapping[str, Any]) -> str:
    """"medium" for an MMDiT-X transformer (dual-attention blocks), else "large" (what kohya's
    ``sd3_utils.analyze_state_dict_state`` tells apart as ``5-medium``/``5-large``)."""
    return "medium" if denoiser_config.get("dual_attention_layers") else "large"


class SD35(FlowFamily):
    name = "sd35"
    denoiser_class = "SD3Transformer2DModel"
    controlnet_class = "SD3ControlNetModel"
    default_resolution = 1024
    # The SD3.5 Large model card samples at 3.5 (28 steps); Medium's at 4.5 (40 steps): model.guidance.
    default_guidance = 3.5
    # Without the base's config at hand; with it, kohya's own model type (lora_base_model_version).
    base_model_version = "sd3"
    default_export_format = "diffusers"
    text_encoder_subfolders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    text_encoder_kinds = ("clip", "clip", "t5")
    lora_text_encoders = (0, 1)
    # Every attention projection of both streams; the names match attn.* and (Medium) attn2.*.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    single_file_pipeline = "StableDiffusion3Pipeline"
    embedding_refusal = (
        "diffusers' SD3 pipelines have no load_textual_inversion, and prompt tokens reach the transformer mostly "
        "through T5, which an embedding of the CLIP vocabularies would not change."
    )
    #: The toy base's transformer (sdtune.toy): 3 blocks of 4 heads of 32 (1.8 M parameters), block 0 still MMDiT-X.
    toy_denoiser = {"num_layers": 3, "attention_head_dim": 32, "num_attention_heads": 4, "caption_projection_dim": 128}
    pipelines = {
        ("text2img", False): "StableDiffusion3Pipeline",
        ("img2img", False): "StableDiffusion3Img2ImgPipeline",
        ("text2img", True): "StableDiffusion3ControlNetPipeline",
        ("img2img", True): None,  # diffusers 0.42 has no SD3 ControlNet img2img pipeline
    }

    # -- LoRA files: MMDiT names in kohya files (sd35_keys.py holds the table) ---------------
    def kohya_modules(self, denoiser_config=None):
        return sd35_keys.kohya_modules(denoiser_config)

    def lora_base_model_version(self, denoiser_config=None) -> str:
        return sd35_keys.base_model_version(denoiser_config)

    def lora_architecture(self, denoiser_config=None) -> str | None:
        return sd35_keys.architecture(denoiser_config)

    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None, quantize: str | None = None):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s, revision=revision) for s in ("tokenizer", "tokenizer_2")]
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", revision=revision))
        encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=s, revision=revision, dtype=dtype)
                    for s in ("text_encoder", "text_encoder_2")]
        encoders.append(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", revision=revision, dtype=dtype,
                                                       **text_encoder_kwargs(self, 2, quantize, dtype)))
        return tokenizers, encoders

    @staticmethod
    def t5_length(parts: ModelParts) -> int:
        return min(int(parts.tokenizers[2].model_max_length), T5_LENGTH)

    def text_max_length(self, parts: ModelParts) -> int:
        """T5's length: the prompt reaches the transformer whole through T5 (CLIP keeps its first 77 tokens)."""
        return self.t5_length(parts)

    def overlong_captions(self, parts: ModelParts, captions: list[str]) -> list[str]:
        tokenizer, limit = parts.tokenizers[2], self.t5_length(parts)
        return [c for c in captions if len(tokenizer(c, truncation=False)["input_ids"]) > limit]

    def tokenize(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids_0``/``_1``: CLIP-L's and CLIP-G's ids (77, the first tokenizer's length, as the
        pipeline pads both); ``input_ids_2``: T5's, at :meth:`t5_length`."""
        clip_length = parts.tokenizers[0].model_max_length
        out = {f"input_ids_{i}": tok(captions, padding="max_length", max_length=clip_length, truncation=True,
                                     return_tensors="pt").input_ids for i, tok in enumerate(parts.tokenizers[:2])}
        out["input_ids_2"] = parts.tokenizers[2](captions, padding="max_length", max_length=self.t5_length(parts),
                                                 truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return out

    def encode_tokens(self, parts: ModelParts, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``StableDiffusion3Pipeline.encode_prompt`` (no clip skip), op for op."""
        clip_l, clip_g, t5 = parts.text_encoders
        hidden, pooled = [], []
        for i, encoder in enumerate((clip_l, clip_g)):
            out = encoder(tokens[f"input_ids_{i}"].to(encoder.device, non_blocking=True), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projection of the end token
            hidden.append(out.hidden_states[-2].to(dtype=clip_l.dtype))
        t5_hidden = t5(tokens["input_ids_2"].to(t5.device, non_blocking=True))[0].to(dtype=t5.dtype)
        clip_hidden = torch.cat(hidden, dim=-1)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_hidden.to(t5_hidden.device), t5_hidden], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"], "pooled_projections": text["pooled_projections"]}

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:
        """The call of ``StableDiffusion3Pipeline.__call__``: the timestep is σ·1000, as the objective gives it."""
        return denoiser(hidden_states=noisy, timestep=timesteps.expand(noisy.shape[0]), **cond, return_dict=False)[0]

    def pipeline_call_kwargs(self, guidance: float, lora_scale: float | None = None,
                             parts: ModelParts | None = None) -> dict[str, Any]:
        """Also the T5 length the family trains with (the pipelines default to 256)."""
        extra = super().pipeline_call_kwargs(guidance, lora_scale, parts)
        if parts is not None:
            extra["max_sequence_length"] = self.t5_length(parts)
        return extra

    def controlnet_fits(self, denoiser_config: Mapping[str, Any], controlnet_config: Mapping[str, Any]) -> list[str]:
        """An SD3 ControlNet adds its block outputs to the transformer's hidden states and embeds the
        same latents and pooled text: width, patching and pooled size must match. Its context
        embedder, when it has one (SD3.5 Large's ControlNets have none), must take T5's width."""
        keys = ["num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "pooled_projection_dim"]
        if controlnet_config.get("joint_attention_dim") is not None:
            keys.append("joint_attention_dim")
        return [k for k in keys if controlnet_config.get(k) != denoiser_config.get(k)]

    def pipeline_components(self, parts: ModelParts) -> dict[str, Any]:
        from diffusers import FlowMatchEulerDiscreteScheduler

        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return {
            "vae": parts.vae,
            **dict(zip(names, parts.text_encoders)),
            **{n.replace("text_encoder", "tokenizer"): t for n, t in zip(names, parts.tokenizers)},
            "transformer": parts.denoiser,
            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(parts.noise_scheduler.config),
        }

    def build_tiny(self, folder: Path) -> None:
        """Tiny SD3.5: CLIP-L 32 and CLIP-G 48 wide (80 pooled), T5 96 wide, a 2-block MMDiT-X.

        Block 0 has dual attention (Medium's ``attn2``) and the last block is ``context_pre_only``,
        so both kinds of block LoRA meets at full size are here. ``joint_attention_dim`` is T5's
        width (the pipeline pads the 80 CLIP features to it) and the VAE has SD3's shift and scale.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        torch.manual_seed(0)
        tokenizer, tokenizer_2, tokenizer_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80, out_channels=16,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae16(VAE_SHIFT, VAE_SCALE),
            text_encoder=tiny_clip_text_encoder(tokenizer, 32, projection=True),
            tokenizer=tokenizer,
            text_encoder_2=tiny_clip_text_encoder(tokenizer_2, 48, projection=True),
            tokenizer_2=tokenizer_2,
            text_encoder_3=tiny_t5(tokenizer_3, d_model=96),
            tokenizer_3=tokenizer_3,
        )
        pipe.save_pretrained(folder)

    def random_text_parts(self, arch, *, meta):
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        encoders = [CLIPTextModelWithProjection(clip_config(arch["text_encoder"])),
                    CLIPTextModelWithProjection(clip_config(arch["text_encoder_2"])),
                    T5EncoderModel(t5_config(arch["text_encoder_3"]))]
        return ([] if meta else [build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer(T5_LENGTH)]), encoders

    def text_shapes(self, arch):
        """At the full T5 length (a tokenizer with a shorter limit, as the tiny one's, encodes fewer tokens)."""
        te, te2, t5 = arch["text_encoder"], arch["text_encoder_2"], arch["text_encoder_3"]
        return {
            "encoder_hidden_states": (te["max_position_embeddings"] + T5_LENGTH, t5["d_model"]),
            "pooled_projections": (te["projection_dim"] + te2["projection_dim"],),
        }
