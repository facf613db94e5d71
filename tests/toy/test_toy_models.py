"""The committed toy base models: small, loaded through the ordinary path, and they draw what is asked.

``models/toy/<family>`` are diffusers folders built by ``python -m sdtune.toy.build``. These tests
load them exactly as ``model=toy*`` does and read what they draw with the probe: if a change to
loading, prompting or sampling breaks a family, its shapes and colours stop matching the prompts.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.toy.build import FAMILIES, TOY_ROOT
from sdtune.toy.evaluate import evaluate_pipeline
from sdtune.toy.pretrain import uses_toy_schedule
from tests.helpers.config import compose_cfg, resolved


def test_toy_folders_are_small_half_precision_diffusers_folders():
    files = [p for p in TOY_ROOT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    for family in FAMILIES:
        folder, denoiser = TOY_ROOT / family, get_family(family).denoiser_subfolder
        assert json.loads((folder / "sdtune_toy.json").read_text())["family"] == family
        assert (folder / "model_index.json").is_file() and (folder / denoiser / "config.json").is_file()
        with safe_open(str(folder / denoiser / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
        schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        if uses_toy_schedule(get_family(family)):
            assert (schedule["prediction_type"], schedule["timestep_spacing"]) == ("v_prediction", "trailing")
        else:  # flow matching keeps the family's own scheduler
            assert schedule["_class_name"] == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize(("model", "family"), [("toy", "sd15"), ("toy_sdxl", "sdxl"), ("toy_kolors", "kolors")])
def test_toy_base_draws_the_prompted_colour_and_shape(tmp_path, model, family):
    """Through `model=<toy>` (config -> from_pretrained), every palette prompt at one seed."""
    cfg = resolved(compose_cfg(f"model={model}", output_dir=tmp_path / "run"))
    assert cfg["model"]["path"] == str(TOY_ROOT / family)
    fam, parts = build_parts(cfg["model"])
    assert fam.name == get_family(family).name == family
    pipe = fam.build_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    score, _ = evaluate_pipeline(pipe, fam)  # the prompts, seeds and settings of models/toy/REPORT.md
    built = json.loads((TOY_ROOT / "report.json").read_text())["probe"][family]
    # What the build measured, less a margin for another CPU's rounding; chance is 1/6 for the
    # colour and 1/18 for both, and a loading or prompting bug lands near chance.
    assert score.colour >= built["colour"] - 0.15 and score.colour >= 0.75, (score, built)
    assert score.both >= built["both"] - 0.15 and score.both >= 0.4, (score, built)


@pytest.mark.slow
def test_rescore_remeasures_one_family_and_keeps_the_others(tmp_path):
    """``build --rescore --families sd15``: fresh figures and grid for sd15 at the report's guidance,
    the sweep in REPORT.md, and the other families' recorded figures untouched."""
    import shutil

    from sdtune.toy.build import GUIDANCE, main

    out = tmp_path / "toy"
    shutil.copytree(TOY_ROOT / "sd15", out / "sd15")
    old = json.loads((TOY_ROOT / "report.json").read_text())
    old["probe"]["sd15"] = {"shape": 0.0, "colour": 0.0, "both": 0.0}  # stale figures to be replaced
    (out / "report.json").write_text(json.dumps(old))
    assert main(["--out", str(out), "--families", "sd15", "--rescore"]) == 0
    new = json.loads((out / "report.json").read_text())
    family = get_family("sd15")
    score, _ = evaluate_pipeline(family.build_pipeline(family.load(str(out / "sd15"))), family, guidance=GUIDANCE)
    assert new["probe"]["sd15"] == {"shape": score.shape, "colour": score.colour, "both": score.both}
    assert new["probe"]["kolors"] == old["probe"]["kolors"] and new["seconds"] == old["seconds"]
    assert new["guidance_sweep"]["sd15"][f"{GUIDANCE:g}"] == new["probe"]["sd15"]
    row = f"| sd15 | {GUIDANCE:g} | {score.shape:.0%} | {score.colour:.0%} | {score.both:.0%} |"  # the headline guidance column
    assert row in (out / "REPORT.md").read_text()
    assert (out / "sd15.png").is_file()
