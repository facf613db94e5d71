"""``sdtune.generate`` with pictures as input: img2img (SDEdit) and ControlNet, on tiny and toy bases.

Pixels are judged on the toy sd15 base (it draws shapes, so strength has a visible meaning);
plumbing (pipeline classes, files, records, errors) on the tiny random models.
"""

from __future__ import annotations

import hashlib
import json

import diffusers
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sdtune.families import get_family
from sdtune.generate import generate
from sdtune.inference.image_input import canny, fit_size
from sdtune.toy.build import TOY_ROOT
from sdtune.toy.controlnet import build_toy_controlnet, input_scene
from sdtune.toy.domain import Scene, render
from sdtune.utils.errors import ConfigError, ModelLoadError
from tests.helpers.loras import lora_file
from tests.helpers.models import tiny_model
from tests.helpers.paths import ROOT

PROMPT = "a red circle on a blue background"
MODEL = {"sd15": "tiny", "sdxl": "tiny_sdxl", "kolors": "tiny_kolors"}


def _run(out, *overrides: str) -> dict[str, np.ndarray]:
    """``python -m sdtune.generate OVERRIDES`` into ``out``; every PNG written, as float arrays."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[f"prompt={PROMPT}", "num_images=1", "steps=10", "device=cpu", *overrides])
    written = generate(cfg, out)
    assert sorted(written) == sorted(out.glob("*.png"))  # generate lists every picture it wrote, control.png too
    return {p.stem: np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in out.glob("*.png")}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two very different inputs: a green square on yellow, a white triangle on black (64 px)."""
    root = tmp_path_factory.mktemp("inputs")
    input_scene().save(root / "square.png")
    render(Scene("triangle", "white", "black")).save(root / "triangle.png")
    return root


@pytest.fixture(scope="module")
def toy_controlnet(tmp_path_factory):
    return build_toy_controlnet(TOY_ROOT / "sd15", tmp_path_factory.mktemp("cn") / "toy-sd15")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the family interface ------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "classes"), [
    ("sd15", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionControlNetPipeline",
              "StableDiffusionControlNetImg2ImgPipeline")),
    ("sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLControlNetPipeline",
              "StableDiffusionXLControlNetImg2ImgPipeline")),
])
def test_each_task_gets_its_pipeline_class_sharing_the_parts(family, classes):
    fam = get_family(family)
    parts = fam.load(str(tiny_model(family)))
    controlnet = diffusers.ControlNetModel.from_unet(parts.unet)
    tasks = [("text2img", None), ("img2img", None), ("text2img", controlnet), ("img2img", controlnet)]
    built = [fam.build_pipeline(parts, task=task, controlnet=cn) for task, cn in tasks]
    assert [type(p).__name__ for p in built] == list(classes)
    assert type(fam.build_pipeline(parts)).__name__ == classes[0]  # the old call is text2img
    scheduler = type(built[0].scheduler)
    assert all(p.unet is parts.unet and p.vae is parts.vae and type(p.scheduler) is scheduler for p in built)
    assert built[3].controlnet is controlnet


def test_kolors_has_img2img_but_no_controlnet_pipeline():
    fam = get_family("kolors")
    assert fam.pipeline_class("img2img") is diffusers.KolorsImg2ImgPipeline
    with pytest.raises(ConfigError, match=r"kolors has no diffusers pipeline for img2img with a ControlNet .*"
                                          r"Fix: drop controlnet.path .*\['flux', 'sd15', 'sdxl'\]"):
        fam.pipeline_class("img2img", controlnet=True)


def test_fit_size_keeps_the_aspect_at_about_the_area_in_multiples_of_8():
    assert fit_size(64, 64, 64) == (64, 64)
    assert fit_size(640, 480, 512) == (592, 440)
    assert fit_size(1000, 10, 64) == (640, 8)
    w, h = fit_size(1920, 1080, 1024)
    assert w % 8 == h % 8 == 0 and abs(w * h / 1024**2 - 1) < 0.02 and abs(w / h - 16 / 9) < 0.02


