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

from sdtune.families.ldm_format import UNET_PREFIX, unet_to_original

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


#: comfy/weight_adapter/lora.py ``LoRAAdapter.load``: the (up, down) suffixes it tries, in order.
LORA_SUFFIXES = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                 (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                 (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))


def load_like_comfyui(lora: dict[str, torch.Tensor], key_map: dict[str, object]) -> tuple[dict[object, torch.Tensor], list[str]]:
    """(target -> weight delta ComfyUI adds, keys it would report "lora key not loaded").

    A key-map value is a module (the UNet maps) or ``(module, offset, function)`` (the transformer
    maps): ComfyUI then patches ``weight.narrow(*offset)`` and adds ``function(delta)``; the result
    is keyed by ``module``, or ``(module, offset)`` for a slice."""
    deltas, loaded = {}, set()
    for stem, target in key_map.items():
        found = next(((f"{stem}{u}", f"{stem}{d}") for u, d in LORA_SUFFIXES if f"{stem}{u}" in lora), None)
        if found is None:
            continue
        up, down = found
        alpha = f"{stem}.alpha"
        rank = lora[down].shape[0]
        scale = (float(lora[alpha]) if alpha in lora else rank) / rank
        delta = scale * (lora[up].flatten(1).float() @ lora[down].flatten(1).float())
        if isinstance(target, tuple):
            module, offset, function = target
            deltas[module if offset is None else (module, offset)] = function(delta) if function else delta
        else:
            deltas[target] = delta
        loaded |= {up, down, alpha} & lora.keys()
    return deltas, sorted(lora.keys() - loaded)


# -- FLUX and SD3: comfy/utils.py flux_to_diffusers / mmdit_to_diffusers, comfy/lora.py model_lora_keys_unet --
# Transcribed from Comfy-Org/ComfyUI comfy/utils.py and comfy/lora.py (read at commits 09708ea / 17358c8).
# ComfyUI's map values are "diffusion_model.<original>.weight", ((that, (dim, start, length))) for a
# slice of a fused weight, or (that, None, swap_scale_shift); here the module path is kept instead.
def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_to_diffusers(config) -> dict[str, tuple]:
    """diffusers module -> (BFL module, offset, function): ``flux_to_diffusers`` for ``.weight`` keys,
    its unet_config (depth, depth_single_blocks, hidden_size) read off diffusers' transformer config."""
    depth, single, hidden = config["num_layers"], config["num_single_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    out = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, x in enumerate("qkv"):
            out[f"{src}.attn.to_{x}"] = (f"{dst}.img_attn.qkv", (0, hidden * j, hidden), None)
            out[f"{src}.attn.add_{x}_proj"] = (f"{dst}.txt_attn.qkv", (0, hidden * j, hidden), None)
        for ours, bfl in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                          ("attn.to_add_out", "txt_attn.proj"), ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                          ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            out[f"{src}.{ours}"] = (f"{dst}.{bfl}", None, None)
    for i in range(single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, x in enumerate("qkv"):
            out[f"{src}.attn.to_{x}"] = (f"{dst}.linear1", (0, hidden * j, hidden), None)
        out[f"{src}.proj_mlp"] = (f"{dst}.linear1", (0, hidden * 3, hidden * 4), None)
        out[f"{src}.norm.linear"] = (f"{dst}.modulation.lin", None, None)
        out[f"{src}.proj_out"] = (f"{dst}.linear2", None, None)
    for ours, bfl in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"), ("context_embedder", "txt_in"),
                      *((f"time_text_embed.{e}_embedder.linear_{n}", f"{b}_in.{layer}_layer")
                        for e, b in (("timestep", "time"), ("text", "vector"), ("guidance", "guidance"))
                        for n, layer in ((1, "in"), (2, "out")))):
        out[ours] = (bfl, None, None)
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, swap_scale_shift)
    return out


