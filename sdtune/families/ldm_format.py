"""diffusers weights -> the original single-file layout (LDM for SD1.x, SGM for SDXL).

A1111, ComfyUI and most model sites exchange SD1.5 and SDXL as one ``.safetensors`` file in the
layout of the original training code. diffusers reads that layout (``from_single_file``) but does
not write it, so merged models are saved with these tables. The rules are written for any block
count and ``layers_per_block``, which is what lets the tiny test models round-trip through
diffusers' own reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sdtune.families import ModelFamily

Tensors = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# (diffusers name, original name), applied as prefix/suffix substitutions.
UNET_TOP = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
]
UNET_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]
VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
OPENCLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def unet_block_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(diffusers prefix, original prefix, inner rules) for every resnet/attention/resampler."""
    n = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    up_types = config["up_block_types"]
    out = []
    for i in range(blocks):
        for j in range(n):
            idx = (n + 1) * i + j + 1
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", UNET_RESNET))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", []))
        if i < blocks - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n + 1) * (i + 1)}.0.op.", []))
        for j in range(n + 1):
            idx = (n + 1) * i + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", UNET_RESNET))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", []))
        if i < blocks - 1:
            slot = 2 if "CrossAttn" in up_types[i] else 1
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(n + 1) * i + n}.{slot}.", []))
    out.append(("mid_block.attentions.0.", "middle_block.1.", []))
    for j in range(2):
        out.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", UNET_RESNET))
    return out


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    blocks = unet_block_prefixes(config)
    out: Tensors = {}
    for name, value in state.items():
        new = _rename(name, UNET_TOP)
        if new == name:
            for src, dst, inner in blocks:
                if name.startswith(src):
                    new = dst + _rename(name[len(src):], inner)
                    break
            else:
                raise KeyError(f"no single-file name rule for UNet tensor {name!r}")
        out[UNET_PREFIX + new] = value
    return out


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    n, blocks = config["layers_per_block"], len(config["block_out_channels"])
    rules: list[tuple[str, str]] = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for i in range(blocks):
        for j in range(n):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(n + 1):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}."))
        if i < blocks - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        for j in range(2):
            rules.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
        rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    out: Tensors = {}
    for name, value in state.items():
        new = _rename(name, rules)
        if ".mid.attn_1." in new:
            head, tail = new.split(".mid.attn_1.", 1)
            new = f"{head}.mid.attn_1.{_rename(tail, VAE_ATTENTION)}"
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value[:, :, None, None]  # linear -> 1x1 conv
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[VAE_PREFIX + new] = value
    return out


def _hf_clip_names(state: Mapping[str, torch.Tensor]) -> Tensors:
    """transformers 5 dropped ``text_model.`` from CLIPTextModel's names (not from the projection
    model's); the original layout has it, so put it back where missing."""
    out = {}
    for name, value in state.items():
        if name.endswith("position_ids"):
            continue
        if not name.startswith(("text_model.", "text_projection.")):
            name = "text_model." + name
        out[name] = value
    return out


def openclip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """HF CLIPTextModelWithProjection -> OpenCLIP names, with q/k/v fused into ``in_proj``."""
    state = _hf_clip_names(state)
    out: Tensors = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif name == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif name == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif name.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + name.rsplit(".", 1)[1]] = value
        elif name.startswith("text_model.encoder.layers."):
            layer, rest = name[len("text_model.encoder.layers."):].split(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                which, kind = rest[len("self_attn."):].split(".", 1)
                fused.setdefault(f"{base}attn.in_proj_{kind}", {})[which[0]] = value
            else:
                out[base + _rename(rest, OPENCLIP_LAYER)] = value
        else:
            raise KeyError(f"no single-file name rule for text-encoder tensor {name!r}")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def pipeline_to_original(family: ModelFamily, unet, vae, text_encoders) -> Tensors:
    """One single-file state dict for a pipeline's modules, text encoders named as
    ``family.single_file_text_encoders`` says (SD1.5: one CLIP; SDXL: CLIP and OpenCLIP)."""
    layout = family.single_file_text_encoders
    if not layout:
        raise ValueError(f"{family.name} models have no single-file layout (they are published as diffusers folders only)")
    out = unet_to_original(unet.state_dict(), unet.config)
    out.update(vae_to_original(vae.state_dict(), vae.config))
    for (prefix, naming), encoder in zip(layout, text_encoders, strict=True):
        if naming == "openclip":
            out.update(openclip_to_original(encoder.state_dict(), prefix))
        else:
            out.update({prefix + k: v for k, v in _hf_clip_names(encoder.state_dict()).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
