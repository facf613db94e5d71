"""LoRA files of the flow transformers on tiny real models: the kohya layout fuses and swaps
exactly and reads back to the trained tensors; ComfyUI applies both our layouts as trained;
the diffusers layout holds alpha in lora_B (no alpha tensors) and diffusers' SD3 loader applies
it as trained; sdtune's own apply reads both; what cannot be fused is refused with the fix.

The families are stand-ins (tests/helpers/flow_families.py) whose only fact is the real key table,
so these tests need neither the FLUX nor the SD3.5 family module.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.families import FAMILIES, ModelParts, flux_keys, register_family, sd35_keys
from sdtune.lora.apply import apply_lora
from sdtune.lora.files import LoraHeader, read_lora, save_lora
from sdtune.lora.keys import kohya_to_peft, peft_to_kohya
from sdtune.lora.layers import LoraSpec
from sdtune.utils.errors import LoraFileError
from tests.helpers.comfyui import flux_key_map, load_like_comfyui, mmdit_key_map
from tests.helpers.flow_families import TINY_FLUX, TINY_SD3, keys_family

RANK, ALPHA = 4, 2.5  # alpha != rank: a scale applied twice or not at all shows
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# FLUX: the single blocks' q/k/v but not proj_mlp (an untrained part of linear1), and the swapped final modulation
FLUX_TARGETS = (*ATTENTION, "ff.net.0.proj", "ff.net.2", "norm_out.linear")
# SD3: attn2 of the dual-attention block, and the last block's swapped norm1_context
SD3_TARGETS = (*ATTENTION, "norm_out.linear", "norm1_context.linear")
CASES = {"flux": ("FluxTransformer2DModel", TINY_FLUX, flux_keys, FLUX_TARGETS, flux_key_map, ("clip", "t5")),
         "sd3": ("SD3Transformer2DModel", TINY_SD3, sd35_keys, SD3_TARGETS, mmdit_key_map, ("clip", "clip", "t5"))}


def _model(name: str):
    import diffusers

    cls, config = CASES[name][:2]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**config).eval()


@pytest.fixture(params=list(CASES))
def flow(request):
    """(case, family registered under a test name, model, trained peft tensors)."""
    name = request.param
    _, _, keys, targets, _, kinds = CASES[name]
    family = keys_family(keys, name=f"{name}_keys_test", text_encoder_kinds=kinds)
    register_family(type(family))
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets):
            tensors[f"{n}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * 0.1
            tensors[f"{n}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.1
    try:
        yield name, family, model, tensors
    finally:
        FAMILIES.pop(family.name)


def _header(family, targets) -> LoraHeader:
    return LoraHeader(LoraSpec(RANK, ALPHA, targets), family.name, base_model="tiny", base_model_version="test")


def test_kohya_fuses_and_swaps_exactly_and_reads_back_the_trained_tensors(flow):
    name, family, model, tensors = flow
    kohya = peft_to_kohya(tensors, ALPHA, family, model.config)
    if name == "flux":
        hidden = 32
        qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
        assert kohya[f"{qkv}.lora_down.weight"].shape == (3 * RANK, hidden) and float(kohya[f"{qkv}.alpha"]) == 3 * ALPHA
        assert kohya[f"{linear1}.lora_up.weight"].shape == (7 * hidden, 4 * RANK)  # q, k, v + the zero proj_mlp part
        assert not kohya[f"{linear1}.lora_up.weight"][3 * hidden:].any()
        final = tensors["norm_out.linear.lora_B.weight"]
        assert torch.equal(kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], torch.cat(final.chunk(2)[::-1]))
    else:
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in kohya
        last = tensors["transformer_blocks.1.norm1_context.linear.lora_B.weight"]  # context_pre_only: swapped
        assert torch.equal(kohya["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"],
                           torch.cat(last.chunk(2)[::-1]))
        assert torch.equal(kohya["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"],
                           tensors["transformer_blocks.0.norm1_context.linear.lora_B.weight"])
    names = [n for n, _ in model.named_modules()]
    back, alphas = kohya_to_peft(kohya, names, family, model.config, CASES[name][3])
    assert back.keys() == tensors.keys()  # untrained parts (FLUX's proj_mlp) dropped: not in the targets
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert set(alphas) == {k.rsplit(".lora_", 1)[0] for k in tensors} and set(alphas.values()) == {ALPHA}
    # a targeted part that is still zero (a file saved at step 0) is kept
    zero = dict(tensors, **{"transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros_like(
        tensors["transformer_blocks.0.attn.to_k.lora_B.weight"])})
    back, _ = kohya_to_peft(peft_to_kohya(zero, ALPHA, family, model.config), names, family, model.config, CASES[name][3])
    assert not back["transformer_blocks.0.attn.to_k.lora_B.weight"].any() and back.keys() == tensors.keys()


def test_comfyui_applies_both_our_layouts_as_trained(flow, tmp_path):
    """Per original weight: ComfyUI's patch from our kohya file (fused, swapped) equals its patch
    assembled from our diffusers file (its own diffusers map: slices and swap functions) and the
    trained deltas alpha/rank * B @ A stacked in the original's row order."""
    name, family, model, tensors = flow
    header = _header(family, CASES[name][3])
    files = {fmt: load_file(str(save_lora(tmp_path / f"{fmt}.safetensors", tensors, header, format=fmt,
                                          denoiser_config=model.config))) for fmt in ("kohya", "diffusers")}
    key_map = CASES[name][4](model.config)
    kohya, not_loaded = load_like_comfyui(files["kohya"], key_map)
    assert not_loaded == []
    assert not any(k.endswith(".alpha") for k in files["diffusers"])  # alpha is in lora_B
    via_diffusers, not_loaded = load_like_comfyui(files["diffusers"], key_map)
    assert not_loaded == [] and len(via_diffusers) == len(tensors) // 2
    for module in {k.rsplit(".lora_", 1)[0] for k in tensors}:
        original, offset, function = key_map[f"transformer.{module}"]
        trained = ALPHA / RANK * tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
        expected = function(trained) if function else trained
        got = via_diffusers[original if offset is None else (original, offset)]
        torch.testing.assert_close(got, expected)
        rows = slice(None) if offset is None else slice(offset[1], offset[1] + offset[2])
        torch.testing.assert_close(kohya[original][rows], expected)


