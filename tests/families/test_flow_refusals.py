"""What a flow-matching family (the tiny SD3.5 here) refuses up front, through the real config checks
before anything loads, each with its reason and fix; and the neighbouring settings that do work."""

from __future__ import annotations

import pytest

from sdtune.run.checks import check_against_base, validate
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg
from tests.helpers.models import tiny_model

SD35 = ("experiment=quickstart", "model=tiny_sd35")


@pytest.mark.parametrize(("overrides", "message"), [
    (["embedding=ti", "embedding.tokens=[olq]", "embedding.init=red"],
     r"embedding \(textual inversion\) is not supported for model.family=sd35: diffusers' SD3 pipelines have no "
     r"load_textual_inversion.*Fix: set embedding=null"),
    (["lora.use_dora=true", "callbacks.lora_export.format=kohya"],
     r"lora.use_dora=true with callbacks.lora_export.format=kohya: the kohya layout of model.family=sd35 fuses "
     r"\['transformer_blocks.0.attn.to_q', 'transformer_blocks.0.attn.to_k', 'transformer_blocks.0.attn.to_v'\] into "
     r"one weight \(joint_blocks.0.x_block.attn.qkv\), which lora.targets \['to_q', 'to_k', 'to_v', 'add_q_proj', "
     r"'add_k_proj', 'add_v_proj'\] reach.*Fix: callbacks.lora_export.format=diffusers"),
    (["lora.type=lokr"],  # the family's layout (diffusers) holds no LoKr, and its kohya layout cannot stack one
     r"lora.type=lokr: the kohya layout of model.family=sd35 fuses .*LoRA and DoRA only\). Fix: lora.type=lora \(or DoRA: "
     r"lora.use_dora=true callbacks.lora_export.format=diffusers\), or lora.targets=\[to_out.0,to_add_out\] \(modules "
     r"the kohya layout keeps apart\)"),
    (["lora.type=loha", "lora.targets=[norm1_context.linear]", "callbacks.lora_export.format=kohya"],
     r"lora.type=loha: the kohya layout of model.family=sd35 stores with its output halves swapped "
     r"\(joint_blocks.37.context_block.adaLN_modulation.1\)"),
    (["train.snr_gamma=5"], r"train.snr_gamma"),
])
def test_refused_before_loading_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(*SD35, *overrides))


@pytest.mark.parametrize("overrides", [
    ["lora.use_dora=true"],  # DoRA in the family's own layout (diffusers) is fine
    ["lora.use_dora=true", "callbacks.lora_export.format=diffusers"],
    ["lora.type=loha", "lora.targets=[to_out.0,to_add_out]", "callbacks.lora_export.format=kohya"],  # kept apart
    ["lora.text_encoder={rank: 4}"],
])
def test_what_the_flow_layouts_can_hold_passes(overrides):
    validate(compose_cfg(*SD35, *overrides))


def test_text_encoder_targets_only_t5_has_are_refused_with_the_reason():
    """``lora.text_encoder.targets`` naming T5's layers (q, k, v, o): T5 takes no LoRA, and the message says why."""
    cfg = compose_cfg(*SD35, "lora.text_encoder={rank: 4, targets: [q, v]}")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"lora.text_encoder.targets: \['q', 'v'\] match no linear layer of the sd35 "
                                          r"text encoder 1 \(CLIPTextModelWithProjection\). They name layers of text "
                                          r"encoder 3 \(T5EncoderModel\), which this family does not adapt: T5 takes no "
                                          r"LoRA layers: diffusers' FLUX and SD3 LoRA loaders read none for it.*Fix: use "
                                          r"names such as \['q_proj', 'k_proj', 'v_proj', 'out_proj'\]"):
        check_against_base(cfg, str(tiny_model("sd35")), [])
    check_against_base(compose_cfg(*SD35, "lora.text_encoder={rank: 4}"), str(tiny_model("sd35")), [])  # CLIPs only


def test_morph_is_refused_for_a_flow_family_before_anything_trains(tmp_path):
    from hydra import compose, initialize_config_dir

    from sdtune.morph.command import morph
    from tests.helpers.paths import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("morph", overrides=[f"images=[{tmp_path / 'a.png'},{tmp_path / 'b.png'}]", "prompt=[a,b]",
                                          "train=true", "model=tiny_sd35"])
    for name in ("a.png", "b.png"):
        from PIL import Image

        Image.new("RGB", (64, 64)).save(tmp_path / name)
    with pytest.raises(ConfigError, match=r"sdtune.morph cannot morph with model.family=sd35: sdtune.morph inverts an "
                                          r"image with DDIM.*Fix: morph with an sd15, sdxl or kolors base"):
        morph(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
