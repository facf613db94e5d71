"""``bench.write_docs=true``: a GPU bench run writes its row of docs/benchmarks.md itself.

The writer is a pure function of the markdown and one finished run (rows + bench.json info), so
it is tested on the CPU with a fabricated H100 result against the repository's own file.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from sdtune.bench.docs_rows import BEGIN, END, bench_row, read_text, update_rows, write_row
from sdtune.utils.errors import ConfigError
from tests.helpers.paths import ROOT

DOCS = ROOT / "docs" / "benchmarks.md"


def _result(mfu: str = "43.1", verdict: str = "PASS") -> tuple[dict, list[dict], dict]:
    bench = {"description": "SD1.5 512², batch 8: MFU ≥ 40%",
             "targets": [{"case": "cache_on", "metric": "mfu_pct", "at_least": 40}]}
    rows = [{"case": "reference", "ms_per_step": "300", "images_per_s": "26.7", "peak_mem_mib": "9000", "mfu_pct": "30"},
            {"case": "cache_on", "ms_per_step": "199.5", "images_per_s": "40.1", "peak_mem_mib": "8123", "mfu_pct": mfu}]
    info = {"command": "python -m sdtune.bench bench/preset=gpu_sd15 bench.write_docs=true",
            "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01T10:00:00+00:00",
            "versions": {"torch": "2.13.0+cu128", "diffusers": "0.42.1"},
            "targets": [f"{verdict} sd15 cache_on mfu_pct = {mfu} (at least 40)"], "errors": []}
    return bench, rows, info


def test_the_preset_row_is_replaced_and_nothing_else_changes():
    text = read_text(DOCS)
    row = bench_row("gpu_sd15", *_result())
    new = update_rows(text, row)
    start, end = text.index(BEGIN), text.index(END)
    assert new[:start] == text[:start] and new[new.index(END):] == text[end:]  # outside the markers: byte-identical
    old_lines, new_lines = text[start:end].splitlines(), new[new.index(BEGIN):new.index(END)].splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(old_lines) == len(new_lines) and len(changed) == 1
    before, after = changed[0]
    assert before.startswith("| gpu_sd15 |") and "not measured yet" in before
    for fact in ("| gpu_sd15 |", "NVIDIA H100 80GB HBM3", "torch 2.13.0+cu128, diffusers 0.42.1", "2026-12-01",
                 "`python -m sdtune.bench bench/preset=gpu_sd15 bench.write_docs=true`",
                 "cache_on: 199.5 ms/step, 40.1 img/s, peak 8123 MiB, MFU 43.1%", "**PASS sd15 cache_on mfu_pct"):
        assert fact in after
    assert "reference:" not in after  # only the target's case
    assert update_rows(new, row) == new  # idempotent
    again = update_rows(new, bench_row("gpu_sd15", *_result("38.0", "FAIL")))  # a rerun replaces its own row
    assert again.count("| gpu_sd15 |") == 1 and "**FAIL" in again and "MFU 38.0%" in again and "MFU 43.1%" not in again
    assert again.count("| gpu_sdxl |") == 1 and again.count("| gpu_kolors |") == 1


def test_a_new_preset_is_appended_to_the_table_and_missing_markers_are_named(tmp_path):
    text = read_text(DOCS)
    new = update_rows(text, {**bench_row("gpu_sd15", *_result()), "preset": "gpu_next"})
    block = new[new.index(BEGIN):new.index(END)].rstrip("\n").splitlines()
    assert block[-1].startswith("| gpu_next |") and block[-2].startswith("| gpu_sd35 |")
    with pytest.raises(ConfigError, match="bench:gpu-rows:begin.*Fix"):
        update_rows("# no table here\n", bench_row("gpu_sd15", *_result()))
    empty = f"intro\r\n{BEGIN}\r\n{END}\r\nafter\r\n"  # an empty block gets a header; \r\n files keep \r\n
    out = update_rows(empty, bench_row("gpu_sdxl", *_result()))
    assert out.startswith(f"intro\r\n{BEGIN}\r\n| preset | target |") and out.endswith(f"\r\n{END}\r\nafter\r\n")
    assert "\n" not in out.replace("\r\n", "")


def test_write_row_rewrites_the_file_atomically(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_bytes(DOCS.read_bytes())
    row = bench_row("gpu_kolors", *_result())
    write_row(path, row)
    assert read_text(path) == update_rows(read_text(DOCS), row)
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]  # no temporary file left


def test_write_docs_is_refused_on_the_cpu_before_anything_runs(tmp_path):
    from sdtune.bench.suite import run_bench

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=["bench.write_docs=true", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="CUDA machine.*bench.write_docs=true"):
        run_bench(cfg, ["bench.write_docs=true"], {"model": "tiny", "bench/preset": "cpu_tiny"}, tmp_path)
    assert not list(tmp_path.iterdir())
