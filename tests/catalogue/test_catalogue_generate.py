"""Catalogue, generate (and morph, merge, the toy ControlNet command): pictures are read as training
reads them, bad ControlNet folders and mixed LoRA families fail before any model loads, and the
messages name what a file is and give a fix that works as typed.

Commands run in this process (``main()`` with ``sys.argv``): exit 2 and ``error: <message>``. Where a
check must come before the base model loads, ``model.path`` names a folder that does not exist: a
check that came after the load would answer with the base model's error instead of ours.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image
from safetensors.torch import save_file

from sdtune.data.images import load_rgb, resize_and_crop
from sdtune.evaluation.metrics import fit_image, load_references
from sdtune.families import get_family
from sdtune.inference.embedding_files import read_embedding
from sdtune.inference.image_input import parse_image_input, prepare_pictures, read_picture
from sdtune.inference.loading import parse_loras
from sdtune.lora.files import LoraHeader, save_lora
from sdtune.lora.layers import LoraSpec
from sdtune.morph.inputs import load_image
from sdtune.utils.errors import ConfigError, LoraFileError
from tests.helpers.cli import run_entry
from tests.helpers.files import snapshot
from tests.helpers.paths import ROOT


def run_module(capsys, module: str, *args: str) -> tuple[int, str]:
    """``python -m MODULE ARGS`` in this process: (exit code, stderr). Hydra finds ``../conf`` beside
    the module's file as under ``python -m`` (HYDRA_MAIN_MODULE: the file, not a package, is the anchor)."""
    import os

    main = importlib.import_module(module).main
    anchor = os.environ.get("HYDRA_MAIN_MODULE")
    os.environ["HYDRA_MAIN_MODULE"] = "__main__"
    try:
        return run_entry(capsys, main, module, *args)
    finally:
        if anchor is None:
            os.environ.pop("HYDRA_MAIN_MODULE", None)
        else:
            os.environ["HYDRA_MAIN_MODULE"] = anchor


def _compose(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


# -- one picture reader: generate sees the pixels training sees -----------------------------------------
def _gradient16() -> np.ndarray:
    return np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)


def _gray16(path: Path) -> None:
    Image.fromarray(_gradient16()).save(path)  # PIL mode I;16
    assert Image.open(path).mode == "I;16"


def _rgb16(path: Path) -> None:
    import cv2

    g = _gradient16()
    cv2.imwrite(str(path), np.stack([g.T[:48, :48].repeat(1, 0), g[:, :48][::-1], g[:, 16:]], -1)[:, :, ::-1])


def _exif_rotated(path: Path) -> None:
    image = Image.new("RGB", (64, 32), "blue")
    image.paste((255, 0, 0), (0, 0, 16, 32))  # a red band on the left, stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 32 wide, 64 high
    image.save(path, exif=exif)


def _transparent(path: Path) -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (255, 0, 0, 255)  # a red square; the rest fully transparent (black under the alpha)
    Image.fromarray(rgba).save(path)


PICTURES = {"16-bit grey (I;16)": ("png", _gray16), "16-bit RGB": ("png", _rgb16),
            "EXIF-rotated JPEG": ("jpg", _exif_rotated), "transparent PNG": ("png", _transparent)}


