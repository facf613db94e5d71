"""Existing features on a flow-matching family, end to end on the tiny SD3.5: one short training run
with text-encoder LoRA (both CLIPs train, T5 stays frozen), whose file then loads through sdtune's
apply and diffusers' ``load_lora_weights``, draws with ``generate`` (text2img, img2img, ControlNet)
and merges into a diffusers folder. Everything here is generic: FLUX gets it through its class
attributes (``lora_text_encoders``, ``controlnet_class``, ``pipeline_call_kwargs``...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.generate import generate
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.inference.sampling import render
from sdtune.lora.keys import DENOISER
from sdtune.merge import merge
from sdtune.toy.controlnet import build_toy_controlnet
from sdtune.toy.domain import Scene
from sdtune.toy.domain import render as render_scene
from sdtune.training.checkpointing import load_checkpoint
from sdtune.utils.errors import ConfigError, ModelLoadError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_tool
from tests.helpers.models import tiny_model

pytestmark = pytest.mark.slow
PROMPTS = ["a red circle on a sks background"]


@pytest.fixture(scope="module")
def te_run(tmp_path_factory):
    """``python -m sdtune experiment=quickstart model=tiny_sd35 lora.text_encoder.rank=4``, 4 steps at a
    high learning rate (so that the LoRA visibly changes what the tiny model draws), with the sample
    grid and the concept probe (2 sampling steps each)."""
    run = tmp_path_factory.mktemp("sd35_te") / "run"
    proc = run_cli("experiment=quickstart", "model=tiny_sd35", "trainer.max_steps=4", "optim.optimizer.lr=0.05",
                   "callbacks.samples.steps=2", "callbacks.concept_probe.steps=2", "data.val_images=0",
                   "lora.text_encoder={rank: 4}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_text_encoder_lora_trains_both_clips_and_leaves_t5_frozen(te_run):
    from safetensors.torch import load_file

    state = load_checkpoint(te_run / "checkpoints" / "last.ckpt")["state_dict"]
    te = {k: v for k, v in state.items() if k.startswith("text_encoders.")}
    assert {k.split(".")[1] for k in te} == {"0", "1"}  # CLIP-L and CLIP-G; T5 (index 2) has no LoRA
    for index in ("0", "1"):  # each encoder's LoRA moved off its zero start (lora_B = 0)
        assert any(v.abs().max() > 0 for k, v in te.items() if k.startswith(f"text_encoders.{index}.") and ".lora_B." in k)
    on_disk = load_file(str(te_run / "lora.safetensors"))
    assert {k.split(".")[0] for k in on_disk} == {"transformer", "text_encoder", "text_encoder_2"}


def test_the_file_loads_through_sdtune_and_diffusers_alike(te_run):
    """diffusers' ``StableDiffusion3Pipeline.load_lora_weights`` puts the trained tensors into both CLIPs
    (and none into T5); sdtune's apply encodes the prompt exactly as that pipeline then does."""
    from diffusers import StableDiffusion3Pipeline

    path = str(te_run / "lora.safetensors")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd35"))
    pipe.load_lora_weights(path)
    state = load_checkpoint(te_run / "checkpoints" / "last.ckpt")["state_dict"]
    for index, name in ((0, "text_encoder"), (1, "text_encoder_2")):
        theirs = {k.replace(".default_0.", ".default."): v for k, v in getattr(pipe, name).named_parameters()
                  if ".lora_" in k}
        ours = {k.removeprefix(f"text_encoders.{index}."): v for k, v in state.items()
                if k.startswith(f"text_encoders.{index}.")}
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert not any(".lora_" in k for k, _ in pipe.text_encoder_3.named_parameters())

    family, parts = build_parts({"family": "sd35", "path": str(tiny_model("sd35"))})
    with torch.no_grad():
        base = family.encode_prompts(parts, PROMPTS)
        adapters = apply_loras(parts, family, [LoraRef(path, 1.0)])
        assert set(adapters) == {DENOISER, 0, 1}
        ours = family.encode_prompts(parts, PROMPTS)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False,
                                                  **{"max_sequence_length": family.t5_length(parts)})
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=1e-6)
    assert (ours["pooled_projections"] - base["pooled_projections"]).abs().max() > 1e-4  # the LoRA does act
    assert get_family("sd35").text_encoders_with_lora() == (0, 1)


