"""The model checks of the data stage (data_pipeline.models): refusals before any image is read."""

from __future__ import annotations

import json

import pytest

from data_pipeline.errors import PipelineError
from data_pipeline.models import WD14, check_model, check_recipe_models, forbid_runtime_installs


def _check(value, kind="transformers"):
    check_model("image_nsfw_filter", "hf_nsfw_model", value, kind, "r.yaml")


def test_missing_and_broken_folders_are_refused_with_op_key_value_and_fix(tmp_path):
    with pytest.raises(PipelineError, match=r"r\.yaml: image_nsfw_filter\.hf_nsfw_model='/nonexistent/m' does not exist\. Fix: give a transformers"):
        _check("/nonexistent/m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="has no config.json"):
        _check(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PipelineError, match="config.json that is not valid JSON"):
        _check(str(bad))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}), encoding="utf-8")
    with pytest.raises(PipelineError, match="config.json transformers cannot read"):
        _check(str(unknown))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps({"model_type": "vit"}), encoding="utf-8")
    with pytest.raises(PipelineError, match=r"has no weights \(\*\.safetensors or \*\.bin\)"):
        _check(str(noweights))
    (noweights / "model.safetensors").write_bytes(b"")
    # data-juicer loads AutoProcessor next to the model: without one, the run failed mid-batch, garbled
    with pytest.raises(PipelineError, match=r"has no processor transformers can load \(AutoProcessor: "
                                            r"ValueError: Unrecognized processing class in .*noweights\)\. Fix: give a "
                                            r"transformers model folder \(config.json, \.safetensors weights and "
                                            r"the processor's files"):
        _check(str(noweights))
    (noweights / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    _check(str(noweights))  # complete enough: the op's own load reports a corrupt file with data-juicer's log


def test_wd14_folders_need_the_onnx_model_and_the_tag_list(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(PipelineError, match="has no selected_tags.csv"):
        _check(str(tmp_path), WD14)
    (tmp_path / "selected_tags.csv").write_text("tag_id,name,category,count\n", encoding="utf-8")
    _check(str(tmp_path), WD14)


def test_a_hub_id_that_cannot_be_fetched_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(PipelineError, match=r"'Falconsai/nsfw_image_detection' is not a local folder, and the Hugging Face Hub did not give its config.json"):
        check_recipe_models([("image_nsfw_filter", {})], "r.yaml")  # the op's default model, a Hub id


def test_a_hub_tagger_needs_its_onnx_model_too(monkeypatch):
    """Catches a Hub tagger whose tag list is fetched but whose model.onnx is not (the run would fail late)."""
    import huggingface_hub

    asked = []

    def download(repo, filename, **kwargs):
        asked.append(filename)
        if filename == "model.onnx":
            raise OSError(f"{repo} has no file {filename}")
        return "/cache/selected_tags.csv"

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(PipelineError, match=r"sdtune_image_tagger\.model='org/wd-tagger' is not a local folder, and "
                                            r"the Hugging Face Hub did not give its model\.onnx \(org/wd-tagger has"):
        check_model("sdtune_image_tagger", "model", "org/wd-tagger", WD14, "r.yaml")
    assert asked == ["selected_tags.csv", "model.onnx"]


def test_the_stage_never_pip_installs_a_missing_operator_package():
    from data_juicer.utils.lazy_loader import LazyLoader

    forbid_runtime_installs()
    lazy = LazyLoader("sdtune_no_such_module_xyz", "sdtune-no-such-package")
    with pytest.raises(ImportError, match="never installs packages while it runs"):
        _ = lazy.anything


def test_a_model_that_needs_its_own_code_is_refused_with_the_switch_and_never_prompts(tmp_path):
    """Catches the check loading a remote-code model without ``trust_remote_code`` (transformers would ask
    "run the custom code? [y/N]" on a terminal) and a message that does not name the op's switch."""
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "sdtune-custom", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig"}}), encoding="utf-8")
    with pytest.raises(PipelineError, match="needs its own code: set trust_remote_code: true on the op if you trust it"):
        _check(str(folder))
