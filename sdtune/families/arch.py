"""Full-size SD1.5 / SDXL / Kolors / SD3.5 architectures with random weights, built from shipped configs.

The bench must count FLOPs and (on a GPU) time the real architectures without downloading
weights, so ``arch_configs/`` holds the published ``config.json`` of each denoiser, VAE, text encoder and
scheduler (``<family>_<component>.json``; a variant of a family, such as SD3.5 Medium beside Large,
adds ``<family>_<variant>_<component>.json`` for the components that differ). ``build_random_parts``
turns them (or a diffusers folder's own configs, e.g. a tiny model's) into
:class:`~sdtune.families.ModelParts`. On ``torch.device("meta")`` nothing is allocated, so an SDXL
or a 6B-parameter ChatGLM costs no memory; the FLOP counter still sees every operation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sdtune.families import ModelFamily, ModelParts, as_family

CONFIGS = Path(__file__).resolve().parent / "arch_configs"
#: Component -> (diffusers subfolder, config file name inside it).
SUBFOLDERS = {
    "unet": ("unet", "config.json"),
    "transformer": ("transformer", "config.json"),
    "vae": ("vae", "config.json"),
    "text_encoder": ("text_encoder", "config.json"),
    "text_encoder_2": ("text_encoder_2", "config.json"),
    "text_encoder_3": ("text_encoder_3", "config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}


def architecture(family: str | ModelFamily, folder: str | Path | None = None, *,
                 variant: str | None = None) -> dict[str, dict[str, Any]]:
    """The component configs of ``family``: shipped JSON files, or those of a diffusers ``folder``;
    keyed by component (the denoiser under :attr:`~sdtune.families.base.ModelFamily.denoiser_subfolder`).

    ``variant`` picks a shipped variant's own files where it has them (``variant="medium"`` reads
    ``sd35_medium_transformer.json`` and SD3.5's shared VAE, encoders and scheduler).
    """
    family = as_family(family)
    names = (family.denoiser_subfolder, "vae", *family.text_encoder_subfolders, "scheduler")
    if variant is not None and folder is None and variant not in variants(family):
        raise ValueError(f"architecture variant={variant!r}: {family.name} has no shipped variant of that name "
                         f"(arch_configs/{family.name}_{variant}_*.json); its variants: {variants(family) or 'none'}")
    out = {}
    for name in names:
        if folder is None:
            path = CONFIGS / f"{family.name}_{name}.json"
            if variant is not None and (CONFIGS / f"{family.name}_{variant}_{name}.json").is_file():
                path = CONFIGS / f"{family.name}_{variant}_{name}.json"
        else:
            sub, file = SUBFOLDERS[name]
            path = Path(folder) / sub / file
        out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def variants(family: str | ModelFamily) -> list[str]:
    """The named variants of ``family`` with shipped configs (each has its own denoiser config)."""
    family = as_family(family)
    prefix, suffix = f"{family.name}_", f"_{family.denoiser_subfolder}.json"
    return sorted(p.name[len(prefix):-len(suffix)] for p in CONFIGS.glob(f"{prefix}*{suffix}"))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (a 6B encoder in fp32 first would need 24 GB)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_random_parts(
    family: str | ModelFamily,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    folder: str | Path | None = None,
    seed: int = 0,
    variant: str | None = None,
) -> ModelParts:
    """Random-initialised parts of ``family`` (shipped configs of its ``variant``, or ``folder``'s) on ``device``.

    On the meta device no tokenizers are built: meta tensors have shapes but no values to encode.
    """
    import diffusers
    from diffusers import AutoencoderKL

    family = as_family(family)
    arch = architecture(family, folder, variant=variant)
    device = torch.device(device)
    meta = device.type == "meta"
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        denoiser = getattr(diffusers, family.denoiser_class).from_config(arch[family.denoiser_subfolder])
        vae = AutoencoderKL.from_config(arch["vae"])
        tokenizers, encoders = family.random_text_parts(arch, meta=meta)
    return ModelParts(
        denoiser=denoiser,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=getattr(diffusers, family.training_scheduler).from_config(arch["scheduler"]),
        source=f"random-init:{family.name}" if folder is None else str(folder),
    )


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