def test_export_from_the_checkpoint_gives_the_runs_file_and_a_kohya_file_that_applies(te_run, tmp_path):
    """``sdtune.export`` reads the denoiser's LoRA under the family's attribute (``transformer.``) and the
    CLIPs' beside it: the family's layout gives the run's own file back; the kohya layout (MMDiT names,
    ``lora_te1_``/``lora_te2_``) applies to the transformer and both CLIPs."""
    from safetensors.torch import load_file

    from sdtune.export import export_checkpoint

    run_file = load_file(str(te_run / "lora.safetensors"))
    again = load_file(str(export_checkpoint(te_run / "checkpoints" / "last.ckpt", tmp_path / "again.safetensors")))
    assert again.keys() == run_file.keys() and all(torch.equal(again[k], run_file[k]) for k in run_file)
    kohya = export_checkpoint(te_run / "checkpoints" / "last.ckpt", tmp_path / "kohya.safetensors", format="kohya")
    names = load_file(str(kohya)).keys()
    assert {k.split("_")[1] for k in names} == {"unet", "te1", "te2"}
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in names
    family, parts = build_parts({"family": "sd35", "path": str(tiny_model("sd35"))})
    assert set(apply_loras(parts, family, [LoraRef(str(kohya), 1.0)])) == {DENOISER, 0, 1}

def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in folder.glob("*.png")}


def _generate(out: Path, *overrides: str) -> dict[str, np.ndarray]:
    out.mkdir(parents=True)
    generate(compose_tool("generate", "prompt=a red circle on a sks background", "num_images=1", "steps=2", "device=cpu",
                          *overrides), out)
    return _images(out)


def test_samples_and_probe_draw_with_the_lora_scale_and_scale_0_is_the_base(te_run):
    """The sample grid and the probe ran in the training run; the call they make (the family's
    ``pipeline_call_kwargs``: joint_attention_kwargs scale, T5 length) draws the base exactly at
    scale 0 and the LoRA at 1."""
    import json

    assert (te_run / "samples.png").is_file() and (te_run / "concept_probe.png").is_file()
    assert set(json.loads((te_run / "summary.json").read_text())["concept_probe"]["sks"]) >= {"lora_off", "lora_on"}
    family, parts = build_parts({"family": "sd35", "path": str(tiny_model("sd35"))})
    pipe = family.build_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)

    def draw(scale):
        image = render(pipe, PROMPTS, [0], steps=2, size=64, call_kwargs=family.pipeline_call_kwargs(2.0, scale, parts))[0]
        return np.asarray(image, dtype=np.int16)

    base = draw(None)
    apply_loras(parts, family, [LoraRef(str(te_run / "lora.safetensors"), 1.0)])
    off, on = draw(0.0), draw(1.0)
    np.testing.assert_array_equal(off, base)  # scale 0: the transformer's and both CLIPs' LoRA contribute nothing
    assert np.abs(on - base).mean() > 1


def test_generate_text2img_and_img2img_with_the_lora(te_run, tmp_path):
    lora = te_run / "lora.safetensors"
    base = _generate(tmp_path / "base", "model=tiny_sd35")["seed0"]
    text = _generate(tmp_path / "text", f"loras=[{lora}]", "compare=true")  # model from the LoRA's header
    assert text["seed0"].shape == (64, 64, 3)
    np.testing.assert_array_equal(text["off_seed0"], base)  # LoRA off: the base exactly
    assert np.abs(text["seed0"] - base).mean() > 1
    np.testing.assert_array_equal(_generate(tmp_path / "zero", f"loras=[{lora}@0]")["seed0"], base)  # weight 0
    init = tmp_path / "init.png"
    render_scene(Scene("square", "green", "yellow")).resize((80, 48)).save(init)  # another aspect: 16 px multiples
    redrawn = _generate(tmp_path / "img2img", f"loras=[{lora}]", "compare=true", f"init_image={init}", "strength=0.7")
    assert redrawn["seed0"].shape == (48, 80, 3) and np.abs(redrawn["seed0"] - redrawn["off_seed0"]).mean() > 1
    with pytest.raises(ConfigError, match=r"size=72 is not a multiple of 16 \(the VAE downsamples by 8 and the "
                                          r"transformer takes 2x2 patches of latents, model.family=sd35\). Fix: size=64 "
                                          r"or size=80"):
        _generate(tmp_path / "bad", f"loras=[{lora}]", "size=72")


