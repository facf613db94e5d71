"""The FLUX and SD3 kohya key tables against the real full-size transformers (built on the meta
device from the published configs) and against the readers that matter: ComfyUI's key maps
(transcribed in tests/helpers/comfyui.py) and diffusers' kohya-FLUX converter at full width.

The numbers are those of the issue-27 plan: FLUX.1-dev's 12 diffusers-script target names are 342
Linears that fuse into 190 kohya modules; SD3.5 Large's 8 attention names 303 -> 151; SD3.5
Medium's 243 -> 121, with the MMDiT-X ``attn2`` of its first 13 blocks (52 Linears).
"""

from __future__ import annotations

import pytest
import torch

from sdtune.families import flux_keys, sd35_keys
from sdtune.lora.keys import kohya_stem, peft_to_diffusers, peft_to_kohya
from tests.helpers.comfyui import flux_key_map, load_like_comfyui, mmdit_key_map
from tests.helpers.flow_families import FLUX_DEV, SD35_LARGE, SD35_MEDIUM, keys_family

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_TARGETS = (*ATTENTION, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# (model, transformer class, config, key table, default targets, ComfyUI map, Linears, kohya modules)
CASES = {
    "flux-dev": ("FluxTransformer2DModel", FLUX_DEV, flux_keys, FLUX_TARGETS, flux_key_map, 342, 190),
    "sd35-large": ("SD3Transformer2DModel", SD35_LARGE, sd35_keys, ATTENTION, mmdit_key_map, 303, 151),
    "sd35-medium": ("SD3Transformer2DModel", SD35_MEDIUM, sd35_keys, ATTENTION, mmdit_key_map, 243, 121),
}


@pytest.fixture(scope="module", params=list(CASES))
def full_size(request):
    import diffusers

    cls, config, keys, targets, key_map, linears, fused = CASES[request.param]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for m in layers.values():  # SD3's patch embedding is a conv: name its widths as a Linear's
        if isinstance(m, torch.nn.Conv2d):
            m.out_features, m.in_features = m.out_channels, m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    chosen = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    rank = 2
    tensors = {}  # a rank-2 LoRA on every targeted layer, as meta tensors: shapes only
    for n in chosen:
        tensors[f"{n}.lora_A.weight"] = torch.empty(rank, layers[n].in_features, device="meta")
        tensors[f"{n}.lora_B.weight"] = torch.empty(layers[n].out_features, rank, device="meta")
    return request.param, model, layers, chosen, tensors, keys, key_map(model.config), linears, fused


def test_the_table_names_every_layer_of_the_real_transformer_once(full_size):
    name, model, layers, chosen, _, keys, _, linears, fused = full_size
    table = keys.kohya_modules(model.config)
    assert set(table) == set(layers)  # every Linear (and SD3's patch conv) of the model, and nothing else
    for module in table.values():  # each fused module stacks real layers whose widths are its dims
        assert [layers[p].out_features for p in module.parts] == list(module.dims or [layers[module.parts[0]].out_features])
    assert len(chosen) == linears and len({kohya_stem(table[n]) for n in chosen}) == fused
    if name == "sd35-medium":
        assert sum(".attn2." in n for n in chosen) == 52


def test_comfyui_loads_every_key_of_both_layouts_at_full_size(full_size):
    """Our kohya file (fused, swapped) and our diffusers file each load completely under ComfyUI's
    key map, and every patch has the shape of the original weight (or its slice) it lands on."""
    name, model, layers, chosen, tensors, keys, key_map, _, fused = full_size
    kohya = peft_to_kohya(tensors, 2.0, keys_family(keys), model.config)
    assert len([k for k in kohya if k.endswith(".alpha")]) == fused
    deltas, not_loaded = load_like_comfyui(kohya, key_map)
    assert not_loaded == [] and len(deltas) == fused
    table = keys.kohya_modules(model.config)
    for module in {table[n] for n in chosen}:
        assert deltas[module.name].shape == (sum(layers[p].out_features for p in module.parts), layers[module.parts[0]].in_features)
    diffusers = peft_to_diffusers(tensors, "transformer.")
    deltas, not_loaded = load_like_comfyui(diffusers, key_map)
    assert not_loaded == [] and len(deltas) == len(chosen)
    for n in chosen:  # q/k/v patch their rows of the fused weight
        original, offset, _ = key_map[f"transformer.{n}"]
        rows = deltas[original if offset is None else (original, offset)].shape[0]
        assert rows == layers[n].out_features and (offset is None or offset[2] == rows)


def test_diffusers_reads_our_kohya_flux_file_at_full_width():
    """diffusers' kohya-FLUX converter (FluxPipeline.lora_state_dict) hard-codes FLUX.1's 3072 width:
    our writer's fused double-block qkv and single-block linear1 (proj_mlp untrained: a zero part)
    come back as the deltas we trained, rank 1 per part. (Its final-layer branch drops the alpha
    tensors, "TODO: alphas", so a norm_out.linear LoRA with alpha != rank loads at scale 1 there.)"""
    from diffusers import FluxPipeline

    torch.manual_seed(0)
    hidden, rank, alpha = 3072, 1, 0.5
    modules = {**{f"transformer_blocks.0.attn.{m}": hidden for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                                     "add_v_proj", "to_out.0")},
               **{f"single_transformer_blocks.0.attn.{m}": hidden for m in ("to_q", "to_k", "to_v")}}
    tensors = {}
    for m, out in modules.items():
        tensors[f"{m}.lora_A.weight"] = torch.randn(rank, hidden)
        tensors[f"{m}.lora_B.weight"] = torch.randn(out, rank)
    kohya = peft_to_kohya(tensors, alpha, keys_family(flux_keys), None)  # None: FLUX.1-dev's layout
    assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * alpha
    state = FluxPipeline.lora_state_dict(dict(kohya))
    state = state[0] if isinstance(state, tuple) else state
    for m in modules:
        a, b = state[f"transformer.{m}.lora_A.weight"], state[f"transformer.{m}.lora_B.weight"]
        assert a.shape[0] == rank  # the exact per-part path, not the whole fused rank
        expected = alpha / rank * tensors[f"{m}.lora_B.weight"] @ tensors[f"{m}.lora_A.weight"]
        torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-5)


def test_header_strings_are_kohyas():
    """kohya sd-scripts' ss_base_model_version and sai_model_spec architecture for each base."""
    from tests.helpers.flow_families import TINY_SD3

    assert (flux_keys.base_model_version(FLUX_DEV), flux_keys.architecture(FLUX_DEV)) == ("flux1", "flux-1-dev/lora")
    assert flux_keys.architecture({**FLUX_DEV, "guidance_embeds": False}) == "flux-1-schnell/lora"
    assert sd35_keys.architecture(SD35_LARGE) == "stable-diffusion-3-3-5-large/lora"
    assert [sd35_keys.base_model_version(c) for c in (SD35_LARGE, SD35_MEDIUM, TINY_SD3, None)] == [
        "3-5-large", "3-5-medium", "3-5-medium", "sd3"]