def test_read_lora_gives_the_trained_spec_and_tensors_of_both_layouts(flow, tmp_path):
    name, family, model, tensors = flow
    header = _header(family, CASES[name][3])
    kohya = read_lora(save_lora(tmp_path / "k.safetensors", tensors, header, format="kohya", denoiser_config=model.config))
    assert (kohya.format, kohya.spec.rank, kohya.spec.alpha) == ("kohya", RANK, ALPHA)  # per part, after un-fusing
    path = save_lora(tmp_path / "d.safetensors", tensors, header, format="diffusers")
    lora = read_lora(path)
    adapter = json.loads(lora.metadata["lora_adapter_metadata"])
    assert (adapter["transformer.r"], adapter["transformer.lora_alpha"]) == (RANK, RANK)  # what diffusers applies
    assert (lora.metadata["sdtune.alpha"], lora.metadata["sdtune.alpha_in_tensors"]) == (repr(ALPHA), "true")
    assert (lora.spec.rank, lora.spec.alpha) == (RANK, ALPHA) and all(k.startswith("transformer.") for k in lora.raw)
    back = lora.tensors
    assert back.keys() == tensors.keys() and all(torch.allclose(back[k], tensors[k], rtol=1e-6, atol=0) for k in tensors)
    # a header that says the tensors hold alpha but gives diffusers another lora_alpha contradicts itself
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={
        **meta, "lora_adapter_metadata": json.dumps({**adapter, "transformer.lora_alpha": ALPHA})})
    with pytest.raises(LoraFileError, match=r"'sdtune.alpha_in_tensors' says its tensors hold alpha/rank"):
        read_lora(tmp_path / "bad.safetensors")


