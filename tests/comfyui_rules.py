"""ComfyUI's LoRA key rules, written out as a table so tests can load our files the way ComfyUI does.

From ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet`` builds the key map, ``load_lora``
consumes a file against it) and ``comfy/utils.py`` (``unet_to_diffusers``):

* every UNet weight ``diffusion_model.<path>.weight`` of its own (LDM) state dict is reachable as
  ``lora_unet_<path with "." -> "_">``;
* every diffusers UNet weight name ``<path>.weight`` (``unet_to_diffusers``) is reachable as
  ``lora_unet_<path with "." -> "_">`` too;
* for each reachable stem ``x``, ``load_lora`` takes ``x.lora_up.weight`` and
  ``x.lora_down.weight`` (and ``x.alpha`` when present; the patch is ``alpha / rank * up @ down``,
  alpha defaulting to the rank); every other key is logged as "lora key not loaded".

The diffusers-layout keys ComfyUI knows (``<prefix><path>.processor.to_q_lora.up.weight``) are
those of diffusers' retired attention-processor LoRAs, not of today's ``unet.<path>.lora.up.weight``,
which is why a diffusers-layout file loads nothing there.
"""

from __future__ import annotations

import torch

from sdtune.ldm_format import UNET_PREFIX, unet_to_original

KOHYA_UNET = "lora_unet_"


def _stem(path: str) -> str:
    return KOHYA_UNET + path.replace(".", "_")


def unet_key_map(unet) -> dict[str, str]:
    """Every stem ComfyUI accepts for this UNet -> the diffusers module it patches."""
    # a UNet with peft LoRA layers keeps each wrapped weight as <path>.base_layer.weight
    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    modules = {k[: -len(".weight")] for k in state if k.endswith(".weight")}
    key_map = {_stem(m): m for m in modules}
    config = dict(unet.config)
    for module in modules:  # LDM names, where the model has one (Kolors' encoder_hid_proj has none)
        try:
            (name,) = unet_to_original({module + ".weight": None}, config)
        except KeyError:
            continue
        key_map[_stem(name[len(UNET_PREFIX) : -len(".weight")])] = module
    return key_map


def load_like_comfyui(lora: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(diffusers module -> weight delta ComfyUI adds, keys it would report "lora key not loaded")."""
    deltas, loaded = {}, set()
    for stem, module in key_map.items():
        up, down, alpha = f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
        if up not in lora:
            continue
        rank = lora[down].shape[0]
        scale = (float(lora[alpha]) if alpha in lora else rank) / rank
        u, d = lora[up].flatten(1).float(), lora[down].flatten(1).float()
        deltas[module] = scale * (u @ d)
        loaded |= {up, down, alpha} & lora.keys()
    return deltas, sorted(lora.keys() - loaded)
