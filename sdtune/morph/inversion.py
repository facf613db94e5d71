"""DDIM inversion and latent interpolation for any family's text-to-image pipeline.

An image is encoded with the VAE and run *up* the noise schedule by the same text2img pipeline
with its scheduler swapped for diffusers' ``DDIMInverseScheduler`` (guidance 1, ``latents=`` the
encoded image, ``output_type="latent"``): what diffusers' pix2pix-zero and DiffEdit pipelines do.
Sampling that noise back down with ``DDIMScheduler`` (eta 0, the same steps, guidance 1) redraws
the image, so two inverted latents can be blended (:func:`slerp`) and sampled in between.

Nothing here names a family: the pipelines share ``latents=``, ``output_type=`` and the
``prompt_embeds``-style keywords that :func:`conditioning` fills from ``pipe.encode_prompt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

#: ``encode_prompt``'s outputs, in order: two for SD1.5-style pipelines, four where there is a pooled embedding.
EMBED_KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation between ``a`` and ``b`` (any shape, taken as flat vectors) at ``t`` in [0, 1].

    Gaussian noise lives near a sphere; a straight line between two noises passes inside it (the
    midpoint of two independent unit-variance noises has variance 1/2, which samples as a washed-out
    image), the great circle stays on it. Nearly parallel vectors fall back to a plain lerp, where
    the angle is too small to divide by.
    """
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-30)
    if cos.abs() > dot_threshold:
        out = (1 - t) * fa + t * fb
    else:
        theta = torch.arccos(cos.clamp(-1.0, 1.0))
        out = (torch.sin((1 - t) * theta) * fa + torch.sin(t * theta) * fb) / torch.sin(theta)
    return out.reshape(a.shape).to(a.dtype)


def ddim_schedulers(scheduler_config: Mapping[str, Any]):
    """(inverse, forward) DDIM schedulers from the base's noise-scheduler config.

    ``clip_sample`` is off explicitly: an Euler config (SDXL, Kolors) has no such key, and
    DDIM's default (on) clips the predicted latent to [-1, 1], which wrecks both directions.
    """
    import inspect

    from diffusers import DDIMInverseScheduler, DDIMScheduler

    def build(cls):  # only the keys cls takes: diffusers warns about every other one (Euler's sigma options)
        known = inspect.signature(cls.__init__).parameters
        return cls.from_config({**{k: v for k, v in dict(scheduler_config).items() if k in known}, "clip_sample": False})

    return build(DDIMInverseScheduler), build(DDIMScheduler)


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """The clean latent of ``image``: the VAE posterior's mean, shifted and scaled as the UNet sees latents."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image).to(device=vae.device, dtype=vae.dtype)
    latent = vae.encode(pixels).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latent(pipe, latent: torch.Tensor) -> Image.Image:
    """The image of a clean latent (for the VAE's own round-trip error)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    pixels = vae.decode(latent / vae.config.scaling_factor + shift).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]


@torch.no_grad()
def conditioning(pipe, prompt: str, *, guidance: float, negative_prompt: str | None = None) -> dict[str, Any]:
    """``prompt`` encoded by ``pipe`` as its ``__call__`` keywords (``prompt_embeds=`` ...), so two
    prompts can be blended (:func:`lerp_conditioning`). Encoded under the LoRA weights active now."""
    out = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=guidance > 1, negative_prompt=negative_prompt)
    return dict(zip(EMBED_KEYS, out))


def lerp_conditioning(a: Mapping[str, Any], b: Mapping[str, Any], t: float) -> dict[str, Any]:
    """Each embedding at ``(1 - t) * a + t * b`` (``None`` stays ``None``)."""
    return {k: None if a[k] is None else torch.lerp(a[k], b[k], float(t)) for k in a}


def _call(pipe, latent: torch.Tensor, cond: Mapping[str, Any], *, steps: int, guidance: float, size: int, output: str,
          seed: int):
    return pipe(**cond, latents=latent, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                output_type=output, generator=torch.Generator("cpu").manual_seed(seed)).images


@torch.no_grad()
def invert(pipe, latent: torch.Tensor, cond: Mapping[str, Any], *, scheduler, steps: int, size: int,
           seed: int = 0) -> torch.Tensor:
    """The noise latent that DDIM sampling with ``cond`` turns back into ``latent``; ``scheduler`` is
    :func:`ddim_schedulers`' inverse one. Guidance 1: classifier-free guidance breaks the symmetry."""
    pipe.scheduler = scheduler  # init_noise_sigma is 1: prepare_latents leaves ``latent`` as it is
    return _call(pipe, latent, cond, steps=steps, guidance=1.0, size=size, output="latent", seed=seed)


@torch.no_grad()
def sample(pipe, noise: torch.Tensor, cond: Mapping[str, Any], *, scheduler, steps: int, guidance: float, size: int,
           seed: int = 0) -> Image.Image:
    """Deterministic DDIM sampling (eta 0) from ``noise`` with :func:`ddim_schedulers`' forward
    ``scheduler``; the seed is passed but draws nothing."""
    pipe.scheduler = scheduler
    return _call(pipe, noise, cond, steps=steps, guidance=guidance, size=size, output="pil", seed=seed)[0]


def pixel_error(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-size RGB images, in [0, 1] (1: black against white)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float32) / 255.0
    y = np.asarray(b.convert("RGB"), dtype=np.float32) / 255.0
    if x.shape != y.shape:
        raise ValueError(f"pixel_error: sizes differ, {a.size} and {b.size}")
    return float(np.abs(x - y).mean())