def mmdit_to_diffusers(config) -> dict[str, tuple]:
    """The same for SD3 (``mmdit_to_diffusers``): ComfyUI's depth is the width / 64 (it detects it from
    ``x_embedder.proj.weight``) and sets both the block count and the qkv offsets."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    depth, blocks = hidden // 64, config["num_layers"]
    offset = depth * 64
    out = {}
    for i in range(blocks):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, x in enumerate("qkv"):
            out[f"{src}.attn.to_{x}"] = (f"{dst}.x_block.attn.qkv", (0, offset * j, offset), None)
            out[f"{src}.attn.add_{x}_proj"] = (f"{dst}.context_block.attn.qkv", (0, offset * j, offset), None)
            out[f"{src}.attn2.to_{x}"] = (f"{dst}.x_block.attn2.qkv", (0, offset * j, offset), None)
        for ours, mmdit in (("norm1_context.linear", "context_block.adaLN_modulation.1"), ("attn.to_add_out", "context_block.attn.proj"),
                            ("ff_context.net.0.proj", "context_block.mlp.fc1"), ("ff_context.net.2", "context_block.mlp.fc2"),
                            ("norm1.linear", "x_block.adaLN_modulation.1"), ("attn.to_out.0", "x_block.attn.proj"),
                            ("attn2.to_out.0", "x_block.attn2.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2")):
            out[f"{src}.{ours}"] = (f"{dst}.{mmdit}", None, None)
    for ours, mmdit in (("context_embedder", "context_embedder"), ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                        ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"), ("pos_embed.proj", "x_embedder.proj"),
                        ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                        ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("proj_out", "final_layer.linear")):
        out[ours] = (mmdit, None, None)
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, swap_scale_shift)
    out[f"transformer_blocks.{depth - 1}.norm1_context.linear"] = (
        f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1", None, swap_scale_shift)
    return out


def _transformer_key_map(diffusers: dict[str, tuple], prefixes: tuple[str, ...], underscored: tuple[str, ...]) -> dict[str, tuple]:
    """``model_lora_keys_unet``: ``lora_unet_<original _>`` for every original weight (the generic
    rule on the state dict), then each diffusers name under ComfyUI's prefixes for that model."""
    key_map = {_stem(bfl): (bfl, None, None) for bfl, _, _ in diffusers.values()}
    for ours, target in diffusers.items():
        key_map.update({f"{p}{ours}": target for p in prefixes})
        key_map.update({f"{p}{ours.replace('.', '_')}": target for p in underscored})
    return key_map


def flux_key_map(config) -> dict[str, tuple]:
    """Every stem ComfyUI accepts for a FLUX model -> (BFL module, offset, function)."""
    return _transformer_key_map(flux_to_diffusers(config), ("transformer.", ""), ("lycoris_", "lora_transformer_"))


def mmdit_key_map(config) -> dict[str, tuple]:
    """Every stem ComfyUI accepts for an SD3 model -> (MMDiT module, offset, function)."""
    return _transformer_key_map(mmdit_to_diffusers(config), ("transformer.", "base_model.model."), ("lora_transformer_", "lycoris_"))


# -- text encoders: comfy/lora.py model_lora_keys_clip -------------------------------------------
#: ComfyUI's LORA_CLIP_MAP: the CLIP layers it patches, and their kohya spelling.
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
}


def clip_key_map(encoders) -> dict[str, tuple[int, str]]:
    """Every text-encoder stem ComfyUI accepts -> (encoder index, ``text_model.``-rooted layer path).

    ``model_lora_keys_clip``: for layer b and each LORA_CLIP_MAP entry, a lone CLIP-L (SD1.x) is
    ``lora_te_text_model_encoder_layers_{b}_{c}`` (and ``lora_te1_``) and the diffusers key
    ``text_encoder.text_model.encoder.layers.{b}.{c}``; SDXL's CLIP-L is ``lora_te1_``/``text_encoder.``
    and its CLIP-G ``lora_te2_``/``text_encoder_2.``. ComfyUI has no ChatGLM (Kolors) entry.
    """
    out = {}
    for index, encoder in enumerate(encoders):
        layers = getattr(encoder.config, "num_hidden_layers", 0)  # ChatGLM has num_layers: no entry
        for b in range(min(layers, 32)):
            for dotted, kohya in LORA_CLIP_MAP.items():
                target = (index, f"text_model.encoder.layers.{b}.{dotted}")
                if len(encoders) == 1:
                    names = [f"lora_te_text_model_encoder_layers_{b}_{kohya}", f"lora_te1_text_model_encoder_layers_{b}_{kohya}",
                             f"text_encoder.text_model.encoder.layers.{b}.{dotted}"]
                else:
                    names = [f"lora_te{index + 1}_text_model_encoder_layers_{b}_{kohya}",
                             f"{'text_encoder' if index == 0 else 'text_encoder_2'}.text_model.encoder.layers.{b}.{dotted}"]
                out.update(dict.fromkeys(names, target))
    return out


