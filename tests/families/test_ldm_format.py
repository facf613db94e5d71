"""Single-file checkpoints: our diffusers -> original-layout tables against diffusers' own reader."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdtune.families import get_family, resolve_model_source
from sdtune.families.ldm_format import pipeline_to_original
from sdtune.training.module import LoRATrainingModule
from sdtune.utils.errors import ModelLoadError
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.models import tiny_model


def _single_file(family: str, tmp_path):
    parts = get_family(family).load(str(tiny_model(family)))
    state = pipeline_to_original(get_family(family), parts.unet, parts.vae, parts.text_encoders)
    path = tmp_path / f"{family}.safetensors"
    save_file(state, str(path))
    return parts, path, state


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_round_trips_through_diffusers_reader(family, tmp_path):
    folder_parts, path, state = _single_file(family, tmp_path)
    prefixes = {k.split(".", 1)[0] for k in state}
    assert "model" in prefixes and "first_stage_model" in prefixes
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in state)  # original names, not diffusers'
    loaded = get_family(family).load(str(path), config=str(tiny_model(family)))
    pairs = [(folder_parts.unet, loaded.unet), (folder_parts.vae, loaded.vae)]
    pairs += list(zip(folder_parts.text_encoders, loaded.text_encoders))
    assert len(loaded.text_encoders) == len(folder_parts.text_encoders)
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys(), type(ours).__name__
        for k in a:
            assert torch.equal(a[k], b[k].reshape(a[k].shape)), (type(ours).__name__, k)


def test_training_module_sets_up_from_a_single_file(tmp_path):
    _, path, _ = _single_file("sdxl", tmp_path)
    cfg = compose_cfg("experiment=quickstart", "model=tiny_sdxl", f"model.path={path}", "model.tiny=false",
                      f"model.config={tiny_model('sdxl')}", output_dir=tmp_path)
    module = LoRATrainingModule(resolved(cfg))
    module.setup("fit")
    assert module.parts.source == str(path)
    assert any(".lora_A." in n for n, _ in module.unet.named_parameters())


def test_single_file_without_configs_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, path, _ = _single_file("sd15", tmp_path)
    with pytest.raises(ModelLoadError, match=r"single-file checkpoint model.path=.*set model.config to a diffusers folder"):
        get_family("sd15").load(str(path))


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelLoadError, match=r"pickle-based checkpoint.*model.allow_pickle=true"):
        resolve_model_source(str(ckpt), family="sd15")
    assert resolve_model_source(str(ckpt), family="sd15", allow_pickle=True) == str(ckpt)


def test_kolors_single_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "kolors.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match=r"single file, but kolors models are only published as diffusers folders"):
        get_family("kolors").load(str(path))