# -- pixels on the toy base ----------------------------------------------------------------------
def test_strength_0_gives_the_input_back_within_the_vaes_own_round_trip(tmp_path, pictures):
    source = pictures / "square.png"
    before = _sha(source)
    out = _run(tmp_path / "g", "model=toy", f"init_image={source}", "strength=0")["seed0"]
    original = np.asarray(Image.open(source).convert("RGB"), dtype=np.float64)
    vae = diffusers.AutoencoderKL.from_pretrained(TOY_ROOT / "sd15" / "vae", torch_dtype=torch.float32)
    with torch.no_grad():
        x = torch.from_numpy(original / 127.5 - 1).permute(2, 0, 1)[None].float()
        back = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].permute(1, 2, 0).clamp(-1, 1)
    vae_error = np.abs((back.numpy() + 1) * 127.5 - original).mean()
    assert 1 < vae_error < 20  # the toy VAE is lossy: measured 9.84 of 255 on this picture (strength 0: 9.83)
    assert np.abs(out - original).mean() <= 1.5 * vae_error + 1
    assert _sha(source) == before  # the input is only read


def test_strength_1_ignores_the_input_and_0_3_keeps_it(tmp_path, pictures):
    def diff(strength):
        a, b = (_run(tmp_path / f"{name}{strength}", "model=toy", f"init_image={pictures / name}.png",
                     f"strength={strength}")["seed0"] for name in ("square", "triangle"))
        return np.abs(a - b).mean()

    full, light = diff(1.0), diff(0.3)
    assert full < 2  # the same seed draws the same picture whatever came in (measured 0.09 of 255)
    assert light > 15  # at 0.3 the input shows through (measured 27.4)


def test_controlnet_scale_0_is_no_controlnet_and_1_changes_the_picture(tmp_path, pictures, toy_controlnet):
    common = ("model=toy", f"init_image={pictures / 'square.png'}", "strength=0.6")
    plain = _run(tmp_path / "plain", *common)["seed0"]
    off = _run(tmp_path / "off", *common, f"controlnet.path={toy_controlnet}", "controlnet.conditioning_scale=0")
    on = _run(tmp_path / "on", *common, f"controlnet.path={toy_controlnet}", "controlnet.conditioning_scale=1")
    assert np.abs(off["seed0"] - plain).max() <= 1  # measured 0: a zero-scaled ControlNet adds nothing
    assert np.abs(on["seed0"] - off["seed0"]).mean() > 5  # measured 16.5
    np.testing.assert_array_equal(off["control"], on["control"])  # same picture, same edge map


# -- files, records, LoRAs, families --------------------------------------------------------------
def test_canny_thresholds_change_control_png_and_it_is_an_edge_map_of_the_input(tmp_path):
    # a bright square (step 255) and a faint one (step 30): the thresholds decide whether the faint one has edges
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[12:28, 8:28], picture[36:54, 34:56] = 255, 30
    source = tmp_path / "two.png"
    Image.fromarray(picture).save(source)
    cn = build_toy_controlnet(tiny_model("sd15"), tmp_path / "cn")
    loose, strict = (_run(tmp_path / f"t{low}", f"model={MODEL['sd15']}", "steps=1", f"init_image={source}",
                          f"controlnet.path={cn}", f"controlnet.low_threshold={low}", f"controlnet.high_threshold={high}")
                     ["control"] for low, high in ((10, 30), (100, 200)))
    assert set(np.unique(loose)) <= {0.0, 255.0} and (loose[..., 0] == loose[..., 2]).all()  # 3-channel binary map
    left, right = np.s_[:, :32, 0], np.s_[:, 32:, 0]
    assert (loose[left] > 0).sum() == (strict[left] > 0).sum() > 50  # the bright square's outline at both
    assert (loose[right] > 0).sum() > 50 and (strict[right] > 0).sum() == 0  # the faint one's only at 10/30
    grey = picture[..., 0].astype(int)
    neighbours = [np.roll(grey, shift, axis) for shift in (-1, 1) for axis in (0, 1)]
    boundary = np.any([n != grey for n in neighbours], axis=0)  # pixels next to a change of value
    assert boundary[loose[..., 0] > 0].all()  # every edge pixel lies on a square's outline


