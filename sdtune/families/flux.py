"""FLUX.1 (dev and schnell): a 12 B MMDiT transformer on 2x2-packed 16-channel latents, driven by
T5-XXL's token sequence and CLIP-L's pooled vector, with a guidance embedding on dev.

Text is encoded exactly as ``FluxPipeline.encode_prompt`` does: T5's last hidden state (no
attention mask) as the context and CLIP-L's ``pooler_output`` as the pooled projection. The
transformer takes latents packed into 2x2 patches (``FluxPipeline._pack_latents``) with per-patch
position ids, zero text ids, the timestep as sigma (the pipelines pass ``t / 1000``) and, on dev, the
guidance value; :meth:`Flux.predict` does the packing and unpacks the velocity back to (B, C, h, w),
so the loss, masks and caches see ordinary latents. Training follows diffusers'
``train_dreambooth_lora_flux.py``: its 12 default LoRA targets, the guidance input from
``train.flow.guidance`` (dev only), T5 never adapted. kohya files name layers after BFL's fused
modules (:mod:`sdtune.families.flux_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdtune.families import flux_keys
from sdtune.families.base import ModelParts
from sdtune.families.flow import FlowFamily
from sdtune.families.quantize_load import text_encoder_kwargs
from sdtune.families.tiny_flow_parts import build_t5_tokenizer, t5_config, tiny_t5, tiny_vae16
from sdtune.families.tiny_parts import build_clip_tokenizer, clip_config, tiny_clip_text_encoder
from sdtune.utils.errors import ConfigError

#: T5 tokens FluxPipeline accepts at most (it refuses ``max_sequence_length`` > 512).
MAX_T5_TOKENS = 512
#: T5 tokens of a base without a guidance embedding (schnell): diffusers' FLUX docs and BFL's
#: reference code run schnell at 256.
SCHNELL_T5_TOKENS = 256
#: FLUX.1's VAE latent statistics (its vae/config.json): latents = (z - shift) * scale.
VAE_SHIFT, VAE_SCALE = 0.1159, 0.3611


def flux_t5_length(guidance_embeds: bool, tokenizer_limit: int | None = None, override: int | None = None) -> int:
    """T5 tokens per prompt: ``override`` (``model.max_sequence_length``), else 512 for a guided base
    (dev) and 256 for schnell; never more than the tokenizer's ``model_max_length``."""
    length = int(override) if override else (MAX_T5_TOKENS if guidance_embeds else SCHNELL_T5_TOKENS)
    return min(length, tokenizer_limit) if tokenizer_limit else length


