"""A few training steps of each full-size architecture on a CUDA GPU (``make test-gpu``).

Random weights built from the shipped configs (``sdtune/families/arch_configs``, no download), the
bench's own presets and runner (``sdtune.bench.watch.watched_run``), the quickstart images. Each
run asserts a finite loss, every LoRA tensor moved, frozen weights bit-identical, the dtypes
of mixed precision and peak memory under its bound (SDXL 10 GB and Kolors 12 GB: the bench
targets; SD1.5: ``hardware=12gb``'s promise), plus what its switch must show. About 5–10 minutes
on one H100, most of it building the random models (Kolors' 6B ChatGLM) and compiling.
Skipped without CUDA (tests/gpu/conftest.py); the same checks run on the tiny models on the CPU
in ``make test`` (tests/bench/test_watch.py).
"""

from __future__ import annotations

import pytest

from sdtune.bench.watch import compose, watched_run
from tests.helpers.gpu_scenarios import SCENARIOS, check, isolated_distributed, peak_bound, skip_if_missing

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_full_size_steps_on_cuda(scenario, tmp_path):
    skip_if_missing(scenario)
    cfg = compose(*scenario.gpu, output_dir=tmp_path)
    with isolated_distributed():  # the DDP scenario's group and environment must not leak into later tests
        report = watched_run(cfg, device="cuda", steps=scenario.steps, random_init=True, root_dir=tmp_path)
    print(f"{scenario.name}: {report.summary()} {report.ms_per_step:.0f} ms/step")
    check(report, scenario, cfg, peak_mib=peak_bound(scenario, cfg), steps=scenario.steps)