def test_generation_json_and_png_text_record_the_picture_settings(tmp_path, pictures):
    source = pictures / "square.png"
    cn = build_toy_controlnet(tiny_model("sd15"), tmp_path / "cn")
    _run(tmp_path / "g", f"model={MODEL['sd15']}", "steps=2", f"init_image={source}", "strength=0.7",
         f"controlnet.path={cn}", "controlnet.conditioning_scale=0.25", "controlnet.low_threshold=50")
    record = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert record["init_image"] == {"path": str(source), "sha256": _sha(source)}
    assert record["strength"] == 0.7 and record["size"] == [64, 64]
    assert record["controlnet"] == {"path": str(cn), "conditioning_scale": 0.25, "preprocess": "canny",
                                    "low_threshold": 50, "high_threshold": 200, "image": None}
    text = Image.open(tmp_path / "g" / "seed0.png").text["parameters"]
    assert "Denoising strength: 0.7, " in text and f'Init image: "{source}", Init image hash: {_sha(source)[:12]}' in text
    assert 'ControlNet 0: "Module: canny, Model: cn, Weight: 0.25, Threshold A: 50, Threshold B: 200"' in text


def test_lora_compare_rows_with_the_input_and_control_in_front(tmp_path, pictures):
    lora = lora_file(tmp_path, "sd15", 1)
    cn = build_toy_controlnet(tiny_model("sd15"), tmp_path / "cn")
    images = _run(tmp_path / "g", f"loras=[{lora}]", "compare=true", "num_images=2", "steps=3",
                  f"init_image={pictures / 'square.png'}", "strength=0.8", f"controlnet.path={cn}")
    assert np.abs(images["seed0"] - images["off_seed0"]).mean() > 1  # the LoRA changes the picture
    assert np.abs(images["seed0"] - images["seed1"]).mean() > 1  # seeds differ
    assert "<lora:sd15_1:1>" in Image.open(tmp_path / "g" / "seed0.png").text["parameters"]
    # two rows (off, on) of input, control and two seeds: 4 tiles of 160 px (+4 pad) after a 120 px label column
    assert images["grid"].shape[:2] == (34 + 2 * 164, 120 + 4 * 164)
    tile = images["grid"][34:34 + 160, 120:120 + 160]
    assert np.abs(tile - np.asarray(Image.open(pictures / "square.png").resize((160, 160), Image.NEAREST))).mean() < 1


def test_sdxl_img2img_with_controlnet_and_kolors_img2img(tmp_path, pictures):
    source = pictures / "square.png"
    cn = build_toy_controlnet(tiny_model("sdxl"), tmp_path / "cn")
    xl = _run(tmp_path / "xl", f"model={MODEL['sdxl']}", "steps=2", f"init_image={source}", f"controlnet.path={cn}",
              "controlnet.conditioning_scale=1")
    assert xl["seed0"].shape == (64, 64, 3) and xl["control"].max() == 255
    assert json.loads((tmp_path / "xl" / "generation.json").read_text())["sampler"] == "EulerDiscreteScheduler"
    kolors = _run(tmp_path / "k", f"model={MODEL['kolors']}", "steps=2", f"init_image={source}", "strength=0.5")
    assert kolors["seed0"].shape == (64, 64, 3) and "control" not in kolors
    with pytest.raises(ConfigError, match="kolors has no diffusers pipeline for img2img with a ControlNet"):
        _run(tmp_path / "kc", f"model={MODEL['kolors']}", f"init_image={source}", f"controlnet.path={cn}")
    assert not (tmp_path / "kc").exists()  # refused before anything was drawn


def test_text2img_steered_by_controlnet_image(tmp_path, pictures):
    cn = build_toy_controlnet(tiny_model("sd15"), tmp_path / "cn")
    edges = tmp_path / "edges.png"
    canny(Image.open(pictures / "triangle.png").convert("RGB"), 100, 200).save(edges)
    images = _run(tmp_path / "g", f"model={MODEL['sd15']}", "steps=2", f"controlnet.path={cn}",
                  f"controlnet.image={edges}", "controlnet.preprocess=none", "controlnet.conditioning_scale=1")
    np.testing.assert_array_equal(images["control"], np.asarray(Image.open(edges).convert("RGB")))  # used as given
    record = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert "init_image" not in record and record["controlnet"]["image"]["sha256"] == _sha(edges)


