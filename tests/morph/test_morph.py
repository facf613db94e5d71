"""python -m sdtune.morph: slerp, DDIM inversion on the toy bases, the whole train=true flow, bad inputs.

Errors are mean absolute pixel differences on a 0-1 scale (:func:`sdtune.morph.inversion.pixel_error`)
at 64 px, between a red circle on blue and a green square on yellow (0.581 apart).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sdtune.families.builder import build_parts
from sdtune.morph.command import morph
from sdtune.morph.inputs import resolve_prompts
from sdtune.morph.inversion import (
    conditioning,
    ddim_schedulers,
    decode_latent,
    encode_image,
    invert,
    pixel_error,
    sample,
    slerp,
)
from sdtune.toy.domain import Scene, render
from sdtune.utils.errors import ConfigError
from tests.helpers.paths import ROOT

SCENES = {"a": Scene("circle", "red", "blue"), "b": Scene("square", "green", "yellow")}
TOY = {"sd15": "models/toy/sd15", "sdxl": "models/toy/sdxl", "kolors": "models/toy/kolors"}


def _compose(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("morph", overrides=list(overrides))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _inputs(folder: Path, captions: bool = True) -> list[Path]:
    """The two toy scenes as a.png and b.png (with a.txt, b.txt captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, scene in SCENES.items():
        render(scene).save(folder / f"{name}.png")
        if captions:
            (folder / f"{name}.txt").write_text(scene.caption() + "\n")
        paths.append(folder / f"{name}.png")
    return paths


# -- slerp ------------------------------------------------------------------------------------

def _angle(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    return math.acos(float(torch.dot(x, y) / (x.norm() * y.norm())))


def test_slerp_endpoints_are_exact_and_shape_kept():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=1e-6)
    assert slerp(a, b, 0.3).shape == a.shape and slerp(a, b, 0.3).dtype == a.dtype


def test_slerp_keeps_the_norm_and_halves_the_angle():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(256, generator=g), torch.randn(256, generator=g)
    b = b / b.norm() * a.norm()  # equal norms
    for t in (0.1, 0.25, 0.5, 0.9):
        assert float(slerp(a, b, t).norm()) == pytest.approx(float(a.norm()), rel=1e-6)
    mid = slerp(a, b, 0.5)
    assert _angle(a, mid) == pytest.approx(_angle(a, b) / 2, rel=1e-6)
    assert _angle(mid, b) == pytest.approx(_angle(a, b) / 2, rel=1e-6)
    # unlike a straight line, whose midpoint of two independent noises is ~sqrt(1/2) as long
    assert float(torch.lerp(a, b, 0.5).norm()) < 0.8 * float(a.norm())


def test_slerp_falls_back_to_lerp_for_nearly_parallel_vectors():
    a = torch.randn(64, generator=torch.Generator().manual_seed(2))
    b = a * 1.5 + 1e-4  # angle ~0: sin(theta) would divide by ~0
    out = slerp(a, b, 0.4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.lerp(a, b, 0.4), rtol=0, atol=1e-5)


# -- captions and bad inputs (no model loads) ---------------------------------------------------

def test_prompts_from_captions_sidecar_and_metadata(tmp_path):
    a, b = _inputs(tmp_path / "side")
    assert resolve_prompts(None, [a, b])[0] == [SCENES["a"].caption(), SCENES["b"].caption()]
    assert resolve_prompts("one text", [a, b]) == (["one text", "one text"], ["prompt", "prompt"])
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    shutil.copy(a, root / "images" / "x.png")
    (root / "metadata.csv").write_text('file_name,text\nimages/x.png,"red, round"\n')
    assert resolve_prompts(None, [root / "images" / "x.png", a])[0] == ["red, round", SCENES["a"].caption()]


@pytest.mark.parametrize("overrides, message", [
    (["loras=[{l},{l}]"], "images is not set. Fix: python -m sdtune.morph 'images=[a.png,b.png]'"),
    (["images=[{a}]", "loras=[{l},{l}]"], "images needs exactly two image files"),
    (["images=[{a},{d}/missing.png]", "loras=[{l},{l}]"], "images[1]='{d}/missing.png' is not a file"),
    (["images=[{a},{b}]", "loras=[{l},{l},{l}]"], "loras needs exactly two LoRA files"),
    (["images=[{a},{b}]"], "or train=true to train one single-image LoRA per image"),
    (["images=[{a},{b}]", "loras=[{l},{l}]", "train=true"], "Fix: drop loras=[...] or train=true"),
    (["images=[{a},{b}]", "loras=[{l},{l}]", "frames=0"], "frames must be a whole number >= 1, got 0. Fix: e.g. frames=10"),
    (["images=[{a},{b}]", "loras=[{l},{l}]", "guidance=0"], "guidance must be a number > 0"),
    (["images=[{u},{b}]", "loras=[{l},{l}]"], "Fix: pass prompt=\"...\" (used for both images), or write the caption"),
])
def test_bad_inputs_fail_before_any_model_loads(tmp_path, overrides, message):
    a, b = _inputs(tmp_path / "in")
    uncaptioned = tmp_path / "in" / "u.png"
    shutil.copy(a, uncaptioned)
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"not read: inputs are checked first")
    before = {p: _sha(p) for p in (a, b, uncaptioned, lora)}
    fmt = {"a": a, "b": b, "u": uncaptioned, "l": lora, "d": tmp_path / "in"}
    cfg = _compose(*(o.format(**fmt) for o in overrides))
    with pytest.raises(ConfigError) as err:
        morph(cfg, tmp_path / "out")
    assert message.format(**fmt) in str(err.value)
    assert not (tmp_path / "out").exists()
    assert {p: _sha(p) for p in before} == before


