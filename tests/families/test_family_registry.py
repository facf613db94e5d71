"""A fourth model family is one file: defined and registered here, with no edit anywhere else,
it builds its tiny model, trains, exports kohya names by its own rule, loads back, and the bench
counts its FLOPs. If any of those paths still compared family names, this family would fall
through to another family's behaviour and an assertion below would catch it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sdtune.families import FAMILIES, get_family, register_family
from sdtune.families.sd15 import SD15
from sdtune.families.tiny import ensure_tiny_model
from sdtune.lora.files import read_lora
from tests.helpers.cli import run_main
from tests.helpers.paths import CACHE


class SGMNamedSD15(SD15):
    """SD1.5's architecture under another name, with two facts of its own: kohya files use the
    original SGM block names (as SDXL's do), and there is no single-file layout."""

    name = "sd15_sgm"
    base_model_version = "sd15_sgm_v0"
    kohya_sgm_names = True
    single_file_pipeline = None
    single_file_text_encoders = ()


@pytest.fixture
def fourth_family():
    register_family(SGMNamedSD15)
    try:
        yield get_family(SGMNamedSD15.name)
    finally:
        FAMILIES.pop(SGMNamedSD15.name)


def test_registering_a_taken_name_is_refused():
    class Impostor(SD15):
        name = "sdxl"

    with pytest.raises(ValueError, match="'sdxl' is already registered"):
        register_family(Impostor)
    assert FAMILIES["sdxl"].__name__ == "SDXL"


def test_a_fourth_family_trains_exports_and_is_benchmarked_through_the_registry(capsys, tmp_path, fourth_family):
    from sdtune.bench.flops import count_step_flops
    from sdtune.export import main as export_main

    folder = ensure_tiny_model(fourth_family.name, CACHE / f"tiny-{fourth_family.name}")
    assert json.loads((folder / "sdtune_tiny.json").read_text())["family"] == fourth_family.name
    run = tmp_path / "run"
    code, err = run_main(capsys, "experiment=quickstart", "model=tiny", f"model.family={fourth_family.name}",
                         f"model.path={folder}", "trainer.max_steps=4", "callbacks.samples=null",
                         "callbacks.concept_probe=null", "data.val_images=0", f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    lora = read_lora(run / "lora.safetensors")
    assert lora.family == fourth_family.name
    assert lora.metadata["ss_base_model_version"] == "sd15_sgm_v0"

    # the run's kohya file: this family's naming rule (SGM blocks), not SD1.5's (diffusers paths)
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                        for k in keys), keys[:3]
    # ... it resolves against this family's UNet to the tensors of its diffusers-layout export
    diffusers = tmp_path / "diffusers.safetensors"
    assert export_main([str(run / "lora.safetensors"), "--format", "diffusers", "--out", str(diffusers)]) == 0
    trained = read_lora(diffusers).tensors
    parts = fourth_family.load(str(folder))
    names = [n for n, _ in parts.unet.named_modules()]
    resolved = lora.peft_tensors(names, parts.unet.config, family=fourth_family.name)
    assert resolved.keys() == trained.keys() and resolved
    assert all(torch.equal(resolved[k], trained[k]) for k in resolved)

    # the bench counts its step FLOPs (same architecture as SD1.5: the same count)
    from tests.helpers.config import bench_cfg

    cfg = bench_cfg("model=tiny", f"model.family={fourth_family.name}", f"model.path={folder}", "data.batch_size=1")
    batch = {"pixel_values": torch.zeros(1, 3, 64, 64)}
    twin = count_step_flops(cfg, batch, folder=folder)
    plain = count_step_flops({**cfg, "model": {**cfg["model"], "family": "sd15"}}, batch, folder=folder)
    assert twin["fwd_bwd"] > 0 and twin == plain
