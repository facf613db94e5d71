"""The memory planner's figures against the real thing, on the tiny models on the CPU.

Weights, LoRA, gradients and optimizer state must EQUAL the byte counts of the model really loaded
(and, for ``model.quantize=int8``, really quantized by diffusers' TorchAoConfig) and of the run's
real optimizer after one step. The activation figure must be within 20% of the peak a real CPU
training step allocates, measured independently of the planner (see
:func:`measured_step_peak`). Each check is also fed a plan with a known fault (gradients
forgotten, LoRA counted in the base dtype), which must fail it.
"""

from __future__ import annotations

import os

import pytest
import torch

from sdtune.families import get_family
from sdtune.families.arch import architecture
from sdtune.families.quantize import stored_bytes
from sdtune.lora.layers import named_trainable_lora_parameters, spec_from_config
from sdtune.planning import model as planned
from sdtune.planning import plan_memory
from sdtune.planning.optimizer_state import bnb_state_bytes, state_bytes
from sdtune.training.diffusion import denoising_loss
from sdtune.training.optimization import build_optimization
from sdtune.training.trainable import prepare_for_training, weight_dtype
from tests.helpers.config import compose_cfg
from tests.helpers.models import tiny_model

MODELS = {"sd15": "tiny", "sdxl": "tiny_sdxl", "kolors": "tiny_kolors", "flux": "tiny_flux", "sd35": "tiny_sd35"}


def tiny_cfg(family: str, *overrides: str, quantize: str | None = None) -> dict:
    tiny_model(family)
    cfg = planned.plain(compose_cfg(f"model={MODELS[family]}", "trainer=cpu", "trainer.precision=32", *overrides))
    cfg["model"]["quantize"] = quantize
    return cfg


def real_run(cfg: dict):
    """The run's parts really loaded and made trainable, one real step, the real optimizer stepped."""
    family = get_family(cfg["model"]["family"])
    dtype = weight_dtype(cfg["trainer"])
    parts = family.load(cfg["model"]["path"], dtype=dtype)
    frozen = {"denoiser": stored_bytes(parts.denoiser), "vae": stored_bytes(parts.vae),
              "text_encoders": sum(stored_bytes(e) for e in parts.text_encoders)}
    prepare_for_training(parts, cfg, spec_from_config(cfg["lora"], family.default_lora_targets), dtype, family)
    named = list(named_trainable_lora_parameters(parts.denoiser))
    step_loss(family, parts, cfg, batch=1).backward()
    optimizer = build_optimization(cfg["optim"], cfg["trainer"], named, device=torch.device("cpu"),
                                   total_steps=10)["optimizer"]
    optimizer.step()
    state = sum(v.nbytes for p in optimizer.state.values() for v in p.values() if torch.is_tensor(v))
    return {"frozen": frozen, "lora": sum(p.nbytes for _, p in named),
            "grads": sum(p.grad.nbytes for _, p in named), "optimizer": state}


def step_loss(family, parts, cfg: dict, batch: int) -> torch.Tensor:
    """The training loss of one step on random inputs of the run's shapes (the planner's step, for real)."""
    arch = architecture(family, cfg["model"]["path"])
    res = int(cfg["data"]["resolution"])
    side = res // 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    objective = family.objective(parts, cfg["train"])
    latents = torch.randn(batch, arch["vae"]["latent_channels"], side, side)
    text = {k: torch.randn(batch, *shape) for k, shape in family.text_shapes(arch).items()}
    sizes = torch.tensor([[float(res)] * 2] * batch)
    cond = family.conditioning(text, {"original_size": sizes, "target_size": sizes, "crop_top_left": torch.zeros(batch, 2)})
    return denoising_loss(family, parts.denoiser, objective, latents, cond, torch.randn_like(latents),
                          objective.dummy_timesteps(batch, "cpu"), dtype=torch.float32)


def row(plan, prefix: str) -> int:
    """The training step's component whose name starts with ``prefix``."""
    found = [v for k, v in plan.phases["training step"].items() if k.startswith(prefix)]
    assert len(found) == 1, (prefix, list(plan.phases["training step"]))
    return found[0]