def test_merge_fuses_the_lora_into_a_diffusers_folder(te_run, tmp_path):
    """``python -m sdtune.merge``: ``fuse_lora`` on the transformer and both CLIPs; the folder loads and
    computes what the LoRA-applied base computes. A single file is not written (sdtune has no SD3
    single-file writer), and demanding one is refused before anything loads."""
    lora = str(te_run / "lora.safetensors")
    with pytest.raises(ConfigError, match=r"single_file=true: sdtune writes no single-file checkpoint for "
                                          r"model.family=sd35 .*Fix: single_file=null or false"):
        merge(compose_tool("merge", f"loras=[{lora}]", f"out={tmp_path / 'no'}", "single_file=true"))
    assert not (tmp_path / "no").exists()
    out, single = merge(compose_tool("merge", f"loras=[{lora}]", f"out={tmp_path / 'merged'}", "save_dtype=fp32"))
    assert single is None and not list(tmp_path.glob("*.safetensors"))
    family = get_family("sd35")
    merged = family.load(str(out))
    _, applied = build_parts({"family": "sd35", "path": str(tiny_model("sd35"))})
    apply_loras(applied, family, [LoraRef(lora, 1.0)])
    assert not any(".lora_" in k for k, _ in merged.denoiser.named_parameters())
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        outs = []
        for parts in (merged, applied):
            cond = family.conditioning(family.encode_prompts(parts, PROMPTS), {})
            outs.append((cond, family.predict(parts.denoiser, noisy, t, cond)))
    (cond_m, pred_m), (cond_a, pred_a) = outs
    torch.testing.assert_close(cond_m["pooled_projections"], cond_a["pooled_projections"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pred_m, pred_a, rtol=0, atol=1e-5)


def test_generate_with_an_sd3_controlnet(te_run, tmp_path):
    """``family.controlnet_class`` loads it, ``controlnet_fits`` is checked, the text2img pipeline gets
    its control picture as ``control_image``; at scale 0 it adds nothing, at 1 it steers."""
    from diffusers import SD3ControlNetModel

    _, parts = build_parts({"family": "sd35", "path": str(tiny_model("sd35"))})
    controlnet = SD3ControlNetModel.from_transformer(parts.denoiser, num_layers=1, num_extra_conditioning_channels=0)
    torch.manual_seed(0)
    with torch.no_grad():  # its output blocks start at zero: give them weights so that it steers
        for p in controlnet.controlnet_blocks.parameters():
            p.normal_(std=0.2)
    controlnet.save_pretrained(tmp_path / "cn")
    picture = tmp_path / "edges.png"
    render_scene(Scene("triangle", "white", "black")).save(picture)
    common = ("model=tiny_sd35", f"controlnet.path={tmp_path / 'cn'}", f"controlnet.image={picture}",
              "controlnet.preprocess=none")
    base = _generate(tmp_path / "base", "model=tiny_sd35")["seed0"]
    off = _generate(tmp_path / "off", *common, "controlnet.conditioning_scale=0")
    on = _generate(tmp_path / "on", *common, "controlnet.conditioning_scale=1")
    np.testing.assert_array_equal(off["seed0"], base)
    assert np.abs(on["seed0"] - base).mean() > 1
    sd15_cn = build_toy_controlnet(tiny_model("sd15"), tmp_path / "sd15-cn")
    with pytest.raises(ModelLoadError, match=r"holds a ControlNetModel, but a sd35 base takes a SD3ControlNetModel"):
        _generate(tmp_path / "wrong", "model=tiny_sd35", f"controlnet.path={sd15_cn}", f"controlnet.image={picture}")