def test_a_family_that_cannot_morph_is_refused_before_anything_trains(tmp_path):
    """``ModelFamily.morph_refusal``: the reason, before any training or loading."""
    from sdtune.families import FAMILIES, register_family
    from sdtune.families.sd15 import SD15

    class NoMorph(SD15):
        name = "sd15_nomorph"
        morph_refusal = "its scheduler has no DDIM inversion (a test family)."

    a, b = _inputs(tmp_path / "in")
    register_family(NoMorph)
    try:
        cfg = _compose(f"images=[{a},{b}]", "train=true", "model=toy", f"model.family={NoMorph.name}")
        with pytest.raises(ConfigError, match=r"cannot morph with model.family=sd15_nomorph: its scheduler has no DDIM"):
            morph(cfg, tmp_path / "out")
    finally:
        FAMILIES.pop(NoMorph.name)
    assert not (tmp_path / "out").exists()


# -- DDIM inversion on the toy bases --------------------------------------------------------------

def _round_trip(family: str, steps: int) -> dict:
    """Invert each toy scene with its own caption and sample it back (no LoRA, guidance 1)."""
    fam, parts = build_parts({"family": family, "path": str(ROOT / TOY[family])})
    pipe = fam.build_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    inverse, forward = ddim_schedulers(parts.noise_scheduler.config)
    errors = {}
    for name, scene in SCENES.items():
        image = render(scene)
        latent = encode_image(pipe, image)
        cond = conditioning(pipe, scene.caption(), guidance=1.0)
        noise = invert(pipe, latent, cond, scheduler=inverse, steps=steps, size=64)
        assert 0.5 < float(noise.std()) < 2.0  # noise-like, not the clean latent handed back
        redrawn = sample(pipe, noise, cond, scheduler=forward, steps=steps, guidance=1.0, size=64)
        errors[name] = (pixel_error(image, redrawn), pixel_error(image, decode_latent(pipe, latent)))
    errors["distance"] = pixel_error(render(SCENES["a"]), render(SCENES["b"]))
    return errors


@pytest.mark.slow
def test_ddim_inversion_reproduces_the_input_on_the_toy_sd15_base():
    # Measured (50 steps): a 0.044, b 0.041; the VAE's own round trip 0.043 and 0.042; inputs 0.581 apart.
    errors = _round_trip("sd15", 50)
    for name in "ab":
        frame, vae = errors[name]
        assert frame < 0.3 * errors["distance"]
        assert frame < vae + 0.02  # inversion adds almost nothing to what the VAE loses
    assert errors["distance"] == pytest.approx(0.581, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "kolors"])
def test_ddim_inversion_works_through_the_sdxl_and_kolors_pipelines(family):
    # Measured (20 steps): sdxl a 0.054 b 0.042, kolors a 0.061 b 0.044 (VAE round trip 0.043/0.042);
    # at 10 steps a drifts to 0.079 (sdxl) and 0.095 (kolors). Without clip_sample=False (their Euler
    # configs lack the key and DDIM's default clips the predicted latent) image a came back at 0.45.
    errors = _round_trip(family, 20)
    for name in "ab":
        frame, vae = errors[name]
        assert frame < 0.3 * errors["distance"]
        assert frame < vae + 0.04


# -- the whole flow: train=true on the toy base, then the same LoRAs given as files -----------------

FRAMES, STEPS, TRAIN_STEPS = 4, 20, 60


@pytest.fixture(scope="module")
def trained_morph(tmp_path_factory) -> dict:
    """``python -m sdtune.morph images=[a,b] train=true model=toy`` (in process), captions from a.txt/b.txt."""
    root = tmp_path_factory.mktemp("morph")
    images = _inputs(root / "in")
    before = {p: _sha(p) for p in images}
    out = root / "out"
    cfg = _compose(f"images=[{images[0]},{images[1]}]", "train=true", "model=toy", f"frames={FRAMES}",
                   f"inversion_steps={STEPS}", f'train_overrides=["trainer.max_steps={TRAIN_STEPS}"]')
    written = morph(cfg, out)
    return {"images": images, "before": before, "out": out, "written": written}