class Flux(FlowFamily):
    name = "flux"
    default_resolution = 1024
    default_guidance = 3.5
    base_model_version = "flux1"  # kohya's MODEL_VERSION_FLUX_V1
    denoiser_class = "FluxTransformer2DModel"
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    text_encoder_kinds = ("clip", "t5")
    #: CLIP-L only: diffusers' FLUX loader loads no T5 LoRA, and T5-XXL is the 4.8 B encoder that caching frees.
    lora_text_encoders = (0,)
    #: diffusers' train_dreambooth_lora_flux.py default: attention and feed-forward of both streams of
    #: the double blocks; peft matches by suffix, so ``attn.to_q`` also takes the single blocks' to_q/k/v.
    default_lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    controlnet_class = "FluxControlNetModel"
    single_file_pipeline = "FluxPipeline"  # BFL's flux1-dev.safetensors, with model.config for the other parts
    embedding_refusal = (
        "FluxPipeline.load_textual_inversion adds the new words to the CLIP tokenizer only, while a prompt's tokens "
        "reach the FLUX transformer through T5; an embedding would move CLIP's one pooled vector and nothing else."
    )
    #: The toy base's transformer (sdtune.toy): 2 double and 2 single blocks of 4 heads of 32 (1.9 M parameters).
    toy_denoiser = {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 4,
                    "axes_dims_rope": [8, 12, 12]}
    pipelines = {
        ("text2img", False): "FluxPipeline",
        ("img2img", False): "FluxImg2ImgPipeline",
        ("text2img", True): "FluxControlNetPipeline",
        ("img2img", True): "FluxControlNetImg2ImgPipeline",
    }

    # -- LoRA files: BFL names in kohya files (flux_keys.py holds the table) -------------------
    def kohya_modules(self, denoiser_config=None):
        return flux_keys.kohya_modules(denoiser_config)

    def lora_base_model_version(self, denoiser_config=None) -> str:
        return flux_keys.base_model_version(denoiser_config)

    def lora_architecture(self, denoiser_config=None) -> str | None:
        return flux_keys.architecture(denoiser_config)

    # -- text ------------------------------------------------------------------------------
    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None, quantize: str | None = None):
        # transformers 5 has one T5 tokenizer class (T5TokenizerFast is T5Tokenizer); it reads
        # tokenizer.json or spiece.model, whichever the folder holds.
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
                      T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", revision=revision)]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype),
                    T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", revision=revision, dtype=dtype,
                                                   **text_encoder_kwargs(self, 1, quantize, dtype))]
        return tokenizers, encoders

    def configure_parts(self, parts: ModelParts, model_cfg: Mapping[str, Any]) -> None:
        """``model.max_sequence_length`` (T5 tokens; null: 512 for dev, 256 for schnell) into ``parts``."""
        length = model_cfg.get("max_sequence_length")
        if length is None:
            return
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= MAX_T5_TOKENS:
            raise ConfigError(f"model.max_sequence_length={length!r} must be a whole number of T5 tokens from 1 to "
                              f"{MAX_T5_TOKENS} (FluxPipeline refuses more). Fix: e.g. model.max_sequence_length=512, "
                              "or null for the base's default (dev 512, schnell 256).")
        parts.extra["max_sequence_length"] = length

    def text_max_length(self, parts: ModelParts) -> int:
        """T5's prompt length in tokens (CLIP's is always 77 and only feeds the pooled vector)."""
        return flux_t5_length(bool(parts.denoiser.config.get("guidance_embeds")), parts.tokenizers[1].model_max_length,
                              parts.extra.get("max_sequence_length"))

    def overlong_captions(self, parts: ModelParts, captions: list[str]) -> list[str]:
        """Captions T5 truncates (the sequence the transformer attends to)."""
        tokenizer, limit = parts.tokenizers[1], self.text_max_length(parts)
        return [c for c in captions if len(tokenizer(c, truncation=False)["input_ids"]) > limit]

    def tokenize(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids_0``: CLIP ids at its 77 tokens; ``input_ids_1``: T5 ids at :meth:`text_max_length`."""
        lengths = (parts.tokenizers[0].model_max_length, self.text_max_length(parts))
        return {
            f"input_ids_{i}": tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                                        return_tensors="pt").input_ids
            for i, (tokenizer, length) in enumerate(zip(parts.tokenizers, lengths))
        }

    def encode_tokens(self, parts: ModelParts, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FluxPipeline.encode_prompt's two calls: CLIP's pooler output and T5's last hidden state."""
        clip, t5 = parts.text_encoders
        pooled = clip(tokens["input_ids_0"].to(clip.device, non_blocking=True), output_hidden_states=False).pooler_output
        context = t5(tokens["input_ids_1"].to(t5.device, non_blocking=True), output_hidden_states=False)[0]
        return {"encoder_hidden_states": context.to(t5.dtype), "pooled_projections": pooled.to(clip.dtype)}

    def conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"], "pooled_projections": text["pooled_projections"]}

    # -- denoiser --------------------------------------------------------------------------
    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:
        """The transformer's velocity for ``noisy`` (B, C, h, w), as FluxPipeline calls it: 2x2-packed
        latents with their patch ids, zero text ids, ``timesteps / 1000`` (sigma) and ``cond``'s guidance."""
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        context = cond["encoder_hidden_states"]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, context.dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=noisy.device, dtype=context.dtype)
        guidance = cond.get("guidance")
        out = denoiser(
            hidden_states=packed, timestep=timesteps.to(noisy.device) / 1000,
            guidance=None if guidance is None else guidance.to(noisy.device),
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=context,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        # _unpack_latents takes pixel sides and the VAE factor; latent sides with factor 1 are the same sizes.
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def training_guidance(self, parts: ModelParts, flow: Mapping[str, Any]) -> float | None:
        """``train.flow.guidance`` when the transformer has a guidance embedding (dev); schnell has none."""
        if not parts.denoiser.config.get("guidance_embeds"):
            return None
        return float(flow.get("guidance", 1.0))

    def controlnet_fits(self, denoiser_config: Mapping[str, Any], controlnet_config: Mapping[str, Any]) -> list[str]:
        """A FluxControlNetModel adds its block outputs to the transformer's: the same input, widths and
        rope axes. Its own guidance embedding may differ (the pipeline passes guidance only when it has one)."""
        keys = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "pooled_projection_dim", "axes_dims_rope")

        def norm(value):
            return list(value) if isinstance(value, (list, tuple)) else value

        return [k for k in keys if norm(controlnet_config.get(k)) != norm(denoiser_config.get(k))]

    # -- pipelines -------------------------------------------------------------------------
    def pipeline_components(self, parts: ModelParts) -> dict[str, Any]:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return {
            "vae": parts.vae,
            "text_encoder": parts.text_encoders[0],
            "text_encoder_2": parts.text_encoders[1],
            "tokenizer": parts.tokenizers[0],
            "tokenizer_2": parts.tokenizers[1],
            "transformer": parts.denoiser,
            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(parts.noise_scheduler.config),
        }

    def pipeline_call_kwargs(self, guidance: float, lora_scale: float | None = None,
                             parts: ModelParts | None = None) -> dict[str, Any]:
        """Plus ``max_sequence_length`` (the T5 length training encoded at) when ``parts`` are given;
        without them the pipeline pads T5 to its default 512."""
        extra = super().pipeline_call_kwargs(guidance, lora_scale, parts)
        if parts is not None:
            extra["max_sequence_length"] = self.text_max_length(parts)
        return extra

    # -- tiny and full-size builders -------------------------------------------------------
    def build_tiny(self, folder: Path) -> None:
        """Tiny FLUX.1-dev: 1 double and 2 single blocks, 2 heads of 16 (rope axes 4+6+6), guidance
        embedding; CLIP 32 wide, T5 32 wide at 32 tokens, 16-channel VAE with FLUX's latent statistics,
        FLUX's dynamic-shift scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(0)
        tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
            vae=tiny_vae16(VAE_SHIFT, VAE_SCALE),
            text_encoder=tiny_clip_text_encoder(tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=tiny_t5(tokenizer_2, d_model=32),
            tokenizer_2=tokenizer_2,
            transformer=FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6)),
        )
        pipe.save_pretrained(folder)

    def random_text_parts(self, arch, *, meta):
        from transformers import CLIPTextModel, T5EncoderModel

        encoders = [CLIPTextModel(clip_config(arch["text_encoder"])), T5EncoderModel(t5_config(arch["text_encoder_2"]))]
        return ([] if meta else [build_clip_tokenizer(), build_t5_tokenizer(MAX_T5_TOKENS)]), encoders

    def text_shapes(self, arch):
        length = flux_t5_length(bool(arch[self.denoiser_subfolder].get("guidance_embeds")))
        return {"encoder_hidden_states": (length, arch["text_encoder_2"]["d_model"]),
                "pooled_projections": (arch["text_encoder"]["hidden_size"],)}
