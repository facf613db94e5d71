"""FLUX.1's kohya key table: diffusers ``FluxTransformer2DModel`` modules -> BFL's original names.

kohya sd-scripts (``networks/lora_flux.py``), ComfyUI (the generic ``lora_unet_`` rule on its BFL
state dict, and ``comfy/utils.py flux_to_diffusers``) and Forge name FLUX LoRA layers after BFL's
``flux`` module paths: ``lora_unet_double_blocks_{i}_img_attn_qkv`` and so on. BFL fuses q, k and
v into one ``qkv`` Linear per stream of a double block, and q, k, v and the MLP input into one
``linear1`` of a single block, so those diffusers modules are parts of one kohya module
(the fusing maths is generic, :mod:`sdtune.lora.keys`). ``final_layer.adaLN_modulation.1``
stores (shift, scale) where diffusers' ``norm_out.linear`` has (scale, shift): its halves swap.

The table is built from the transformer's config (block counts, width) so that it fits any
FLUX-layout model, the tiny test ones included; None gives FLUX.1-dev's published layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdtune.families.kohya import KohyaModule, TableBuilder

#: FLUX.1-dev's transformer config (the fields the table reads); schnell differs only in
#: ``guidance_embeds=False``.
STANDARD_CONFIG = {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "attention_head_dim": 128,
                   "guidance_embeds": True}
#: diffusers' ``FluxSingleTransformerBlock`` MLP width is 4 x the model width (``mlp_ratio=4.0``).
MLP_RATIO = 4


def kohya_modules(config: Mapping[str, Any] | None = None) -> dict[str, KohyaModule]:
    """diffusers module path -> its BFL kohya module, for every Linear a LoRA may target."""
    config = STANDARD_CONFIG if config is None else config
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = MLP_RATIO * hidden
    qkv = (hidden, hidden, hidden)
    t = TableBuilder()
    for i in range(int(config["num_layers"])):
        t.block(f"transformer_blocks.{i}", f"double_blocks.{i}", [
            ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), qkv),
            ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), qkv),
            ("img_attn.proj", "attn.to_out.0", ()),
            ("txt_attn.proj", "attn.to_add_out", ()),
            ("img_mlp.0", "ff.net.0.proj", ()),
            ("img_mlp.2", "ff.net.2", ()),
            ("txt_mlp.0", "ff_context.net.0.proj", ()),
            ("txt_mlp.2", "ff_context.net.2", ()),
            ("img_mod.lin", "norm1.linear", ()),
            ("txt_mod.lin", "norm1_context.linear", ()),
        ])
    for i in range(int(config["num_single_layers"])):
        t.block(f"single_transformer_blocks.{i}", f"single_blocks.{i}", [
            ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (*qkv, mlp)),
            ("linear2", "proj_out", ()),
            ("modulation.lin", "norm.linear", ()),
        ])
    t.add("img_in", "x_embedder")
    t.add("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config.get("guidance_embeds", True):
        embedders.append(("guidance_in", "guidance_embedder"))
    for bfl, ours in embedders:
        t.add(f"{bfl}.in_layer", f"time_text_embed.{ours}.linear_1")
        t.add(f"{bfl}.out_layer", f"time_text_embed.{ours}.linear_2")
    t.add("final_layer.linear", "proj_out")
    t.add("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return t.table


# -- header facts (kohya sd-scripts: flux_utils.MODEL_VERSION_FLUX_V1, library/sai_model_spec.py) ----------
def base_model_version(config: Mapping[str, Any] | None = None) -> str:
    """``ss_base_model_version``: kohya writes ``flux1`` for every FLUX.1."""
    return "flux1"


def architecture(config: Mapping[str, Any] | None = None) -> str:
    """``modelspec.architecture`` as kohya writes it for a LoRA: dev (a guidance embedding), schnell
    (none), ``flux-1`` when the base's config is not at hand."""
    if config is None:
        return "flux-1/lora"
    return f"flux-1-{'dev' if config.get('guidance_embeds', True) else 'schnell'}/lora"