def load_clip_like_comfyui(lora: dict[str, torch.Tensor], key_map: dict[str, tuple[int, str]]):
    """((encoder index, layer) -> weight delta ComfyUI adds, text-encoder keys it would not load).

    ``load_lora`` reads ``x.lora_up.weight``/``x.lora_down.weight`` (kohya) and
    ``x.lora_linear_layer.up.weight``/``.down.weight`` (diffusers' "transformers_lora"), alpha from ``x.alpha``.
    """
    deltas, loaded = {}, set()
    for stem, target in key_map.items():
        for up, down in ((f"{stem}.lora_up.weight", f"{stem}.lora_down.weight"),
                         (f"{stem}.lora_linear_layer.up.weight", f"{stem}.lora_linear_layer.down.weight")):
            if up not in lora:
                continue
            alpha = f"{stem}.alpha"
            rank = lora[down].shape[0]
            scale = (float(lora[alpha]) if alpha in lora else rank) / rank
            deltas[target] = scale * (lora[up].float() @ lora[down].float())
            loaded |= {up, down, alpha} & lora.keys()
    te_keys = {k for k in lora if k.startswith(("lora_te", "text_encoder"))}
    return deltas, sorted(te_keys - loaded)
# -- DoRA, LoHa, LoKr: ComfyUI's weight adapters, re-implemented line by line ----------------------
# comfy/lora.py ``load_lora`` reads ``x.alpha`` and ``x.dora_scale`` for every stem, then asks each
# adapter of comfy/weight_adapter (LoRAAdapter: ``lora_up/lora_down``; LoHaAdapter: ``hada_w1_a``,
# ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` [+ ``hada_t1/t2``]; LoKrAdapter: ``lokr_w1`` or
# ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` [+ ``lokr_t2``]) to load it. Their
# ``calculate_weight`` at strength 1 is what :func:`merge_like_comfyui` computes.


def weight_decompose(dora_scale, weight, lora_diff, alpha):
    """comfy/weight_adapter/base.py ``weight_decompose`` at strength 1 (float32, identity function).

    Note ComfyUI's per-output branch divides by the norm of the *unpatched* weight."""
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / weight_norm)


def _comfy_diff(lora: dict[str, torch.Tensor], x: str, alpha, shape) -> tuple[torch.Tensor, float, set[str]] | None:
    """(lora_diff, alpha factor, keys used) of stem ``x`` as ComfyUI's adapters compute it, or None."""
    def get(name):
        return lora[f"{x}.{name}"].float() if f"{x}.{name}" in lora else None

    if get("lora_up.weight") is not None:  # LoRAAdapter
        up, down = get("lora_up.weight"), get("lora_down.weight")
        factor = alpha / down.shape[0] if alpha is not None else 1.0
        return torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(shape), factor, {
            f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
    if get("hada_w1_a") is not None:  # LoHaAdapter (no Tucker factors)
        w1a, w1b, w2a, w2b = (get(n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        factor = alpha / w1b.shape[0] if alpha is not None else 1.0
        return ((w1a @ w1b) * (w2a @ w2b)).reshape(shape), factor, {f"{x}.hada_w{i}_{s}" for i in (1, 2) for s in "ab"}
    names = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
    if any(get(n) is not None for n in names[:3] + names[4:5]):  # LoKrAdapter (no Tucker factor)
        w1, w2, w1_a, w1_b, w2_a, w2_b = (get(n) for n in names)
        dim = None
        if w1 is None:
            dim = w1_b.shape[0]
            w1 = torch.mm(w1_a, w1_b)
        if w2 is None:
            dim = w2_b.shape[0]
            w2 = torch.mm(w2_a, w2_b)
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        factor = alpha / dim if alpha is not None and dim is not None else 1.0
        return torch.kron(w1, w2).reshape(shape), factor, {f"{x}.{n}" for n in names if f"{x}.{n}" in lora}
    return None


def merge_like_comfyui(lora: dict[str, torch.Tensor], key_map: dict[str, str], base: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(diffusers module -> the weight ComfyUI patches it to, keys it would report "lora key not
    loaded") for a file of LoRA, DoRA (``dora_scale``), LoHa or LoKr layers; ``base`` maps each
    module to its unpatched weight."""
    merged, loaded = {}, set()
    for stem, module in key_map.items():
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else None
        found = _comfy_diff(lora, stem, alpha, base[module].shape) if module in base else None
        if found is None:
            continue
        diff, factor, used = found
        weight = base[module].float().clone()
        if f"{stem}.dora_scale" in lora:
            merged[module] = weight_decompose(lora[f"{stem}.dora_scale"].float(), weight, diff, factor)
            used.add(f"{stem}.dora_scale")
        else:
            merged[module] = weight + factor * diff
        loaded |= used | ({f"{stem}.alpha"} & lora.keys())
    return merged, sorted(lora.keys() - loaded)
