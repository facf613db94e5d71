"""The GPU checks' CPU twins: the same runs and assertions as tests/gpu on the tiny models.

tests/gpu only runs on a CUDA machine; here its checks (finite loss, every LoRA tensor moved,
frozen weights bit-identical, precision dtypes, encoders off the accelerator, the switch's own
fact, a peak bound) run through the same ``watched_run`` on the CPU, so they are known to hold on
a healthy run and, below, to fail on a broken one.
"""

from __future__ import annotations

import pytest
import torch

from sdtune.bench.watch import Report, compose, digest, frozen_digests, target, watched_run
from tests.helpers.gpu_scenarios import BY_NAME, SCENARIOS, TWIN_PEAK_MIB, check, isolated_distributed

#: Every scenario that needs no CUDA; about 1–2.5 s each on an idle 2-core machine. The int8 base's
#: twin is slow-only (the fast suite's budget; tests/families/test_quantize.py covers int8 there).
SLOW_TWINS = {"int8_base"}
TWINS = [pytest.param(s, id=s.name, marks=[pytest.mark.slow] if s.name in SLOW_TWINS else [])
         for s in SCENARIOS if s.twin is not None]


@pytest.mark.parametrize("scenario", TWINS)
def test_gpu_checks_hold_on_the_tiny_twin(scenario, tmp_path):
    cfg = compose(*scenario.twin, output_dir=tmp_path)
    with isolated_distributed():  # the DDP scenario's group and environment must not leak into later tests
        report = watched_run(cfg, device="cpu", steps=scenario.steps, random_init=False, root_dir=tmp_path)
    check(report, scenario, cfg, peak_mib=TWIN_PEAK_MIB, steps=scenario.steps)


def test_every_gpu_scenario_composes(tmp_path):
    """The full-size configs are what the scenarios say (composition needs no GPU)."""
    cfgs = {s.name: compose(*s.gpu, output_dir=tmp_path) for s in SCENARIOS}
    for name, cfg in cfgs.items():
        assert cfg["bench"]["random_init"] is True, name
        assert cfg["trainer"]["precision"] == ("16-mixed" if name == "sd15_fp16" else "bf16-mixed"), name
    sdxl, kolors = cfgs["sdxl_1024_gc_text_cached"], cfgs["kolors_1024_chatglm_freed"]
    assert (sdxl["data"]["resolution"], sdxl["train"]["gradient_checkpointing"]) == (1024, True)
    assert kolors["model"]["family"] == "kolors" and kolors["train"]["cache_text_embeddings"] is True
    assert (target(sdxl, "peak_mem_mib"), target(kolors, "peak_mem_mib")) == (9537, 11444)  # 10 GB, 12 GB
    ddp = cfgs["ddp_one_gpu"]["trainer"]
    assert (ddp["strategy"], ddp["devices"], ddp["accelerator"]) == ("ddp", 1, "gpu")


def test_the_checks_catch_a_broken_run(tiny_sd15):
    """A frozen weight changed by one ulp, a LoRA tensor that never moved, a NaN loss: each fails."""
    from sdtune.families.builder import build_parts

    _, parts = build_parts({"family": "sd15", "path": str(tiny_sd15)}, dtype=torch.bfloat16)
    before = frozen_digests(parts)
    assert len(before) >= 6 and any(k.startswith("text_encoder_0.") for k in before)
    weight = next(p for p in parts.vae.parameters())
    assert digest(weight) == digest(weight.clone())  # bf16 hashes (no numpy view of bf16)
    with torch.no_grad():
        weight.view(torch.int16).view(-1)[0] += 1  # the lowest bit of one bf16 value: one ulp
    after = frozen_digests(parts)
    assert [k for k in before if before[k] != after[k]] == [next(k for k in before if k.startswith("vae."))]

    scenario = BY_NAME["sd15_bf16"]
    cfg = {"trainer": {"precision": "bf16-mixed"}}
    good = Report(losses=[0.1, 0.2], lora_start={"a": torch.zeros(2), "b": torch.ones(2)},
                  lora_end={"a": torch.ones(2), "b": torch.zeros(2)}, frozen_start=before, frozen_end=dict(before),
                  frozen_dtypes={"torch.bfloat16"}, lora_dtypes={"torch.float32"}, encoder_devices=["cpu"], peak_mb=10.0)
    check(good, scenario, cfg, peak_mib=100, steps=2)
    broken = [
        {"frozen_end": after},
        {"lora_end": {"a": torch.ones(2), "b": torch.ones(2)}},
        {"losses": [0.1, float("nan")]},
        {"peak_mb": 101.0},
        {"encoder_devices": ["cuda"]},
        {"frozen_dtypes": {"torch.float32"}},
    ]
    for change in broken:
        with pytest.raises(AssertionError):
            check(Report(**{**good.__dict__, **change}), scenario, cfg, peak_mib=100, steps=2)