# -- bad inputs ---------------------------------------------------------------------------------
def _bad(tmp_path, pictures):
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    return [
        ([f"init_image={tmp_path / 'missing.png'}"], ConfigError, r"init_image='.*missing.png': no such file. Fix"),
        ([f"init_image={not_a_picture}"], ConfigError, r"init_image='.*notes.png' is not a readable picture"),
        ([f"init_image={pictures / 'square.png'}", "strength=1.5"], ConfigError,
         r"strength must be a number from 0 to 1, got 1.5. Fix: e.g. strength=0.5"),
        ([f"init_image={pictures / 'square.png'}", f"controlnet.path={tiny_model('sd15')}"], ModelLoadError,
         r"(?s)controlnet.path='.*tiny-sd15'.*Fix: point controlnet.path at a diffusers ControlNet folder"),
        ([f"init_image={pictures / 'square.png'}", f"controlnet.path={tiny_model('sd15') / 'unet'}"], ModelLoadError,
         r"holds a UNet2DConditionModel, not a ControlNetModel"),
        ([f"init_image={pictures / 'square.png'}", f"controlnet.path={tmp_path}", "controlnet.preprocess=sobel"],
         ConfigError, r"controlnet.preprocess='sobel' is not known. Fix: choose one of \('canny', 'none'\)"),
        ([f"controlnet.path={tmp_path}"], ConfigError, r"a ControlNet needs a control picture: set init_image="),
        ([f"controlnet.image={pictures / 'square.png'}"], ConfigError, r"controlnet.image is set but controlnet.path is null"),
    ]


def test_bad_picture_inputs_name_the_key_and_the_fix(tmp_path, pictures):
    for overrides, error, message in _bad(tmp_path, pictures):
        with pytest.raises(error, match=message):
            _run(tmp_path / "out", f"model={MODEL['sd15']}", "steps=1", *overrides)
    assert not (tmp_path / "out").exists()


def test_a_controlnet_for_another_base_is_refused(tmp_path, pictures):
    cn = build_toy_controlnet(tiny_model("sdxl"), tmp_path / "xl-cn")
    with pytest.raises(ModelLoadError, match=r"was made for another base: its cross_attention_dim is 80, the base "
                                             r"model's UNet2DConditionModel has 32"):
        _run(tmp_path / "out", f"model={MODEL['sd15']}", f"init_image={pictures / 'square.png'}", f"controlnet.path={cn}")


def test_the_toy_controlnet_is_reproducible_and_loads_like_a_real_one(tmp_path):
    a, b = (build_toy_controlnet(tiny_model("sd15"), tmp_path / name, seed=3) for name in ("a", "b"))
    name = "diffusion_pytorch_model.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes()  # the README picture redraws byte for byte
    model = diffusers.ControlNetModel.from_pretrained(a)
    assert model.controlnet_mid_block.weight.abs().min() > 0  # the zero convs are live
    assert list(model.config.conditioning_embedding_out_channels) == [16, 32, 96, 256]  # 8x down, the VAE's factor


def test_a_negative_prompt_the_flux_controlnet_img2img_pipeline_cannot_take_is_refused_before_loading(tmp_path, pictures):
    """FluxControlNetImg2ImgPipeline has no negative_prompt parameter: set, it is refused up front
    (naming the pipeline and the fix) instead of a TypeError after the base has loaded."""
    folder = tmp_path / "cn"  # a FLUX ControlNet folder as far as the checks before loading read it
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxControlNetModel"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never read: refused before loading
    with pytest.raises(ConfigError, match=r"negative_prompt='blurry': FluxControlNetImg2ImgPipeline takes no negative "
                                          r"prompt .* Fix: drop negative_prompt"):
        _run(tmp_path / "out", "model=tiny_flux", f"init_image={pictures / 'square.png'}", f"controlnet.path={folder}",
             "negative_prompt=blurry")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # builds a FLUX ControlNet from the tiny transformer and draws through it (~5 s)
def test_flux_controlnet_img2img_draws_without_a_negative_prompt(tmp_path, pictures):
    """The default (no negative prompt) reaches FluxControlNetImg2ImgPipeline without the keyword it lacks."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_model("flux"), subfolder="transformer")
    FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=1, attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads).save_pretrained(tmp_path / "cn")
    images = _run(tmp_path / "out", "model=tiny_flux", "steps=2", f"init_image={pictures / 'square.png'}",
                  f"controlnet.path={tmp_path / 'cn'}", "strength=0.5")
    assert images["seed0"].shape == (64, 64, 3) and images["control"].max() == 255