def check_figures(components: dict[str, int], real: dict) -> None:
    """The plan's rows equal the real byte counts."""
    plan = type("P", (), {"phases": {"training step": components}})()
    assert row(plan, "denoiser weights") == real["frozen"]["denoiser"]
    assert row(plan, "LoRA weights (fp32)") == real["lora"]
    assert row(plan, "LoRA gradients") == real["grads"]
    assert row(plan, "optimizer state") == real["optimizer"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_weights_lora_gradients_and_optimizer_equal_the_real_run(family):
    cfg = tiny_cfg(family, "data.cache_latents=false", "train.cache_text_embeddings=false")
    plan = plan_memory(cfg)
    real = real_run(cfg)
    check_figures(plan.phases["training step"], real)
    assert row(plan, "VAE weights") == real["frozen"]["vae"]
    assert row(plan, "text encoders weights") == real["frozen"]["text_encoders"]
    # a planner that forgets the gradients, or counts the LoRA in the base dtype, fails the same check
    forgot = {k: v for k, v in plan.phases["training step"].items() if k != "LoRA gradients"}
    with pytest.raises(AssertionError):
        check_figures(forgot, real)
    half = {k: (v // 2 if k.startswith("LoRA") else v) for k, v in plan.phases["training step"].items()}
    with pytest.raises(AssertionError):
        check_figures(half, real)


@pytest.mark.slow
def test_int8_denoiser_equals_the_torchao_loaded_one():
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    from diffusers import TorchAoConfig, UNet2DConditionModel
    from torchao.quantization import Int8WeightOnlyConfig

    cfg = tiny_cfg("sd15", quantize="int8")
    unet = UNet2DConditionModel.from_pretrained(cfg["model"]["path"], subfolder="unet", torch_dtype=torch.float32,
                                                quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    plan = plan_memory(cfg)
    assert row(plan, "denoiser weights (int8)") == stored_bytes(unet)
    assert row(plan, "denoiser weights (int8)") < row(plan_memory(tiny_cfg("sd15")), "denoiser weights (fp32)")
    assert row(plan, "dequantized weight") > 0


def measured_step_peak(family_name: str, cfg: dict, batch: int) -> int:
    """The peak bytes a real CPU training step allocates above what existed before it.

    Method: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
    PyTorch's CPU allocator during the step (forward and backward of the loss, LoRA gradients
    already allocated so that only activations and temporaries are new); each allocation record
    carries the allocator's running total, whose maximum is the step's peak. One thread, so that
    the CPU kernels' per-thread workspaces (which a GPU does not have) stay small. Independent of the
    planner: real tensors, real CPU kernels, no meta device, no MemTracker."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    family = get_family(family_name)
    parts = family.load(cfg["model"]["path"], dtype=torch.float32)
    prepare_for_training(parts, cfg, spec_from_config(cfg["lora"], family.default_lora_targets), torch.float32, family)
    step_loss(family, parts, cfg, batch).backward()  # warm-up: lazily built buffers are not the step's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU kernels' per-thread workspaces (attention, convolutions) are no GPU memory
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step_loss(family, parts, cfg, batch).backward()
    finally:
        torch.set_num_threads(threads)
    totals, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            totals.append((node.start_time_ns, node.typed[1].total_allocated, node.typed[1].alloc_size))
    totals.sort()
    start = totals[0][1] - totals[0][2]
    return max(total for _, total, _ in totals) - start


@pytest.mark.slow
@pytest.mark.parametrize(("family", "checkpointing", "batch", "resolution"), [
    ("sd15", False, 2, 64), ("sd15", True, 2, 64), ("sdxl", True, 2, 128), ("flux", False, 1, 64), ("flux", True, 1, 64),
])
def test_activations_within_20_percent_of_a_real_step(family, checkpointing, batch, resolution):
    cfg = tiny_cfg(family, f"train.gradient_checkpointing={str(checkpointing).lower()}", f"data.batch_size={batch}",
                   f"data.resolution={resolution}", "data.cache_latents=true")
    plan = plan_memory(cfg)
    planned_act = plan.activations[checkpointing]
    measured = measured_step_peak(family, cfg, batch)
    assert abs(planned_act - measured) <= 0.2 * measured, (planned_act, measured)
    assert plan.activations[True] < plan.activations[False]


@pytest.mark.slow  # importing bitsandbytes takes a second or two
def test_bitsandbytes_layout_equals_a_real_8bit_adamw_step():
    bnb = pytest.importorskip("bitsandbytes")
    shapes = [(16, 320), (320, 16), (8, 8), (4, 4096)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    optimizer.step()
    storages = {id(v.untyped_storage()): v.untyped_storage().nbytes() for p in params
                for v in optimizer.state[p].values() if torch.is_tensor(v)}
    counts = [((s, "torch.float32"), 1) for s in shapes]
    assert bnb_state_bytes({"optimizer": {"_target_": "bitsandbytes.optim.AdamW8bit"}}, counts) == sum(storages.values())


def test_adamw_state_is_two_fp32_moments_and_a_step_count_per_parameter():
    params = [torch.zeros(16, 320, device="meta"), torch.zeros(320, 16, device="meta"), torch.zeros(16, 320, device="meta")]
    optim = {"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4, "fused": None},
             "scheduler": {"name": "constant", "warmup_steps": 0}}  # conf/optim/adamw.yaml's optimizer
    assert state_bytes(optim, {"precision": "32"}, params) == 3 * (2 * 4 * 16 * 320 + 4)
