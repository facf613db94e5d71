"""LoRA tensor names in every format we read or write, as explicit rule tables.

In memory LoRAs are always peft-named: ``<module>.lora_A.weight`` (down) and ``.lora_B.weight``
(up), where ``<module>`` is a diffusers UNet module path such as
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.

On disk:

* **diffusers** (what diffusers' training scripts write and ``load_lora_weights`` reads):
  ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``; alpha in the header.
* **kohya** (A1111, ComfyUI, Forge, kohya sd-scripts): ``lora_unet_<name>.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha`` per module. ``<name>`` is the module path with ``.``
  replaced by ``_``. For families with ``kohya_sgm_names`` (SDXL) it is the original SGM path
  (``input_blocks.4.1...``), as kohya sd-scripts writes it. Otherwise (SD1.x, Kolors) it is
  diffusers' own path: kohya's SD1.x convention, and for Kolors the one name form that both
  diffusers' KolorsPipeline and ComfyUI read (ComfyUI's key map accepts diffusers paths and
  original paths for every UNet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .errors import LoraFileError
from .families import ModelFamily, as_family
from .ldm_format import unet_block_prefixes

DIFFUSERS_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"

#: peft suffix -> diffusers-file suffix
DIFFUSERS_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora.down.weight"),
    (".lora_B.weight", ".lora.up.weight"),
)
#: peft suffix -> kohya suffix
KOHYA_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_up.weight"),
)
KOHYA_ALPHA = ".alpha"

#: The standard SDXL UNet layout, used when the base model's own config is not at hand.
STANDARD_XL_UNET = {
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def _swap_suffix(key: str, rules: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(stem, new suffix) for ``key`` under ``rules``."""
    for old, new in rules:
        if key.endswith(old):
            return key[: -len(old)], new
    raise LoraFileError(f"tensor {key!r} is not a LoRA down/up weight; cannot rename it")


# -- diffusers ---------------------------------------------------------------------------------
def peft_to_diffusers(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        stem, suffix = _swap_suffix(k, DIFFUSERS_SUFFIXES)
        out[DIFFUSERS_PREFIX + stem + suffix] = v
    return out


def diffusers_to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reverse = tuple((new, old) for old, new in DIFFUSERS_SUFFIXES)
    out = {}
    for k, v in tensors.items():
        if not k.startswith(DIFFUSERS_PREFIX):
            raise LoraFileError(
                f"tensor {k!r} is not a UNet LoRA tensor (expected the prefix {DIFFUSERS_PREFIX!r}); "
                "sdtune reads UNet LoRAs in diffusers or kohya format"
            )
        stem, suffix = _swap_suffix(k[len(DIFFUSERS_PREFIX):], reverse)
        out[stem + suffix] = v
    return out


# -- kohya -------------------------------------------------------------------------------------
def kohya_module_name(module: str, family: str | ModelFamily, unet_config: Mapping[str, Any] | None = None) -> str:
    """``lora_unet_...`` name of a diffusers UNet module path, as A1111/ComfyUI expect it."""
    path = module
    if as_family(family).kohya_sgm_names:
        for src, dst, _inner in unet_block_prefixes(unet_config or STANDARD_XL_UNET):
            if module.startswith(src):
                path = dst + module[len(src):]
                break
    return KOHYA_PREFIX + path.replace(".", "_")


def peft_to_kohya(
    tensors: Mapping[str, torch.Tensor], alpha: float, family: str | ModelFamily, unet_config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    family = as_family(family)
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        stem, suffix = _swap_suffix(k, KOHYA_SUFFIXES)
        name = kohya_module_name(stem, family, unet_config)
        out[name + suffix] = v
        out[name + KOHYA_ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)  # the true trained alpha
    return out


def kohya_to_peft(
    tensors: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    family: str | ModelFamily,
    unet_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """peft tensors and per-module alphas from a kohya file, resolved against ``module_names``.

    ``_`` in a kohya name is ambiguous (``transformer_blocks`` vs a path separator), so names are
    matched by computing the kohya name of every module the UNet actually has.
    """
    family = as_family(family)
    lookup = {kohya_module_name(m, family, unet_config): m for m in module_names}
    reverse = tuple((new, old) for old, new in KOHYA_SUFFIXES)
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for k, v in tensors.items():
        if k.startswith("lora_te"):  # text-encoder LoRA layers: not trained or applied by sdtune
            continue
        if k.endswith(KOHYA_ALPHA):
            name = k[: -len(KOHYA_ALPHA)]
            if v.numel() != 1:
                raise LoraFileError(f"tensor {k!r} should be one scalar alpha but has shape {list(v.shape)}")
            if name in lookup:
                alphas[lookup[name]] = float(v)
            continue
        stem, suffix = _swap_suffix(k, reverse)
        if stem not in lookup:
            unknown.append(k)
            continue
        out[lookup[stem] + suffix] = v
    if unknown:
        raise LoraFileError(
            f"{len(unknown)} kohya tensor(s) match no module of this {family.name} UNet, e.g. {sorted(unknown)[:3]}"
        )
    return out, alphas


def detect_format(keys: Iterable[str]) -> str:
    """'diffusers' or 'kohya' from the tensor names; anything else is refused by name."""
    keys = list(keys)
    if keys and all(k.startswith(DIFFUSERS_PREFIX) for k in keys):
        return "diffusers"
    if keys and any(k.startswith(KOHYA_PREFIX) for k in keys) and all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    sample = sorted(keys)[:3]
    raise LoraFileError(
        f"unrecognised LoRA layout (tensor names like {sample}); sdtune reads UNet LoRAs in diffusers format "
        "(unet.<module>.lora.down.weight) or kohya format (lora_unet_<module>.lora_down.weight)"
    )
