"""Finding the base model: local folders, the offline hub cache, and fast clear failures."""

from __future__ import annotations

import shutil

import pytest

from sdtune.families import get_family, resolve_model_source
from sdtune.utils.errors import ModelLoadError


def test_local_folder_is_used_as_is(tiny_sd15):
    assert resolve_model_source(str(tiny_sd15), family="sd15") == str(tiny_sd15)


@pytest.mark.parametrize("path", ["/no/such/folder", "./relative/missing", "model.safetensors", "bare-name"])
def test_missing_local_paths_fail_at_once(path):
    with pytest.raises(ModelLoadError, match=r"model.path=.* does not exist\.\nFix: set model.path .*experiment=quickstart"):
        resolve_model_source(path, family="sd15")


def test_unreachable_or_unknown_hub_id_fails_with_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match=r"(?s)sdtune-tests/no-such-model.*not in the local hub cache.*Fix: set model.path"):
        resolve_model_source("sdtune-tests/no-such-model", family="sd15", cache_dir=str(tmp_path))


def test_hub_id_found_in_the_local_hub_cache_loads_offline(tmp_path, tiny_sd15):
    # The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "models--sdtune-tests--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_sd15, repo / "snapshots" / commit)
    source = resolve_model_source("sdtune-tests/tiny", family="sd15", cache_dir=str(tmp_path))
    assert source == str(repo / "snapshots" / commit)
    parts = get_family("sd15").load(source)
    assert parts.unet.config.cross_attention_dim == 32


def test_a_bad_vae_path_is_named_as_the_vae(tiny_sd15, tmp_path):
    with pytest.raises(ModelLoadError, match=r"(?s)Could not load the VAE from model.vae_path=.*no_vae.*Fix: point model.vae_path"):
        get_family("sd15").load(str(tiny_sd15), vae_path=str(tmp_path / "no_vae"))


def test_family_load_wraps_broken_folders(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"(?s)Could not load the sd15 base model from model.path=.*Fix:"):
        get_family("sd15").load(str(tmp_path))
