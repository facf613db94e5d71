"""What the flow-matching transformer families (FLUX.1, SD3.5) share.

Their denoiser is a diffusers transformer in the ``transformer`` subfolder, trained by rectified
flow matching (:class:`sdtune.families.objectives.FlowMatchObjective`) on 16-channel latents that
the denoiser cuts into 2x2 patches, so image sides are multiples of 16 pixels. A family module
subclasses :class:`FlowFamily` and adds its text encoders, conditioning and key tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtune.families.base import ModelFamily, ModelParts
from sdtune.families.objectives import FlowMatchObjective, Objective

#: CLIP prompt length of the toy bases (:meth:`FlowFamily.build_toy_folder`): every toy caption,
#: trigger words included, is at most 18 of the tiny CLIP tokenizer's tokens, and SD3 puts the CLIP
#: tokens into the transformer's context, whose 77 padded tokens would be most of the toy's training time.
TOY_CLIP_TOKENS = 24


class FlowFamily(ModelFamily):
    """A transformer trained by flow matching; subclasses set the rest of :class:`ModelFamily`."""

    denoiser_subfolder = "transformer"
    training_scheduler = "FlowMatchEulerDiscreteScheduler"
    objective_class = FlowMatchObjective
    pixel_multiple = 16
    controlnet_image_argument = "control_image"  # StableDiffusion3ControlNetPipeline, FluxControlNetPipeline
    pixel_multiple_reason = "the VAE downsamples by 8 and the transformer takes 2x2 patches of latents"
    bake_diffusers_alpha = True  # ComfyUI reads their diffusers layout (transformer.<m>.lora.down.weight)
    inference_dtype = "bfloat16"  # both were trained in bf16; SD3's transformer has no fp16 clipping
    #: Side of the latent patches the transformer takes as tokens (FLUX packs 2x2, SD3 patches 2x2).
    latent_patch: ClassVar[int] = 2
    speed_refusals: ClassVar[dict[str, str]] = {
        "speed.channels_last=true": (
            "the NHWC layout speeds up convolutions, and a transformer denoiser has none (SD3's patch embedding "
            "aside), so the switch would only change the VAE. Fix: speed.channels_last=false"),
    }
    frozen_text_encoder_reason = (
        "T5 takes no LoRA layers: diffusers' FLUX and SD3 LoRA loaders read none for it, and T5-XXL is the 4.8 B-parameter "
        "encoder that train.cache_text_embeddings frees (a trained T5 would stay on the GPU with its gradients)"
    )
    morph_refusal = (
        "sdtune.morph inverts an image with DDIM over a DDPM noise schedule; a flow-matching base needs its ODE "
        "run backwards (flow inversion), which sdtune does not have yet. Fix: morph with an sd15, sdxl or kolors base"
    )

    #: Config values that turn :meth:`build_tiny`'s transformer (~0.1 M parameters, sized for fast
    #: tests) into the toy base's (:mod:`sdtune.toy`), about as large as the UNet toys' (1.1-1.4 M).
    toy_denoiser: ClassVar[dict[str, Any]] = {}

    def build_toy_folder(self, folder: Path) -> None:
        """The tiny model with its transformer rebuilt from its config updated by :attr:`toy_denoiser`
        (seeded), and CLIP prompts of :data:`TOY_CLIP_TOKENS` tokens."""
        import diffusers

        self.build_tiny(folder)
        folder = Path(folder)
        for subfolder, kind in zip(self.text_encoder_subfolders, self.text_encoder_kinds):
            path = folder / subfolder.replace("text_encoder", "tokenizer") / "tokenizer_config.json"
            if kind == "clip" and path.is_file():
                config = json.loads(path.read_text())
                config["model_max_length"] = TOY_CLIP_TOKENS
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not self.toy_denoiser:
            return
        cls = getattr(diffusers, self.denoiser_class)
        subfolder = folder / self.denoiser_subfolder
        config = {k: v for k, v in cls.load_config(subfolder).items() if not k.startswith("_")}
        torch.manual_seed(1)
        cls.from_config({**config, **self.toy_denoiser}).save_pretrained(subfolder)

    def objective(self, parts: ModelParts, train_cfg: Mapping[str, Any]) -> Objective:
        flow = dict(train_cfg.get("flow") or {})
        return FlowMatchObjective(parts.noise_scheduler, flow, guidance=self.training_guidance(parts, flow),
                                  patch_size=self.latent_patch)

    def training_guidance(self, parts: ModelParts, flow: Mapping[str, Any]) -> float | None:
        """The guidance-embedding value to train at (None: the denoiser has no guidance input)."""
        return None

    def enable_sdpa(self, denoiser: torch.nn.Module) -> None:
        """Nothing to switch: diffusers' FLUX and joint-attention processors already call
        ``F.scaled_dot_product_attention``."""

    def pipeline_call_kwargs(self, guidance: float, lora_scale: float | None = None,
                             parts: ModelParts | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {"guidance_scale": float(guidance)}
        if lora_scale is not None:
            extra["joint_attention_kwargs"] = {"scale": float(lora_scale)}
        return extra
