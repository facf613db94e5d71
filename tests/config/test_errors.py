"""Bad input gets one clear error naming the thing and the fix, before any model is loaded."""

from __future__ import annotations

import shutil

import pytest

from sdtune.run.train import train
from sdtune.utils.errors import ConfigError, DataError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_cfg
from tests.helpers.paths import QUICKSTART


def _data_with(tmp_path, csv: str):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    shutil.copy(QUICKSTART / "images" / "sks_00_red_circle.png", root / "images" / "a.png")
    (root / "metadata.csv").write_text(csv)
    return root


CASES = [
    ("missing-data-folder", lambda t: ["data.root=" + str(t / "absent")], DataError, r"data.root='.*absent' does not exist"),
    ("no-images", lambda t: (t / "empty").mkdir() or ["data.root=" + str(t / "empty")], DataError, r"holds no images"),
    (
        "no-file_name-column",
        lambda t: ["data.root=" + str(_data_with(t, "path,caption\nimages/a.png,x\n"))],
        DataError,
        r"metadata.csv has no 'file_name' or 'text' column",
    ),
    (
        "file_name-missing",
        lambda t: ["data.root=" + str(_data_with(t, "file_name,text\nimages/zz.png,x\n"))],
        DataError,
        r"do not exist .*row 2: 'images/zz.png'",
    ),
    ("rank-zero", lambda t: ["lora.rank=0"], ConfigError, r"lora.rank must be >= 1, got 0"),
    ("rank-negative", lambda t: ["lora.rank=-4"], ConfigError, r"lora.rank must be >= 1, got -4"),
    ("rank-not-a-number", lambda t: ["lora.rank=abc"], ConfigError, r"lora.rank must be an integer >= 1, got 'abc'"),
    ("resolution-not-multiple-of-8", lambda t: ["data.resolution=100"], ConfigError, r"data.resolution=100 is not divisible by 8.*use 96 or 104"),
    ("optimized-val-loss-without-val", lambda t: ["optimized_metric=val/loss", "data.val_images=0"], ConfigError,
     r"optimized_metric=val/loss, but data.val_images=0 logs no validation loss. Fix: data.val_images=4"),
    ("keep-last-zero", lambda t: ["callbacks.model_checkpoint.keep_last=0"], ConfigError,
     r"callbacks.model_checkpoint.keep_last must be >= 1, got 0. Fix: e.g. keep_last=3"),
    ("guidance-zero", lambda t: ["model.guidance=0"], ConfigError, r"model.guidance must be > 0, got 0"),
    ("precision", lambda t: ["trainer.precision=64"], ConfigError, r"trainer.precision='64' is not supported"),
    ("pissa-init", lambda t: ["lora.init=pissa"], ConfigError, r"lora.init must be one of \['gaussian', True, False\]"),
    # Hydra's own hint for an unknown key is "+key=value", which would add it silently: a typo trained at rank 4
    ("typo-added-with-plus", lambda t: ["+lora.rnak=8"], ConfigError,
     r"lora.rnak is not a setting of sdtune and would be ignored. Did you mean lora.rank\? Fix: lora.rank=<value> \(without \+\)"),
    ("unknown-data-key", lambda t: ["+data.captoin_dropout=0.1"], ConfigError, r"Did you mean data.caption_dropout\?"),
    ("unknown-train-key", lambda t: ["+train.snr=5"], ConfigError, r"train.snr is not a setting of sdtune"),
]


@pytest.mark.parametrize(("name", "overrides", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_before_model_load(tmp_path, name, overrides, error, message):
    model_dir = tmp_path / "model-never-built"
    cfg = compose_cfg("experiment=quickstart", f"model.path={model_dir}", *overrides(tmp_path), output_dir=tmp_path / "run")
    with pytest.raises(error, match=message):
        train(cfg, tmp_path / "run")
    assert not model_dir.exists()  # the tiny model would be built by the first model load


def test_cli_prints_clean_error_and_exit_code(tmp_path):
    proc = run_cli("experiment=quickstart", f"data.root={tmp_path / 'absent'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "error: data.root=" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_lists_choices(tmp_path):
    proc = run_cli("model=sd99", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "Could not find 'model/sd99'" in proc.stderr
    assert "Available options in 'model'" in proc.stderr and "sd15" in proc.stderr and "tiny" in proc.stderr


def test_fp16_on_a_cpu_is_refused_with_the_fix(tmp_path):
    cfg = compose_cfg("experiment=quickstart", "trainer=default", "trainer.accelerator=cpu", output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed needs a CUDA GPU.*trainer=cpu"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unset_data_root_says_how_to_fix(tmp_path):
    cfg = compose_cfg(output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.root is not set.*experiment=quickstart"):
        train(cfg, tmp_path)


@pytest.mark.parametrize(("overrides", "message"), [
    (["lora.text_encoder={rank: 2}", "lora.type=loha"], r"lora.text_encoder .* not combined with lora.type=loha"),
    (["lora.text_encoder={rank: 2}", "lora.use_dora=true"], r"lora.text_encoder .* lora.use_dora=true \(DoRA\).*Fix: lora.use_dora=false"),
    (["lora.text_encoder={rank: 2}", "embedding=ti", "embedding.tokens=[olq]", "embedding.init=blue"],
     r"embedding .* and lora.text_encoder are not combined"),
])
def test_method_combinations_without_a_loadable_file_are_refused(overrides, message):
    """Text-encoder LoRA beside DoRA/LoHa/LoKr, or beside new token embeddings, would write files no
    tool loads as trained: refused before anything loads, naming both keys."""
    from sdtune.run.checks import validate

    cfg = compose_cfg("experiment=quickstart", *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
