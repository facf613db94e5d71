"""``data.num_workers: auto`` / ``data.pin_memory: auto`` (sdtune.data.loader) and the
``trainer.nonfinite_check_every`` setting: resolved per device, printed once, validated."""

from __future__ import annotations

import logging

import lightning as L
import pytest

from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.loader import loader_settings
from sdtune.data.records import load_records
from sdtune.run.checks import validate
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg
from tests.helpers.paths import QUICKSTART


@pytest.mark.parametrize("device, cores, processes, expected", [
    ("cuda", 16, 1, (4, True)),   # capped at 4
    ("cuda", 4, 1, (3, True)),    # one core stays with the training process
    ("cuda", 2, 1, (1, True)),
    ("cuda", 1, 1, (0, True)),
    ("cuda", 8, 2, (3, True)),    # two DDP processes share the machine's cores
    ("cpu", 16, 1, (0, False)),   # the CPU step needs the cores itself (docs/benchmarks.md)
    ("mps", 8, 1, (0, False)),
])
def test_auto_loader_settings_follow_the_device_and_the_cores(device, cores, processes, expected):
    assert loader_settings("auto", "auto", device_type=device, processes_per_node=processes, cores=cores) == expected


def test_explicit_loader_settings_are_kept_on_any_device():
    assert loader_settings(2, False, device_type="cuda", cores=16) == (2, False)
    assert loader_settings(0, True, device_type="cpu", cores=16) == (0, True)


def test_the_datamodule_resolves_auto_for_the_trainers_device_and_says_so(caplog):
    cfg = compose_cfg("experiment=quickstart")
    assert cfg.data.num_workers == "auto" and cfg.data.pin_memory == "auto"  # the shipped defaults
    records = load_records(QUICKSTART)
    dm = ImageCaptionDataModule.from_config(records, {**cfg.data, "root": str(QUICKSTART), "resolution": 64})
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.INFO, logger="sdtune.data.datamodule"):
        dm.setup("fit")
    assert "data loader: 0 worker process(es), pin_memory=False (data.num_workers and data.pin_memory=auto on cpu)" in caplog.text
    loader = dm.train_dataloader()
    assert loader.num_workers == 0 and not loader.pin_memory and not loader.persistent_workers


@pytest.mark.parametrize("override, message", [
    ("data.num_workers=many", r"data.num_workers must be an integer >= 0, got 'many'.*or auto"),
    ("data.num_workers=-1", r"data.num_workers must be >= 0, got -1"),
    ("data.pin_memory=yes", r"data.pin_memory must be true, false or auto.*got 'yes'"),
    ("trainer.nonfinite_check_every=0", r"trainer.nonfinite_check_every must be >= 1, got 0.*Fix: e.g."),
])
def test_bad_loader_and_check_settings_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("model=tiny", f"data.root={tmp_path}", override))


def test_the_nonfinite_check_interval_defaults_to_the_logging_interval():
    assert compose_cfg().trainer.nonfinite_check_every == 10
    assert compose_cfg("experiment=quickstart").trainer.nonfinite_check_every == 5  # its log_every_n_steps
    assert compose_cfg("trainer.log_every_n_steps=50").trainer.nonfinite_check_every == 50