@pytest.mark.slow
def test_morph_train_true_trains_two_loras_and_writes_every_output(trained_morph):
    out, images = trained_morph["out"], trained_morph["images"]
    assert {p: _sha(p) for p in images} == trained_morph["before"]  # the inputs are only read
    assert [p.name for p in trained_morph["written"]] == [f"frame_{i:03d}.png" for i in range(FRAMES + 1)]
    record = json.loads((out / "generation.json").read_text())
    assert record["t"] == [i / FRAMES for i in range(FRAMES + 1)]
    assert record["prompts"] == [SCENES["a"].caption(), SCENES["b"].caption()]
    assert record["prompt_sources"] == ["caption", "caption"]
    assert [im["sha256"] for im in record["images"]] == [trained_morph["before"][p] for p in images]
    for name, run in zip("ab", record["trained_runs"]):
        lora = Path(run) / f"lora_{name}.safetensors"
        assert Path(run).parent == out / "train" / name and lora.is_file()
        assert (out / "train" / name / "data" / "metadata.csv").read_text().splitlines()[1].startswith("image.png,")
        assert "max_steps: 60" in (Path(run) / "config.yaml").read_text()  # the override reached the trainer
    assert [lo["path"] for lo in record["loras"]] == [str(Path(r) / f"lora_{n}.safetensors")
                                                     for n, r in zip("ab", record["trained_runs"])]
    with Image.open(out / "frame_001.png") as frame:
        text = frame.text["parameters"]
    assert "<lora:lora_a:0.75> <lora:lora_b:0.25>" in text and text.endswith("Morph t: 0.25")
    assert text.startswith(SCENES["a"].caption())  # the nearer image's prompt
    with Image.open(out / "morph.gif") as gif:
        assert gif.n_frames == FRAMES + 1 and gif.info["loop"] == 0
    assert (out / "morph.mp4").stat().st_size > 0 and record["animations"] == ["morph.gif", "morph.mp4"]
    with Image.open(out / "strip.png") as strip:
        assert strip.width > (FRAMES + 1) * 160  # one tile per frame, enlarged from 64 px


@pytest.mark.slow
def test_morph_end_frames_redraw_the_inputs_and_the_middle_lies_between(trained_morph):
    out, (a_path, b_path) = trained_morph["out"], trained_morph["images"]
    a, b = Image.open(a_path).convert("RGB"), Image.open(b_path).convert("RGB")
    frames = [Image.open(p).convert("RGB") for p in trained_morph["written"]]
    distance = pixel_error(a, b)
    # Measured (60 training steps, 20 DDIM steps): frame 0 0.06 from a, the last 0.04 from b; 0.581 apart.
    assert pixel_error(frames[0], a) < 0.2 * distance
    assert pixel_error(frames[-1], b) < 0.2 * distance
    mid = frames[FRAMES // 2]
    assert pixel_error(mid, a) < 0.85 * distance and pixel_error(mid, b) < 0.85 * distance
    assert pixel_error(frames[1], a) < pixel_error(frames[1], b)  # t = 0.25: still nearer a
    assert pixel_error(frames[-2], b) < pixel_error(frames[-2], a)  # t = 0.75: nearer b
    rec = json.loads((out / "generation.json").read_text())["reconstruction"]
    assert rec["a"]["frame_error"] == pytest.approx(pixel_error(frames[0], a), abs=1e-4)
    assert rec["inputs_distance"] == pytest.approx(distance, abs=1e-4)
    assert rec["a"]["vae_roundtrip_error"] < rec["inputs_distance"] * 0.2


@pytest.mark.slow
def test_morph_with_two_given_lora_files_matches_the_trained_run(trained_morph, tmp_path):
    record = json.loads((trained_morph["out"] / "generation.json").read_text())
    a, b = trained_morph["images"]
    loras = [lo["path"] for lo in record["loras"]]
    prompts = ",".join(f'"{p}"' for p in record["prompts"])
    cfg = _compose(f"images=[{a},{b}]", f"loras=[{loras[0]},{loras[1]}]", f"prompt=[{prompts}]", "frames=2",
                   f"inversion_steps={STEPS}")  # base model: from the first LoRA's header
    written = morph(cfg, tmp_path / "given")
    assert len(written) == 3
    again = json.loads((tmp_path / "given" / "generation.json").read_text())
    assert again["trained_runs"] == [] and again["model"]["path"] == record["model"]["path"]
    # same LoRAs, prompts and steps: t = 0, 0.5, 1 are the trained run's frames 0, 2 and 4
    for mine, theirs in zip(written, ["frame_000.png", "frame_002.png", "frame_004.png"]):
        assert pixel_error(Image.open(mine), Image.open(trained_morph["out"] / theirs)) < 1 / 255