@pytest.mark.parametrize("kind", list(PICTURES))
def test_generate_reads_every_input_picture_with_trainings_reader(tmp_path, kind):
    """init_image, controlnet.image and eval's reference images decode as the training data does
    (16-bit scaled, not saturated; EXIF rotation; transparency on white). The 16-bit RGB case was
    already right (Pillow reduces it while decoding); it stays as a guard."""
    suffix, make = PICTURES[kind]
    picture = tmp_path / "in" / f"picture.{suffix}"
    picture.parent.mkdir()
    make(picture)
    cn = tmp_path / "cn"  # a ControlNet folder as far as the pre-load check can tell; nothing loads here
    cn.mkdir()
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (cn / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    before = snapshot(picture.parent)
    training = load_rgb(picture)  # what the training datamodule decodes
    assert np.array_equal(np.asarray(read_picture(str(picture), "init_image")), np.asarray(training))
    spec = parse_image_input(_compose("generate", "prompt=x", f"init_image={picture}", f"controlnet.path={cn}",
                                      f"controlnet.image={picture}", "controlnet.preprocess=none"))
    pictures = prepare_pictures(spec, 64)
    expected = np.asarray(training.resize((pictures.width, pictures.height), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(pictures.init), expected)  # what img2img redraws
    assert np.array_equal(np.asarray(pictures.control), expected)  # what the ControlNet is steered by
    if kind.startswith("16-bit"):
        assert (np.asarray(pictures.init) == 255).mean() < 0.05  # was 99.5% white: a white picture redrawn
        assert 100 < np.asarray(pictures.init).mean() < 155
    assert np.array_equal(np.asarray(load_references([picture], (32, 32))[0]), np.asarray(fit_image(training, (32, 32))))
    assert np.array_equal(np.asarray(load_image(picture, 32)), np.asarray(resize_and_crop(training, (32, 32))[0]))
    assert snapshot(picture.parent) == before


# -- ControlNet folders are checked before the base model loads ------------------------------------------
def _pipeline(folder: Path, with_controlnet: bool = False) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    if with_controlnet:
        (folder / "controlnet").mkdir()
        (folder / "controlnet" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    return folder


CONTROLNETS = {
    "missing": (lambda d: d / "no-such-controlnet",
                r"controlnet.path='[^']*no-such-controlnet' does not exist. Fix: point controlnet.path at a diffusers "
                r"ControlNet folder \(config.json with _class_name ControlNetModel"),
    "pipeline": (lambda d: _pipeline(d / "sd15-pipeline"),
                 r"controlnet.path='[^']*sd15-pipeline' is a whole pipeline \(StableDiffusionPipeline, with "
                 r"model_index.json\), not a ControlNet: a ControlNet folder holds a config.json whose _class_name is "
                 r"ControlNetModel. Fix: point controlnet.path at a diffusers ControlNet folder"),
    "pipeline with a controlnet": (lambda d: _pipeline(d / "cn-pipeline", with_controlnet=True),
                                   r"is a whole pipeline .* Its ControlNet is in a subfolder: "
                                   r"controlnet.path='[^']*cn-pipeline/controlnet'"),
    "UNet": (lambda d: _pipeline(d / "sd15") / "unet",
             r"controlnet.path='[^']*sd15/unet' holds a UNet2DConditionModel, not a ControlNetModel \(a base model's "
             r"UNet; a ControlNet is a separate model made for a base\). Fix: point controlnet.path at a diffusers "
             r"ControlNet folder"),
}


@pytest.mark.parametrize("case", list(CONTROLNETS))
def test_a_bad_controlnet_path_is_named_before_the_base_model_loads(tmp_path, capsys, case):
    make, message = CONTROLNETS[case]
    mine = tmp_path / "mine"
    mine.mkdir()
    controlnet = make(mine)
    Image.new("RGB", (32, 32), "green").save(mine / "in.png")
    before = snapshot(mine)
    code, err = run_module(capsys, "sdtune.generate", "model=sd15", f"model.path={tmp_path / 'no-base'}", "prompt=x",
                           f"init_image={mine / 'in.png'}", f"controlnet.path={controlnet}", "device=cpu",
                           f"hydra.run.dir={tmp_path / 'out'}")
    assert code == 2, err
    assert re.search(message, err), err
    assert "huggingface.co" not in err and "no-base" not in err  # ours, and before the base model was looked at
    assert "Traceback" not in err
    assert snapshot(mine) == before


# -- LoRAs of two families: refused from their headers ---------------------------------------------------
def _lora(path: Path, family: str, base: Path) -> Path:
    """A small valid LoRA whose header says ``family`` and records ``base`` as its model."""
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{module}.lora_A.weight": torch.full((2, 32), 0.01), f"{module}.lora_B.weight": torch.full((32, 2), 0.01)}
    cfg = {"model": {"family": family, "path": str(base), "resolution": 64}}
    header = LoraHeader(LoraSpec(rank=2, alpha=2.0, targets=("to_q",)), family=family, config=cfg)
    return save_lora(path, tensors, header, format="diffusers")


@pytest.mark.parametrize("module", ["sdtune.generate", "sdtune.merge"])
def test_loras_of_two_families_are_refused_before_the_base_model_loads(tmp_path, capsys, module):
    mine = tmp_path / "mine"
    mine.mkdir()
    a = _lora(mine / "style.safetensors", "sd15", tmp_path / "no-base")
    b = _lora(mine / "subject.safetensors", "sdxl", tmp_path / "no-base-xl")
    before = snapshot(mine)
    extra = ["prompt=x", "device=cpu"] if module == "sdtune.generate" else [f"out={tmp_path / 'merged'}"]
    code, err = run_module(capsys, module, f"loras=[{a},{b}]", *extra, f"hydra.run.dir={tmp_path / 'out'}")
    assert code == 2, err
    assert (f"'{a}' is a sd15 LoRA and '{b}' is a sdxl LoRA: LoRAs of different model families cannot be used on one "
            "base model. Fix: pass only sd15 LoRAs (with a sd15 base model) or only sdxl LoRAs") in err, err
    assert "no-base" not in err and "Traceback" not in err
    assert snapshot(mine) == before and not (tmp_path / "merged").exists()


def test_a_lora_of_another_family_than_the_given_base_is_refused_before_it_loads(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    xl = _lora(mine / "xl.safetensors", "sdxl", tmp_path / "no-base-xl")
    before = snapshot(mine)
    code, err = run_module(capsys, "sdtune.generate", "model=sd15", f"model.path={tmp_path / 'no-base'}",
                           f"loras=[{xl}]", "prompt=x", "device=cpu", f"hydra.run.dir={tmp_path / 'out'}")
    assert code == 2, err
    assert f"'{xl}' is a sdxl LoRA but the base model is sd15. Fix: load it onto a sdxl base model" in err, err
    assert "no-base" not in err and snapshot(mine) == before


# -- a LoRA passed as an embedding ------------------------------------------------------------------------
def _big_kohya_lora(path: Path) -> int:
    """A kohya-layout LoRA with as many (long-named) tensors as a real SD1.5 LoRA: 3 per layer."""
    tensors = {}
    for block in range(4):
        for i in range(40):
            name = f"lora_unet_down_blocks_{block}_attentions_0_transformer_blocks_{i}_attn1_to_q"
            tensors |= {f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2),
                        f"{name}.alpha": torch.tensor(2.0)}
    save_file(tensors, str(path))
    return len(tensors)


def test_a_lora_passed_as_an_embedding_is_named_a_lora_in_a_short_message(tmp_path, capsys):
    lora = tmp_path / "mine" / "style.safetensors"
    lora.parent.mkdir()
    count = _big_kohya_lora(lora)
    before = snapshot(lora.parent)
    want = (f"embedding file '{lora}' is a LoRA file ({count} LoRA tensors, kohya layout), not an embedding: "
            f"pass it as loras=[{lora}]")
    with pytest.raises(LoraFileError) as err:
        read_embedding(lora, get_family("sd15"))
    assert want in str(err.value) and len(str(err.value)) < 400 and "\n" not in str(err.value)
    # the command: refused before the base model loads (model.path does not exist), exit 2
    code, out = run_module(capsys, "sdtune.generate", "model=sd15", f"model.path={tmp_path / 'no-base'}",
                           f"embeddings=[{lora}]", "prompt=x", "device=cpu", f"hydra.run.dir={tmp_path / 'out'}")
    assert code == 2 and want in out and "no-base" not in out, out
    assert len(out) < 600
    # the fix as written is generate's own key and names the file
    assert [r.path for r in parse_loras(_compose("generate", "prompt=x", f"loras=[{lora}]").loras)] == [str(lora)]
    assert snapshot(lora.parent) == before


def test_a_file_that_is_neither_lora_nor_embedding_shows_a_few_names_only(tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file({f"model.layer_{i}.weight_with_a_rather_long_name": torch.zeros(1) for i in range(500)}, str(odd))
    with pytest.raises(LoraFileError) as err:
        read_embedding(odd, get_family("sd15"))
    assert "and 497 more, but a sd15 embedding holds ['emb_params']" in str(err.value)
    assert len(str(err.value)) < 400


# -- morph: the suggested train_overrides form is one Hydra parses -----------------------------------------
def test_morph_train_overrides_fix_is_an_override_hydras_grammar_accepts(tmp_path):
    from sdtune.morph.train import training_config

    with pytest.raises(ConfigError) as err:
        training_config(["trainer.max_stepz=100"], data_root=tmp_path, run_dir=tmp_path, seed=0)
    message = str(err.value)
    assert "train_overrides=['trainer.max_stepz=100'] do not compose" in message
    suggested = re.search(r"e\.g\. ('train_overrides=\[.*\]')", message).group(1)
    args = shlex.split(suggested)  # as the shell hands it to python -m sdtune.morph
    parsed = OverridesParser.create().parse_overrides(args)  # Hydra's own grammar
    assert parsed[0].value() == ["trainer.max_steps=100", "optim.optimizer.lr=1e-4"]
    cfg = _compose("morph", *args)  # and the morph command composes with it
    composed = training_config(list(cfg.train_overrides), data_root=tmp_path, run_dir=tmp_path, seed=0)
    assert composed.trainer.max_steps == 100 and composed.optim.optimizer.lr == 1e-4
    assert list(tmp_path.iterdir()) == []


# -- the toy ControlNet command from another folder --------------------------------------------------------
def test_toy_controlnet_default_base_works_from_any_folder(tmp_path, monkeypatch):
    from sdtune.toy.controlnet import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the repository: a relative models/toy/sd15 is not here
    main(["--out", "cn"])
    config = json.loads((elsewhere / "cn" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel" and (elsewhere / "cn" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["cn"]


def test_toy_controlnet_with_a_base_that_is_no_model_folder_exits_2_with_the_fix(tmp_path, monkeypatch, capsys):
    from sdtune.toy.controlnet import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--base", "nowhere", "--out", "cn"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--base 'nowhere' is not a diffusers model folder with a unet/ subfolder" in err
    assert str(ROOT / "models" / "toy" / "sd15") in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("override", "words"), [
    ("num_images=abc", "num_images must be an integer"),
    ("num_images=0", "num_images must be >= 1, got 0"),
    ("steps=2.5", "steps must be an integer"),
])
def test_a_count_that_is_no_whole_number_is_refused_by_name_without_a_traceback(tmp_path, capsys, override, words):
    """``num_images`` and ``steps`` go through the shared value checks (``int("abc")`` once ended
    in a ValueError traceback)."""
    code, err = run_module(capsys, "sdtune.generate", "model=sd15", f"model.path={tmp_path / 'no-base'}", "prompt=x",
                           override, "device=cpu", f"hydra.run.dir={tmp_path / 'out'}")
    assert code == 2, err
    assert words in err and "Fix: e.g." in err and "Traceback" not in err, err
