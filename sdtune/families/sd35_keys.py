"""SD3/SD3.5's kohya key table: diffusers ``SD3Transformer2DModel`` modules -> SAI's MMDiT names.

kohya sd-scripts (``networks/lora_sd3.py``), ComfyUI (the generic ``lora_unet_`` rule on its MMDiT
state dict, and ``comfy/utils.py mmdit_to_diffusers``) and Forge name SD3 LoRA layers after SAI's
MMDiT paths: ``lora_unet_joint_blocks_{i}_x_block_attn_qkv`` and so on. MMDiT fuses q, k and v into
one ``qkv`` Linear per stream (and per MMDiT-X second attention, ``attn2``), so those diffusers
modules are parts of one kohya module (the maths is generic, :mod:`sdtune.lora.keys`).
``final_layer.adaLN_modulation.1`` and the last block's ``context_block.adaLN_modulation.1``
(a ``context_pre_only`` block: diffusers' ``AdaLayerNormContinuous``) store (shift, scale) where
diffusers has (scale, shift): their halves swap. The last block has no ``to_add_out`` and no
``ff_context``.

The table is built from the transformer's config (depth, width, dual-attention layers) so that it
fits Large, Medium and the tiny test models; None gives SD3.5 Large's published layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdtune.families.kohya import KohyaModule, TableBuilder

#: SD3.5 Large's transformer config (the fields the table reads).
STANDARD_CONFIG = {"num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64, "dual_attention_layers": ()}


def kohya_modules(config: Mapping[str, Any] | None = None) -> dict[str, KohyaModule]:
    """diffusers module path -> its MMDiT kohya module, for every module a LoRA may target."""
    config = STANDARD_CONFIG if config is None else config
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    qkv = (hidden, hidden, hidden)
    layers = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    t = TableBuilder()
    for i in range(layers):
        src, dst, last = f"transformer_blocks.{i}", f"joint_blocks.{i}", i == layers - 1
        t.block(src, dst, [
            ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), qkv),
            ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), qkv),
            ("x_block.attn.proj", "attn.to_out.0", ()),
            ("x_block.mlp.fc1", "ff.net.0.proj", ()),
            ("x_block.mlp.fc2", "ff.net.2", ()),
            ("x_block.adaLN_modulation.1", "norm1.linear", ()),
        ])
        if i in dual:
            t.block(src, dst, [("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), qkv),
                               ("x_block.attn2.proj", "attn2.to_out.0", ())])
        if not last:
            t.block(src, dst, [("context_block.attn.proj", "attn.to_add_out", ()),
                               ("context_block.mlp.fc1", "ff_context.net.0.proj", ()),
                               ("context_block.mlp.fc2", "ff_context.net.2", ())])
        t.add(f"{dst}.context_block.adaLN_modulation.1", f"{src}.norm1_context.linear", swap=last)
    t.add("x_embedder.proj", "pos_embed.proj")
    t.add("context_embedder", "context_embedder")
    for mmdit, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        t.add(f"{mmdit}.mlp.0", f"time_text_embed.{ours}.linear_1")
        t.add(f"{mmdit}.mlp.2", f"time_text_embed.{ours}.linear_2")
    t.add("final_layer.linear", "proj_out")
    t.add("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return t.table


# -- header facts (kohya sd-scripts: sd3_utils.analyze_state_dict_state, library/sai_model_spec.py) --------
def base_model_version(config: Mapping[str, Any] | None = None) -> str:
    """``ss_base_model_version`` as kohya writes it: its model type, ``3-5-large`` (qk norm, no
    MMDiT-X), ``3-5-medium`` (MMDiT-X second attention) or ``3-medium`` (no qk norm); ``sd3`` when the
    base's config is not at hand."""
    if config is None:
        return "sd3"
    if not config.get("qk_norm"):
        return "3-medium"
    return "3-5-medium" if config.get("dual_attention_layers") else "3-5-large"


def architecture(config: Mapping[str, Any] | None = None) -> str:
    """``modelspec.architecture`` as kohya writes it for a LoRA: ``stable-diffusion-3-`` + the model
    type + ``/lora`` (so ``stable-diffusion-3-3-5-large/lora``); ``stable-diffusion-3/lora`` unknown."""
    return "stable-diffusion-3/lora" if config is None else f"stable-diffusion-3-{base_model_version(config)}/lora"