def _forward(name: str, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if name == "flux":
        return model(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                     pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                     img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]
    return model(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                 pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([500.0]), return_dict=False)[0]


def _trained(name: str, tensors):
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    model = _model(name)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules))
    set_peft_model_state_dict(model, tensors)
    return model


def test_sdtune_applies_both_layouts_and_diffusers_the_sd3_default(flow, tmp_path):
    name, family, _, tensors = flow
    header = _header(family, CASES[name][3])
    with torch.no_grad():
        expected = _forward(name, _trained(name, tensors))
        assert (expected - _forward(name, _model(name))).abs().max() > 1e-3  # the LoRA changes the output
        for fmt in ("kohya", "diffusers"):
            path = save_lora(tmp_path / f"{fmt}.safetensors", tensors, header, format=fmt, denoiser_config=CASES[name][1])
            parts = ModelParts(denoiser=_model(name), vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None, source="t")
            assert apply_lora(parts, read_lora(path), family=family, path=path, adapter_name="a") == ["denoiser"]
            torch.testing.assert_close(_forward(name, parts.denoiser), expected, rtol=0, atol=1e-5)
        if name == "sd3":  # SD3.5's default layout, through diffusers' own SD3 loader
            from diffusers import StableDiffusion3Pipeline

            state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "diffusers.safetensors"),
                                                                      return_lora_metadata=True)
            model = _model(name)
            model.load_lora_adapter(state, prefix="transformer", metadata=metadata)
            torch.testing.assert_close(_forward(name, model), expected, rtol=0, atol=1e-5)


def test_foreign_fused_files_split_as_diffusers_does_and_variants_are_refused():
    """A qkv trained as one Linear (kohya without split_qkv): every part keeps the whole down and its
    rows of the up, at the file's alpha, so the parts stack to exactly the file's delta."""
    model = _model("flux")
    family = keys_family(flux_keys)
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 32, generator=g), torch.randn(96, 4, generator=g)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    raw = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
    back, alphas = kohya_to_peft(raw, [n for n, _ in model.named_modules()], family, model.config)
    parts = [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    assert set(alphas) == set(parts) and set(alphas.values()) == {2.0}
    stacked = torch.cat([back[f"{p}.lora_B.weight"] @ back[f"{p}.lora_A.weight"] for p in parts])
    torch.testing.assert_close(stacked, up @ down)
    dora = {"transformer_blocks.0.attn.to_q.lora_A.weight": down, "transformer_blocks.0.attn.to_q.lora_B.weight": up[:32],
            "transformer_blocks.0.attn.to_q.dora_scale": torch.ones(1, 32)}
    with pytest.raises(LoraFileError, match=r"fuses .*img_attn.qkv.*Fix: write the diffusers layout"):
        peft_to_kohya(dora, 4.0, family, model.config)


def test_run_header_takes_version_and_architecture_from_the_family():
    from sdtune.lora.files import run_header

    family = keys_family(flux_keys, name="flux_header_test", text_encoder_kinds=("clip", "t5"),
                         lora_base_model_version=lambda self, c=None: flux_keys.base_model_version(c),
                         lora_architecture=lambda self, c=None: flux_keys.architecture(c))
    register_family(type(family))
    try:
        cfg = {"model": {"family": family.name, "path": "base"}, "data": {"resolution": 64}, "lora": {"rank": RANK}}
        meta = run_header(cfg, LoraSpec(RANK, ALPHA, ATTENTION), steps=1, num_train_images=1, output_name="x",
                          denoiser_config=TINY_FLUX).metadata("kohya")
        assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("flux1", "flux-1-dev/lora")
    finally:
        FAMILIES.pop(family.name)
    cfg = {"model": {"family": "sd15", "path": "base"}, "data": {"resolution": 64}, "lora": {"rank": RANK}}
    meta = run_header(cfg, LoraSpec(RANK, ALPHA, ATTENTION), steps=1, num_train_images=1, output_name="x").metadata("kohya")
    assert meta["ss_base_model_version"] == "sd_v1" and "modelspec.architecture" not in meta  # UNet headers unchanged
