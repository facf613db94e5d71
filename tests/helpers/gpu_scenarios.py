"""The GPU checks: which runs, with what, and what each must show. Shared by tests/gpu (full size,
CUDA) and tests/bench/test_watch.py (the CPU twins: the same switches on the tiny models).

Every run is a composed ``conf/bench.yaml`` (the bench's own presets: ``bench/preset=gpu_sdxl``
is the SDXL target), trained a few steps by :func:`sdtune.bench.watch.watched_run` on the
quickstart images. :func:`check` asserts what every healthy run shows; ``expect`` adds the
scenario's own facts (the optimizer it asked for, the GradScaler of 16-mixed, ...).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from sdtune.bench.watch import Report, target
from sdtune.training.trainable import weight_dtype

#: SD1.5 512² batch 4 without gradient checkpointing, latents and text cached: what
#: ``hardware=12gb`` promises to fit in 12 GB (11444 MiB); bf16-mixed unless the scenario says.
SD15 = ("bench/preset=gpu_sd15", "data.batch_size=4", "data.cache_latents=true",
        "train.cache_text_embeddings=true", "trainer.precision=bf16-mixed")
SD15_PEAK_MIB = 11444.0
#: The targets' own case: text embeddings cached (encoders off the GPU), the VAE every step.
TEXT_CACHED = ("data.cache_latents=false", "train.cache_text_embeddings=true")
#: The CPU twins' peak-RSS bound: the tiny models' loop takes 20–35 MiB (docs/benchmarks.md).
TWIN_PEAK_MIB = 1024.0


@dataclass(frozen=True)
class Scenario:
    name: str
    gpu: tuple[str, ...]               # overrides of conf/bench.yaml for the full-size run on CUDA
    twin: tuple[str, ...] | None       # the same switches on a tiny model on the CPU (None: CUDA-only)
    steps: int = 3
    peak_mib: float | None = None      # None: the preset's own bench target (peak_mem_mib)
    needs: tuple[str, ...] = ()        # packages; the test skips naming the one missing
    expect: dict[str, Any] = field(default_factory=dict)
    capability: tuple[int, int] | None = None  # the CUDA compute capability it needs (fp8: 8.9)

    def missing(self) -> str | None:
        for package in self.needs:
            if importlib.util.find_spec(package) is None:
                return f"needs the {package} package (pip install {package})"
        if self.capability and torch.cuda.is_available() and torch.cuda.get_device_capability() < self.capability:
            return f"needs CUDA compute capability {self.capability[0]}.{self.capability[1]}+"
        return None


SCENARIOS = [
    Scenario("sd15_bf16", SD15, ("model=tiny", "data.cache_latents=true", "train.cache_text_embeddings=true",
                                 "trainer.precision=bf16-mixed"),
             peak_mib=SD15_PEAK_MIB, expect={"encoders_off": True, "scaler": False}),
    # fp16 weights, fp32 LoRA, Lightning's GradScaler; 8 steps leave room for the scaler's first
    # skipped steps (it starts at 2**16 and halves on each overflow) before the LoRA must move.
    Scenario("sd15_fp16", (*SD15, "trainer.precision=16-mixed"), None, steps=8, peak_mib=SD15_PEAK_MIB,
             expect={"encoders_off": True, "scaler": True}),
    Scenario("sdxl_1024_gc_text_cached", ("bench/preset=gpu_sdxl", *TEXT_CACHED),
             ("model=tiny_sdxl", "train.gradient_checkpointing=true", *TEXT_CACHED),
             expect={"encoders_off": True, "gradient_checkpointing": True}),
    Scenario("kolors_1024_chatglm_freed", ("bench/preset=gpu_kolors", *TEXT_CACHED),
             ("model=tiny_kolors", "train.gradient_checkpointing=true", *TEXT_CACHED),
             expect={"encoders_off": True, "gradient_checkpointing": True}),
    # Lightning refuses clipping with a fused optimizer under mixed precision (bench preset gpu_sd15).
    Scenario("fused_adamw", (*SD15, "optim.optimizer.fused=true", "trainer.gradient_clip_val=0"),
             ("model=tiny", "data.cache_latents=true", "optim.optimizer.fused=true", "trainer.gradient_clip_val=0"),
             peak_mib=SD15_PEAK_MIB, expect={"fused": True}),
    Scenario("adamw8bit", (*SD15, "optim=adamw8bit"), None, peak_mib=SD15_PEAK_MIB, needs=("bitsandbytes",),
             expect={"optimizer": "AdamW8bit"}),
    # The first steps compile the forward and backward graphs (about a minute on an H100).
    Scenario("compile", (*SD15, "speed.compile=true"), None, steps=4, peak_mib=SD15_PEAK_MIB,
             expect={"compiled": True}),
    Scenario("xformers", (*SD15, "speed.attention=xformers"), None, peak_mib=SD15_PEAK_MIB, needs=("xformers",),
             expect={"attention": {"XFormersAttnProcessor"}}),
    # model.quantize: the frozen UNet in 8 or 4 bits under fp32 LoRA layers (peft's TorchaoLoraLinear,
    # Linear4bit); every LoRA tensor must move and the quantized weights stay bit-identical.
    Scenario("int8_base", (*SD15, "model.quantize=int8"), ("model=tiny", "model.quantize=int8", "data.cache_latents=true"),
             peak_mib=SD15_PEAK_MIB, expect={"quantized": ["Int8Tensor"]}),
    Scenario("fp8_base", (*SD15, "model.quantize=fp8"), None, peak_mib=SD15_PEAK_MIB, capability=(8, 9),
             expect={"quantized": ["Float8Tensor"]}),
    Scenario("nf4_base", (*SD15, "model.quantize=nf4"), None, peak_mib=SD15_PEAK_MIB, needs=("bitsandbytes",),
             expect={"quantized": ["Params4bit"]}),
    Scenario("ddp_one_gpu", (*SD15, "trainer=ddp", "trainer.devices=1", "trainer.accelerator=gpu"),
             ("model=tiny", "trainer=ddp", "trainer.devices=1", "trainer.accelerator=cpu", "trainer.precision=32"),
             peak_mib=SD15_PEAK_MIB, expect={"strategy": "DDPStrategy"}),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def peak_bound(scenario: Scenario, cfg: dict[str, Any]) -> float:
    bound = scenario.peak_mib if scenario.peak_mib is not None else target(cfg, "peak_mem_mib")
    assert bound is not None, f"{scenario.name}: no peak bound (set peak_mib or a bench target on peak_mem_mib)"
    return bound


def check(report: Report, scenario: Scenario, cfg: dict[str, Any], *, peak_mib: float, steps: int) -> None:
    """What every healthy run shows, then the scenario's own ``expect``."""
    why = f"{scenario.name}: {report.summary()}"
    assert len(report.losses) == steps, why
    assert all(math.isfinite(x) for x in report.losses), why
    assert report.lora_start and report.changed_lora == list(report.lora_start), why  # every LoRA tensor moved
    assert len(report.frozen_start) >= 6 and not report.changed_frozen, why  # UNet base, VAE, encoders: bit-identical
    assert report.lora_dtypes == {"torch.float32"} or cfg["trainer"]["precision"] == "bf16-true", why
    assert report.frozen_dtypes == {str(weight_dtype(cfg["trainer"]))}, why
    assert 0 < report.peak_mb <= peak_mib, why
    expect = scenario.expect
    if expect.get("encoders_off"):  # cached text: the encoders left the accelerator before the loop
        assert report.encoder_devices and set(report.encoder_devices) == {"cpu"}, why
    if "scaler" in expect:
        assert (report.scaler_scale is not None) == expect["scaler"], why
        assert report.scaler_scale is None or 0 < report.scaler_scale < math.inf, why
    if expect.get("gradient_checkpointing"):
        assert report.gradient_checkpointing, why
    if "fused" in expect:
        assert report.optimizer_defaults.get("fused") is expect["fused"], why
    if "optimizer" in expect:
        assert report.optimizer.endswith("." + expect["optimizer"]), why
    if "compiled" in expect:
        assert report.compiled is expect["compiled"], why
    if "attention" in expect:
        assert report.attention == expect["attention"], why
    if "quantized" in expect:
        assert report.quantized == expect["quantized"], why
    if "strategy" in expect:
        assert report.strategy == expect["strategy"] and report.world_size == 1, why


def skip_if_missing(scenario: Scenario) -> None:
    reason = scenario.missing()
    if reason:
        pytest.skip(f"{scenario.name} {reason}")


@contextlib.contextmanager
def isolated_distributed() -> Iterator[None]:
    """Undo what a one-process DDP run leaves behind in this (pytest) process: its process group,
    and the MASTER_PORT/LOCAL_RANK/WORLD_SIZE... variables Lightning's launcher sets. A leftover
    LOCAL_RANK makes a later Lightning (or a `python -m sdtune` child inheriting the environment)
    believe its processes were launched externally, so a 2-process DDP run would never spawn rank 1."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
