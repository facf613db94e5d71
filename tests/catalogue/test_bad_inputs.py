"""The bad-input catalogue: each case gives its clear error, or its documented skip with a count,
and never changes a file the user gave us.

Truncated images and decompression bombs are in ``test_catalogue_data.py`` (every image is decoded
before training), with the other cases of unreadable data."""

from __future__ import annotations

import logging

import lightning as L
import pytest
from PIL import Image

from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.records import load_records
from sdtune.lora.files import read_lora
from sdtune.run.train import train
from sdtune.training.checkpointing import load_checkpoint
from sdtune.training.module import LoRATrainingModule
from sdtune.utils.errors import ConfigError, DataError, LoraFileError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_cfg, resolved
from tests.helpers.files import snapshot


class RunsCodeWhenUnpickled:
    """What a malicious .ckpt carries: unpickling it would call a function of the attacker's choice."""

    def __reduce__(self):
        return (print, ("this would have run arbitrary code",))


def _fails(cfg_overrides, root, tmp_path, error, message):
    before = snapshot(root)
    cfg = compose_cfg("experiment=quickstart", f"data.root={root}", *cfg_overrides, output_dir=tmp_path / "run")
    with pytest.raises(error, match=message):
        train(cfg, tmp_path / "run")
    assert snapshot(root) == before


def test_missing_file_named_in_metadata(dataset, tmp_path):
    (dataset / "images" / "1.png").unlink()
    _fails([], dataset, tmp_path, DataError, r"names 1 file\(s\) that do not exist .*row 3: 'images/1.png'")


def test_empty_caption_trains_unconditionally_with_a_counted_warning(dataset, caplog):
    meta = dataset / "metadata.csv"
    meta.write_text(meta.read_text().replace("caption 1", ""))
    before = snapshot(dataset)
    with caplog.at_level(logging.WARNING):
        records = load_records(dataset)
    assert [r.text for r in records][1] == ""
    assert "1 of 4 images have an empty caption; they train unconditionally" in caplog.text
    assert snapshot(dataset) == before


def test_caption_over_the_token_limit_is_truncated_with_one_warning(dataset, tmp_path, caplog):
    meta = dataset / "metadata.csv"
    meta.write_text(meta.read_text().replace("caption 0", "a very long caption " * 30))
    before = snapshot(dataset)
    cfg = resolved(compose_cfg("experiment=quickstart", f"data.root={dataset}", "train.cache_text_embeddings=false",
                               output_dir=tmp_path))
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    dm = ImageCaptionDataModule.from_config(load_records(dataset), cfg["data"])
    with caplog.at_level(logging.WARNING, logger="sdtune.training.module"):
        L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module, datamodule=dm)
    warnings = [r for r in caplog.records if "longer than the 77-token limit" in r.getMessage()]
    assert len(warnings) == 1 and "1 caption(s)" in warnings[0].getMessage()  # once per run, not per step
    assert snapshot(dataset) == before


def test_images_smaller_than_the_resolution_are_upscaled_with_a_count(dataset, caplog):
    Image.new("RGB", (40, 30), (1, 2, 3)).save(dataset / "images" / "3.png")
    before = snapshot(dataset)
    with caplog.at_level(logging.WARNING):
        dm = ImageCaptionDataModule(load_records(dataset), resolution=64)
    assert "1 of 4 images are smaller than data.resolution=64 and are upscaled" in caplog.text
    assert dm.dataset[3]["pixel_values"].shape == (3, 64, 64)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ImageCaptionDataModule(load_records(dataset), resolution=64, bucketing=True, bucket_step=16)
    assert "upscaled" not in caplog.text  # buckets keep small images small
    assert snapshot(dataset) == before


def test_metadata_that_is_not_utf8(dataset, tmp_path):
    (dataset / "metadata.csv").write_bytes("file_name,text\nimages/0.png,caf\xe9 cr\xe8me\n".encode("latin-1"))
    _fails([], dataset, tmp_path, DataError, r"metadata.csv is not UTF-8 .*Fix: save it as UTF-8")


def test_duplicate_file_name(dataset, tmp_path):
    meta = dataset / "metadata.csv"
    meta.write_text(meta.read_text() + "images/1.png,again\n")
    _fails([], dataset, tmp_path, DataError, r"lists 1 file_name\(s\) more than once: 'images/1.png' \(rows 3 and 6\).*data.repeats")


def test_config_with_a_wrong_type(dataset, tmp_path):
    _fails(["lora.rank=abc"], dataset, tmp_path, ConfigError, r"lora.rank must be an integer >= 1, got 'abc'")


def test_unknown_config_key_gets_our_did_you_mean(tmp_path):
    proc = run_cli("experiment=quickstart", "lora.rnak=8", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "lora.rnak is not a setting of sdtune and would be ignored. Did you mean lora.rank?" in proc.stderr
    assert "is not in struct" not in proc.stderr


@pytest.mark.parametrize("kind", ["not-safetensors", "truncated"])
def test_lora_file_that_is_not_safetensors_or_truncated(tmp_path, kind):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    if kind == "truncated":
        save_file({"unet.a.lora.down.weight": torch.zeros(64, 64)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    else:
        torch.save({"a": torch.zeros(2)}, path)  # a pickle wearing a .safetensors name
    before = path.read_bytes()
    with pytest.raises(LoraFileError, match=r"x.safetensors' is not a readable .safetensors file"):
        read_lora(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["pickle-with-code", "truncated"])
def test_checkpoint_that_is_unsafe_or_truncated(tmp_path, kind, dataset):
    import torch

    path = tmp_path / "bad.ckpt"
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "sdtune": {}, "hyper_parameters": {}}, path)
        path.write_bytes(path.read_bytes()[:-200])
    else:
        torch.save({"state_dict": {}, "sdtune": {}, "hyper_parameters": {}, "x": RunsCodeWhenUnpickled()}, path)
    before = path.read_bytes()
    with pytest.raises(LoraFileError, match=r"bad.ckpt' is not a readable sdtune checkpoint"):
        load_checkpoint(path)  # weights_only: arbitrary objects are refused, not unpickled
    _fails([f"ckpt_path={path}"], dataset, tmp_path, LoraFileError, r"is not a readable sdtune checkpoint")
    assert path.read_bytes() == before
