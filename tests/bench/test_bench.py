"""The bench: FLOP counts of the full-size architectures (meta device) and a short real run's CSV.

Speed itself is measured by ``make bench``, not asserted here; these tests check that what the
bench counts and writes is right and self-consistent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from sdtune.bench.cases import Case, cases_from_config, models_to_run, plan_for
from sdtune.bench.flops import count_step_flops
from sdtune.bench.measure import MemoryMeter
from sdtune.bench.runner import first_batch
from sdtune.bench.table import COLUMNS, check_targets
from sdtune.data.records import load_records
from sdtune.families.arch import build_random_parts, parameter_count
from tests.helpers.cli import run_cli
from tests.helpers.config import bench_cfg


@pytest.mark.parametrize(
    ("model", "resolution", "expected_tflop"),
    [("sd15", 512, 1.72), pytest.param("sdxl", 1024, 14.2, marks=pytest.mark.slow)],  # SDXL on meta: ~9 s
)
def test_full_size_step_flops_on_the_meta_device(model, resolution, expected_tflop):
    cfg = bench_cfg(f"model={model}", "bench.random_init=true", "data.batch_size=1", "lora.rank=16")
    assert cfg["data"]["resolution"] == resolution
    batch = first_batch(cfg, load_records(cfg["data"]["root"]))
    meter = MemoryMeter(torch.device("cpu"))
    meter.begin_case()
    meter.begin_loop()
    flops = count_step_flops(cfg, batch)
    # fp32 weights would be 3.4 GB (SD1.5 UNet) or 10 GB (SDXL UNet): the count allocated none of them.
    assert meter.peak_mb() < 1000
    assert flops["fwd_bwd"] / 1e12 == pytest.approx(expected_tflop, rel=0.05)
    # Backward with a frozen base: activation gradients everywhere, weight gradients for LoRA only,
    # so fwd+bwd is about 2.1x the forward, not the 3x of full fine-tuning.
    assert 1.9 < flops["fwd_bwd"] / flops["fwd"] < 2.3
    if model == "sd15":
        assert flops["fwd"] / 1e9 == pytest.approx(808, rel=0.02)


@pytest.mark.slow  # four meta-device FLOP counts, ~8 s
def test_flops_scale_with_lora_rank_and_batch():
    base = bench_cfg("model=sd15", "bench.random_init=true", "data.batch_size=1", "data.resolution=256")
    batch = first_batch(base, load_records(base["data"]["root"]))
    r16 = count_step_flops(base, batch)
    r64 = count_step_flops({**base, "lora": {**base["lora"], "rank": 64, "alpha": 64}}, batch)
    assert r64["lora_params"] == 4 * r16["lora_params"]
    assert r64["fwd_bwd"] > r16["fwd_bwd"]  # the LoRA matmuls (and their weight gradients) are counted
    two = {**base, "data": {**base["data"], "batch_size": 2}}
    assert count_step_flops(two, first_batch(two, load_records(base["data"]["root"])))["fwd_bwd"] == pytest.approx(r16["fwd_bwd"])


@pytest.mark.parametrize(
    ("family", "unet_params", "encoder_params"),
    [
        ("sd15", 859_520_964, [123_060_480]),
        ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),
        ("kolors", None, [6_243_584_000]),
    ],
)
def test_shipped_configs_are_the_published_architectures(family, unet_params, encoder_params):
    parts = build_random_parts(family, device="meta")
    assert all(p.is_meta for p in parts.unet.parameters())
    if unet_params is not None:
        assert parameter_count(parts.unet) == unet_params
    else:  # Kolors: SDXL's UNet plus a 4096 -> 2048 text projection and a wider pooled input
        sdxl = build_random_parts("sdxl", device="meta").unet
        extra = parameter_count(parts.unet) - parameter_count(sdxl)
        assert extra == (4096 * 2048 + 2048) + (5632 - 2816) * 1280
    assert [parameter_count(e) for e in parts.text_encoders] == encoder_params
    assert parameter_count(parts.vae) == 83_653_863


def test_cases_models_and_targets_from_the_config():
    cfg = bench_cfg()
    cases = cases_from_config(cfg["bench"])
    names = [c.name for c in cases]
    assert names[:3] == ["reference", "cache_off", "cache_on"] and "compile" in names
    assert models_to_run(cfg["bench"], [], "tiny") == ["tiny", "tiny_sdxl", "tiny_kolors"]
    assert models_to_run(cfg["bench"], ["model=sd15", "bench.random_init=true"], "sd15") == ["sd15"]
    assert not plan_for({**cfg["bench"], "random_init": True}, torch.device("cpu")).timed
    assert plan_for({**cfg["bench"], "random_init": True, "steps": 2}, torch.device("cpu")).timed
    with pytest.raises(ValueError, match="nope"):
        cases_from_config({"cases": {"a": {"vs": "nope"}}})
    assert Case("x", ("speed.compile=true",)).variant == "sdtune speed.compile=true"

    rows = [{"model": "tiny", "case": "cache_off", "vs_reference": "1.04"},
            {"model": "tiny_sdxl", "case": "cache_off", "vs_reference": "1.2"},
            {"model": "sd15", "case": "cache_off", "vs_reference": "n/a (CPU)"}]
    lines = check_targets(rows, cfg["bench"]["targets"])
    assert lines[0].startswith("PASS tiny ") and lines[1].startswith("FAIL tiny_sdxl ") and lines[2].startswith("SKIP sd15")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.mark.slow
def test_bench_run_on_the_tiny_model_writes_a_consistent_table(tmp_path, tiny_sd15):
    out = tmp_path / "bench"
    proc = run_cli(
        "model=tiny", "bench.steps=3", "bench.warmup=1", "bench.rounds=1", "bench.switch_models=[]",
        "data.batch_size=2", f"hydra.run.dir={out}", module="sdtune.bench",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["case"]: r for r in _read_csv(out / "bench.csv")}
    assert set(rows) == {"reference", "cache_off", "cache_on"}
    info = json.loads((out / "bench.json").read_text())
    assert info["matmul_peak_gflops"] > 0 and info["versions"]["torch"] == torch.__version__
    ref_ms = float(rows["reference"]["ms_per_step"])
    for row in rows.values():
        assert (row["family"], row["model"], row["batch"], row["steps_timed"], row["rounds"]) == ("sd15", "tiny", "2", "3", "1")
        ms, ips, gflop, mfu = (float(row[k]) for k in ("ms_per_step", "images_per_s", "gflop_per_image", "mfu_pct"))
        assert ms > 0 and ips > 0 and gflop > 0 and float(row["peak_mem_mib"]) > 0 and 0 < mfu < 100
        assert ips == pytest.approx(2 * 1000 / ms, rel=2e-3)
        assert mfu == pytest.approx(100 * gflop * 1e9 * ips / (info["matmul_peak_gflops"] * 1e9), rel=1e-2)
        assert float(row["vs_reference"]) == pytest.approx(ms / ref_ms, rel=3e-3)
    assert rows["cache_on"]["gflop_per_image"] == rows["reference"]["gflop_per_image"]  # same UNet step
    printed = proc.stdout
    assert "reference loop" in printed and "sdtune, caching off" in printed and str(out / "bench.csv") in printed


@pytest.mark.slow
def test_bench_full_size_on_cpu_counts_flops_and_times_nothing(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("model=sd15", "bench.random_init=true", f"hydra.run.dir={out}", module="sdtune.bench")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _read_csv(out / "bench.csv")
    assert [r["case"] for r in rows][:3] == ["reference", "cache_off", "cache_on"]
    for row in rows:
        assert float(row["gflop_per_image"]) == pytest.approx(1720, rel=0.05)
        assert float(row["gflop_fwd_per_image"]) == pytest.approx(808, rel=0.02)
        assert row["ms_per_step"] == row["images_per_s"] == "n/a (CPU)"
