"""The numbers of an evaluation against reference images: a VAE-latent distance, CLIP and DINO scores.

* ``latent_dist`` (default, no extra model): each rendered image and each reference are encoded by
  the base model's own VAE (latent mean, less its shift and times its scaling factor, as the
  denoiser sees it: about zero mean and unit variance in every family); an image's distance is the root-mean-square latent difference to its
  *nearest* reference, averaged over images. The VAE latent is a downscaled (8x) picture that
  keeps colour and layout, so this is a perceptual pixel distance the base model itself defines:
  0 for an image identical to a reference, about 1-2 for unrelated images. Lower is better.
* ``clip_t``: cosine similarity of CLIP's image and prompt embeddings, averaged over images
  (prompt fidelity). ``clip_i`` and ``dino``: cosine similarity of image and reference embeddings
  from CLIP's or DINO's image tower, averaged over all (image, reference) pairs, as in DreamBooth
  (Ruiz et al. 2023). Similarities: higher is better, 1 for identical images.

References are fitted to the rendered size (centre crop to its aspect, bicubic resize) first.
Models load from local folders only (``local_files_only``); the transformers image processors
fall back to their PIL versions, so no torchvision is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtune.data.images import load_rgb
from sdtune.families.source import check_weights
from sdtune.training.diffusion import scale_latents
from sdtune.utils.errors import ConfigError


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` in RGB, centre-cropped to the aspect of ``size`` (w, h) and resized to it."""
    return ImageOps.fit(image.convert("RGB"), size, method=Image.Resampling.BICUBIC)


def load_references(paths: Sequence[Path], size: tuple[int, int]) -> list[Image.Image]:
    """Each reference picture decoded as training decodes its images (:func:`sdtune.data.images.load_rgb`), then fitted."""
    return [fit_image(load_rgb(path), size) for path in paths]


@torch.no_grad()
def vae_latents(vae, images: Sequence[Image.Image]) -> torch.Tensor:
    """[N, C*h*w] float32 CPU: the scaled latent means of ``images`` (all the same size), :func:`scale_latents`."""
    param = next(vae.parameters())
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]))
    pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1.0).to(param.device, param.dtype)
    latents = scale_latents(vae.encode(pixels).latent_dist.mean, vae.config)  # shift_factor too (SD3, FLUX)
    return latents.flatten(1).cpu()


def nearest_rms(images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over rows of ``images`` of the RMS difference to the nearest row of ``references``."""
    sq = ((images[:, None, :] - references[None, :, :]) ** 2).mean(-1)  # [N, R]
    return float(sq.min(dim=1).values.sqrt().mean())


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of ``a`` and ``b``."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return float((a @ b.T).mean())


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns model outputs from ``get_*_features`` (projection in pooler_output); 4.x tensors."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@contextlib.contextmanager
def _on(model: torch.nn.Module, device: torch.device):
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


class ClipScorer:
    """CLIP image and text embeddings from a local folder (``eval.clip_model``)."""

    def __init__(self, path: Path, *, allow_pickle: bool = False):
        check_weights(path, key="eval.clip_model", allow_pickle=allow_pickle)  # the loading gate: no pickles unless allowed
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"eval.clip_model={path}: not a loadable CLIP model with its processor and tokenizer "
                              f"({err}). Fix: a CLIPModel folder such as openai/clip-vit-large-patch14, downloaded.") from None

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with _on(self.model, device):
            return _pooled(self.model.get_image_features(pixel_values=pixels.to(device))).float().cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with _on(self.model, device):
            out = self.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                               attention_mask=tok["attention_mask"].to(device))
        return _pooled(out).float().cpu()


class DinoScorer:
    """DINO / DINOv2 image embeddings (the CLS token) from a local folder (``eval.dino_model``)."""

    def __init__(self, path: Path, *, allow_pickle: bool = False):
        check_weights(path, key="eval.dino_model", allow_pickle=allow_pickle)  # the loading gate: no pickles unless allowed
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"eval.dino_model={path}: not a loadable image model with its image processor ({err}). "
                              "Fix: a folder such as facebook/dinov2-small, downloaded.") from None

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        with _on(self.model, device):
            out = self.model(pixel_values=pixels.to(device))
        pooled = getattr(out, "pooler_output", None)  # Dinov2: the layer-normed CLS token
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float().cpu()
