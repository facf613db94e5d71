"""Sweeps: a 4-run rank sweep, its report, validation grids in TensorBoard, and an Optuna search."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers.cli import run_cli

pytestmark = pytest.mark.slow
RANKS = [2, 4, 8, 16]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = run_cli("-m", f"lora.rank={','.join(map(str, RANKS))}", "experiment=quickstart", "trainer.max_steps=12",
                   "callbacks.samples.every_n_steps=6", "callbacks.samples.steps=2", f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder


def _metrics(run):
    with open(run / "logs" / "csv" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [float(r["train/loss_step"]) for r in rows if r["train/loss_step"]]
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    return train, val


def test_multirun_trains_each_rank_in_its_own_folder(sweep):
    from sdtune.lora.files import read_lora

    for job, rank in enumerate(RANKS):
        assert (sweep / str(job) / ".hydra" / "config.yaml").is_file()
        lora = read_lora(sweep / str(job) / "lora.safetensors")
        assert lora.spec.rank == rank
        assert all(v.shape[0] == rank for k, v in lora.raw.items() if k.endswith("lora_down.weight"))


def test_report_table_matches_each_runs_logs(sweep):
    proc = run_cli(str(sweep), module="sdtune.report")
    assert proc.returncode == 0, proc.stderr
    assert "| run | lora.rank |" in proc.stdout
    with open(sweep / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["lora.rank"]) for r in rows] == RANKS
    params = []
    for row in rows:
        run = sweep / row["run"]
        train, val = _metrics(run)
        summary = json.loads((run / "summary.json").read_text())
        assert float(row["final_train_loss"]) == pytest.approx(train[-1])
        assert float(row["min_train_loss"]) == pytest.approx(min(train))
        assert float(row["final_val_loss"]) == pytest.approx(val[-1])
        assert int(row["lora_bytes"]) == (run / "lora.safetensors").stat().st_size
        assert float(row["steps_per_second"]) == pytest.approx(summary["steps_per_second"]) and summary["global_step"] == 12
        params.append(int(row["trainable_params"]))
    assert [p // params[0] for p in params] == [r // RANKS[0] for r in RANKS]  # LoRA size is linear in rank
    md = (sweep / "report.md").read_text().splitlines()
    assert len(md) == 2 + len(RANKS) and md[0].startswith("| run | lora.rank | final_train_loss")
    curves = Image.open(sweep / "loss_curves.png")
    assert curves.size == (800, 500)
    grid = Image.open(sweep / "samples_grid.png")
    assert grid.size == (120 + 4 * 164, 34 + len(RANKS) * 164)  # rows = runs, columns = the 4 quickstart prompts


def test_validation_grids_land_in_the_run_folder_and_tensorboard(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sweep / "0"
    assert (run / "samples" / "step000006.png").is_file() and (run / "samples" / "step000012.png").is_file()
    events = EventAccumulator(str(run / "logs" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    images = events.Images("samples")
    assert sorted({i.step for i in images}) == [6, 12]
    on_disk = Image.open(run / "samples" / "step000006.png")
    first = next(i for i in images if i.step == 6)
    assert (first.width, first.height) == on_disk.size
    assert "val/loss" in events.Tags()["scalars"] and "train/loss_step" in events.Tags()["scalars"]


def test_optuna_search_minimises_validation_loss(tmp_path):
    folder = tmp_path / "search"
    proc = run_cli("-m", "hparams_search=optuna", "experiment=quickstart", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.n_startup_trials=3", "trainer.max_steps=4", "callbacks.samples=null",
                   f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optim.optimizer.lr", "lora.rank"}
    vals = [json.loads((folder / str(i) / "summary.json").read_text())["final_metrics"]["val/loss"] for i in range(3)]
    assert result["best_value"] == pytest.approx(min(vals))


def test_smoothing_is_debiased_and_follows_the_trend():
    from sdtune.run.plots import smooth

    assert smooth([2.0] * 50) == pytest.approx([2.0] * 50)  # no pull towards 0 at the start
    noisy = [1.0 / (1 + i / 20) + (0.3 if i % 2 else -0.3) for i in range(200)]
    s = smooth(noisy)
    assert s[0] == pytest.approx(noisy[0])
    wiggle = max(abs(a - b) for a, b in zip(s[100:], s[101:]))
    assert wiggle < 0.05 and s[-1] < s[20]  # the zig-zag is gone, the decline stays


def _columns_with(image: Image.Image, rgb: tuple[int, int, int]) -> int:
    """How many pixel columns of ``image`` hold the colour ``rgb`` (within anti-aliasing's rounding)."""
    pixels = np.asarray(image.convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) <= 6).any(axis=0).sum())


def test_every_run_writes_its_loss_plot(quickstart_run, tmp_path):
    """loss.png draws the run's own losses: the smoothed train loss (matplotlib's C0) across the
    plot, the validation points (C1), and exactly the picture metrics.csv gives (a blank or
    half-drawn plot, or one of other numbers, fails)."""
    from sdtune.lora.files import read_lora
    from sdtune.run.plots import plot_run_loss, read_metrics

    train, val = read_metrics(quickstart_run / "logs" / "csv" / "metrics.csv")
    assert len(train) >= 5 and val  # what the plot draws
    with Image.open(quickstart_run / "loss.png") as im:
        assert im.format == "PNG" and im.size == (700, 400)
        drawn = im.convert("RGB")
    assert len(set(drawn.getdata())) > 20  # not a uniform picture
    assert _columns_with(drawn, (31, 119, 180)) > 0.6 * drawn.width  # the train curve runs across the axes
    assert _columns_with(drawn, (255, 127, 14)) >= 6 * len(val)  # each validation point has its dot
    header = read_lora(quickstart_run / "lora.safetensors")
    plot_run_loss(train, val, tmp_path / "again.png", title=f"{header.family} LoRA rank {header.spec.rank}: loss")
    with Image.open(tmp_path / "again.png") as again:
        assert np.array_equal(np.asarray(drawn), np.asarray(again.convert("RGB")))  # the CSV's numbers, no others


def test_report_reads_a_single_run_folder(quickstart_run, tmp_path):
    """`sdtune.report <run folder>`: the same table and pictures for one run as for a sweep."""
    from sdtune.report import main

    assert main([str(quickstart_run), "--out", str(tmp_path)]) == 0
    import csv

    [row] = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert row["run"] == quickstart_run.name and float(row["final_train_loss"]) > 0 and row["trainable_params"] == "21504"
    assert (tmp_path / "loss_curves.png").is_file() and (tmp_path / "samples_grid.png").is_file()
