"""Name tables: diffusers <-> peft <-> kohya round trips, and what diffusers itself loads from them."""

from __future__ import annotations

import diffusers
import pytest
import torch

from sdtune.families import get_family
from sdtune.lora.apply import apply_lora
from sdtune.lora.files import LoraHeader, read_lora, save_lora
from sdtune.lora.keys import detect_format, kohya_module_name, kohya_to_peft, peft_to_kohya
from sdtune.lora.layers import LoraSpec, inject, lora_tensors, trainable_lora_parameters
from sdtune.utils.errors import LoraFileError
from tests.helpers.models import tiny_model, unet_inputs

PIPELINE = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline, "kolors": diffusers.KolorsPipeline}
SPEC = LoraSpec(rank=4, alpha=2.5, targets=("to_q", "to_k", "to_v", "to_out.0"))  # alpha != rank on purpose


def _trained_like(family: str):
    """A UNet with non-trivial LoRA weights, as training would leave it."""
    parts = get_family(family).load(str(tiny_model(family)))
    inject(parts.unet, SPEC)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.unet):
            p.normal_(std=0.2)
    holder = torch.nn.Module()
    holder.unet = parts.unet
    return parts, lora_tensors(holder.state_dict())


def test_kohya_names_follow_each_tool_family():
    assert kohya_module_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd15") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    # SDXL's standard layout: down block 1 attention 0 is input block 4, slot 1
    assert kohya_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_module_name("mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0", "sdxl") == \
        "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_out_0"
    # Kolors: diffusers paths, the form both KolorsPipeline and ComfyUI read
    assert kohya_module_name("mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0", "kolors") == \
        "lora_unet_mid_block_attentions_0_transformer_blocks_3_attn2_to_out_0"
    assert kohya_module_name("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k", "sdxl") == \
        "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_k"


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kolors"])
def test_peft_kohya_peft_is_the_identity(family):
    parts, tensors = _trained_like(family)
    kohya = peft_to_kohya(tensors, SPEC.alpha, family, parts.unet.config)
    assert all(k.startswith("lora_unet_") for k in kohya)
    alphas = {k: float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert len(alphas) == len(tensors) // 2 and set(alphas.values()) == {2.5}
    if family == "sdxl":
        assert any("input_blocks" in k for k in kohya) and not any("down_blocks" in k for k in kohya)
    back, back_alphas = kohya_to_peft(kohya, [n for n, _ in parts.unet.named_modules()], family, parts.unet.config)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert set(back_alphas.values()) == {2.5}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kolors"])
def test_diffusers_loads_our_kohya_file_like_our_diffusers_file(family, tmp_path):
    parts, tensors = _trained_like(family)
    meta = LoraHeader(SPEC, family=family, base_model="tiny", base_model_version="x", resolution=64)
    files = {fmt: save_lora(tmp_path / f"{fmt}.safetensors", tensors, meta, format=fmt, denoiser_config=parts.unet.config)
             for fmt in ("diffusers", "kohya")}
    assert read_lora(files["kohya"]).format == "kohya" and read_lora(files["kohya"]).spec.alpha == 2.5
    x, t, kw = unet_inputs(family)
    outputs = {}
    for fmt, path in files.items():
        pipe = PIPELINE[family].from_pretrained(tiny_model(family))
        pipe.load_lora_weights(str(path))  # kohya goes through diffusers' non-diffusers conversion path
        with torch.no_grad():
            outputs[fmt] = pipe.unet(x, t, **kw).sample
    with torch.no_grad():
        ours = parts.unet.eval()(x, t, **kw).sample
    torch.testing.assert_close(outputs["diffusers"], ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs["kohya"], outputs["diffusers"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kolors"])
def test_comfyui_key_rules_load_every_key_of_our_kohya_file(family, tmp_path):
    """Every key of our kohya file is consumed under ComfyUI's rules (tests/helpers/comfyui.py), each
    patch is alpha/rank * up @ down of the trained layer, and nothing of the diffusers layout loads."""
    from safetensors.torch import load_file

    from tests.helpers.comfyui import load_like_comfyui, unet_key_map

    parts, tensors = _trained_like(family)
    meta = LoraHeader(SPEC, family=family, base_model="tiny", base_model_version="x", resolution=64)
    key_map = unet_key_map(parts.unet)
    kohya = load_file(str(save_lora(tmp_path / "k.safetensors", tensors, meta, format="kohya", denoiser_config=parts.unet.config)))
    deltas, not_loaded = load_like_comfyui(kohya, key_map)
    assert not not_loaded
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert deltas.keys() == modules
    for m in modules:
        expected = SPEC.alpha / SPEC.rank * tensors[f"{m}.lora_B.weight"].flatten(1) @ tensors[f"{m}.lora_A.weight"].flatten(1)
        torch.testing.assert_close(deltas[m], expected)
    diffusers = load_file(str(save_lora(tmp_path / "d.safetensors", tensors, meta, format="diffusers")))
    assert load_like_comfyui(diffusers, key_map)[1] == sorted(diffusers)  # ComfyUI: every key "not loaded"


def test_our_apply_reads_kohya_files_too(tmp_path):
    parts, tensors = _trained_like("sdxl")
    meta = LoraHeader(SPEC, family="sdxl", base_model="tiny", base_model_version="x", resolution=64)
    path = save_lora(tmp_path / "k.safetensors", tensors, meta, format="kohya", denoiser_config=parts.unet.config)
    fresh = get_family("sdxl").load(str(tiny_model("sdxl")))
    apply_lora(fresh, read_lora(path), family="sdxl", path=path, adapter_name="k")
    x, t, kw = unet_inputs("sdxl")
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t, **kw).sample, parts.unet.eval()(x, t, **kw).sample, rtol=0, atol=1e-5)


def test_headerless_kohya_sdxl_file_resolves_against_the_target_family(tmp_path):
    """kohya sd-scripts / model-site files carry no sdtune header: names resolve for the base they load into."""
    from safetensors.torch import save_file

    parts, tensors = _trained_like("sdxl")
    path = tmp_path / "civitai_style.safetensors"
    save_file(peft_to_kohya(tensors, SPEC.alpha, "sdxl", parts.unet.config), str(path))
    lora = read_lora(path)
    assert lora.family is None and lora.spec.alpha == 2.5
    fresh = get_family("sdxl").load(str(tiny_model("sdxl")))
    apply_lora(fresh, lora, family="sdxl", path=path, adapter_name="k")
    x, t, kw = unet_inputs("sdxl")
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t, **kw).sample, parts.unet.eval()(x, t, **kw).sample, rtol=0, atol=1e-5)


def test_unknown_layouts_are_named():
    with pytest.raises(LoraFileError, match=r"unrecognised LoRA layout .*'transformer.h.0.attn.lora_A'"):
        detect_format(["transformer.h.0.attn.lora_A"])
    assert detect_format(["unet.a.lora.down.weight"]) == "diffusers"
    assert detect_format(["lora_unet_a.lora_down.weight", "lora_te1_b.alpha"]) == "kohya"
