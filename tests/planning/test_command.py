"""``python -m sdtune.plan``: exit codes, the table's rows, the verdict for ``--gb`` and the suggestions."""

from __future__ import annotations

import sys

import pytest
import torch

from sdtune import plan as command
from sdtune.families import get_family
from sdtune.families.checks import frozen_weight_bytes
from sdtune.utils.errors import ConfigError
from tests.helpers.models import tiny_model

TINY = ["model=tiny", "trainer=cpu", "trainer.precision=32"]


def exit_code(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setattr(sys, "argv", ["sdtune-plan", *argv])
    with pytest.raises(SystemExit) as stop:
        command.main()
    return stop.value.code


def test_bad_arguments_exit_2_with_the_fix(monkeypatch, capsys):
    assert exit_code(monkeypatch, ["--gb", "lots", *TINY]) == 2
    assert "--gb 'lots' is not a number of GiB. Fix: e.g. --gb 24." in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be a positive number"):
        command.split_gb(["--gb=0"])
    assert command.split_gb(["--gb=12.5", "model=sdxl"]) == (12.5, ["model=sdxl"])


def test_the_runs_own_validation_comes_first(monkeypatch, capsys):
    assert exit_code(monkeypatch, [*TINY, "lora.rank=0"]) == 2
    assert "lora.rank" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_plan_table_verdict_and_suggestions(monkeypatch, capsys):
    tiny_model("sd15")
    assert exit_code(monkeypatch, [*TINY, "data.batch_size=2", "--gb", "8"]) == 0
    out = capsys.readouterr().out
    for name in ("denoiser weights (fp32)", "LoRA weights (fp32)", "LoRA gradients", "optimizer state (AdamW: 2 x fp32)",
                 "activations (not checkpointed, batch 2)", "CUDA context + allocator (constant)"):
        assert name in out, name
    assert "verdict: fits a 8 GiB card" in out
    # the 768 MiB constant alone is more; at batch 64 the activations are big enough (about 80 MiB) for
    # checkpointing and batch 1 to save the 1% a suggestion must
    assert exit_code(monkeypatch, [*TINY, "data.batch_size=64", "--gb", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "verdict: does NOT fit a 0.5 GiB card" in out
    assert "train.gradient_checkpointing=true" in out and "data.batch_size=1" in out
    # the sample grid: the text encoders and the VAE back beside the denoiser, 8 pictures a call at 64²
    assert "sampling" in out and "drawing samples (8 a call, 64²)" in out
    assert exit_code(monkeypatch, [*TINY, "callbacks.samples=null", "--gb", "8"]) == 0
    assert "drawing samples" not in capsys.readouterr().out


@pytest.mark.slow
def test_full_size_sd15_plan(capsys):
    status = command.run(["experiment=sd15_lora", "--gb", "4"])
    out = capsys.readouterr().out
    assert status == 1 and "verdict: does NOT fit a 4 GiB card" in out
    family = get_family("sd15")
    unet = frozen_weight_bytes(family, None, ["denoiser"], torch.float16)["denoiser"]
    assert "denoiser weights (fp16)" in out and f"{unet / 2**30:.2f} GiB" in out  # 859.5 M parameters in fp16
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    suggested = {line.split()[0]: line for line in lines}
    assert "train.gradient_checkpointing=true" in suggested and "model.quantize=int8" in suggested
    assert command.run(["experiment=sd15_lora", "--gb", "12"]) == 0
