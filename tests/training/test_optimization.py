"""Optimizers and schedules (issue 14): LoRA+ param groups, cosine with a floor and restarts, the
Prodigy and Adafactor presets, and the refusal of bad values."""

from __future__ import annotations

import sys

import pytest
import torch

from sdtune.lora.layers import named_trainable_lora_parameters
from sdtune.run.checks import validate
from sdtune.training.module import LoRATrainingModule
from sdtune.training.optimization import build_optimization
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg, resolved

TINY = ("model=tiny", "data.root=examples/quickstart")


def _lr_curve(*overrides: str, total: int = 100) -> list[list[float]]:
    """Every param group's lr at steps 0..total of the schedule ``overrides`` configure (two LoRA tensors)."""
    cfg = resolved(compose_cfg(*TINY, *overrides))
    named = [("m.lora_A.default.weight", torch.nn.Parameter(torch.zeros(2, 2))),
             ("m.lora_B.default.weight", torch.nn.Parameter(torch.zeros(2, 2)))]
    opt = build_optimization(cfg["optim"], cfg["trainer"], named, device=torch.device("cpu"), total_steps=total)
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    curve = []
    for _ in range(total + 1):
        curve.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return curve


def _diffusers_curve(name: str, total: int = 100, **kwargs) -> list[float]:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler(name, optimizer, num_training_steps=total, **kwargs)
    curve = []
    for _ in range(total + 1):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


def test_cosine_with_a_floor_warms_up_decays_to_eta_min_and_never_below():
    """Catches: eta_min ignored (diffusers decays to 0), the floor applied during warmup or in the
    wrong units (a fraction instead of an absolute lr), a curve that is not the cosine."""
    lr, floor = 1e-3, 1e-4
    curve = [c[0] for c in _lr_curve(f"optim.optimizer.lr={lr}", "optim.scheduler.name=cosine",
                                     f"optim.scheduler.eta_min={floor}", "optim.scheduler.warmup_steps=10")]
    assert curve[:11] == pytest.approx([lr * i / 10 for i in range(11)], rel=1e-9)  # linear warmup from 0
    after = curve[10:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # decays monotonically ...
    assert min(after) == pytest.approx(floor) and curve[-1] == pytest.approx(floor)  # ... to the floor, not 0
    assert curve[55] == pytest.approx(floor + (lr - floor) / 2)  # halfway: the cosine's midpoint
    # with a zero floor it is diffusers' own cosine, value for value
    zero = [c[0] for c in _lr_curve(f"optim.optimizer.lr={lr}", "optim.scheduler.name=cosine", "optim.scheduler.eta_min=0",
                                    "optim.scheduler.warmup_steps=10")]
    assert zero == pytest.approx(_diffusers_curve("cosine", num_warmup_steps=10), abs=1e-12)


def test_cosine_with_restarts_restarts_num_cycles_times_and_each_cycle_ends_on_the_floor():
    """Catches: num_cycles ignored with a floor, restarts that do not go back to lr, a floor missing in later cycles."""
    lr, floor = 1e-3, 2e-4
    curve = [c[0] for c in _lr_curve(f"optim.optimizer.lr={lr}", "optim.scheduler.name=cosine_with_restarts",
                                     "+optim.scheduler.num_cycles=3", f"optim.scheduler.eta_min={floor}",
                                     "optim.scheduler.warmup_steps=10", total=100)]
    after = curve[10:]
    jumps = [i for i, (a, b) in enumerate(zip(after, after[1:])) if b > a]
    assert len(jumps) == 2  # 3 cycles: 2 restarts after the first decay
    for j in jumps:
        assert after[j] < floor + 0.02 * (lr - floor) and after[j + 1] == pytest.approx(lr)  # floor, then back to lr
    assert min(after) >= floor - 1e-15 and curve[-1] == pytest.approx(floor)
    zero = [c[0] for c in _lr_curve(f"optim.optimizer.lr={lr}", "optim.scheduler.name=cosine_with_restarts",
                                    "+optim.scheduler.num_cycles=3", "optim.scheduler.eta_min=0",
                                    "optim.scheduler.warmup_steps=10")]
    assert zero == pytest.approx(_diffusers_curve("cosine_with_restarts", num_warmup_steps=10, num_cycles=3), abs=1e-12)


def test_lora_plus_puts_every_b_matrix_in_its_own_group_at_lr_times_ratio(tiny_sd15):
    """On a real LoRA UNet: every lora_B tensor in the group at lr*ratio, every lora_A at lr, none lost,
    and the schedule scales both groups alike (warmup, then the full rates; the floor keeps the ratio).
    Catches: the ratio on A instead of B, a scheduler that drives one group only, parameters dropped."""
    cfg = resolved(compose_cfg(*TINY, "optim.optimizer.lr=1e-3", "optim.lora_plus_ratio=16",
                               "optim.scheduler.name=constant_with_warmup", "optim.scheduler.warmup_steps=4"))
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    named = named_trainable_lora_parameters(module.parts.unet)
    opt = build_optimization(cfg["optim"], cfg["trainer"], named, device=torch.device("cpu"), total_steps=10)
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    by_id = {id(p): n for n, p in named}
    groups = {g["name"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert groups["lora_B"] == {n for n, _ in named if ".lora_B." in n} and groups["lora_B"]
    assert groups["lora_A"] == {n for n, _ in named if ".lora_A." in n} and groups["lora_A"]
    lrs = []
    for _ in range(6):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert lrs[2] == pytest.approx({"lora_A": 1e-3 * 2 / 4, "lora_B": 16e-3 * 2 / 4})  # both warm up
    assert lrs[5] == pytest.approx({"lora_A": 1e-3, "lora_B": 16e-3})  # after warmup: lr and lr * ratio
    floor = _lr_curve("optim.optimizer.lr=1e-3", "optim.lora_plus_ratio=4", "optim.scheduler.name=cosine",
                      "optim.scheduler.eta_min=1e-4")
    assert floor[-1] == pytest.approx([1e-4, 4e-4])  # the B group's floor keeps the ratio
    # off (the default): one group over the same tensors, as before
    plain = resolved(compose_cfg(*TINY))
    single = build_optimization(plain["optim"], plain["trainer"], named, device=torch.device("cpu"), total_steps=10)
    assert len(single["optimizer"].param_groups) == 1 and len(single["optimizer"].param_groups[0]["params"]) == len(named)


def _fixed_batch_loss(module, text, seed: int = 7) -> torch.Tensor:
    """The denoising loss on one fixed batch with fixed noise and timesteps (so steps compare)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    return module.diffusion_loss(latents, text, {}, noise=noise, timesteps=torch.tensor([300, 700]))


@pytest.mark.parametrize(("preset", "optimizer_class", "overrides"), [
    # the preset's lr 1.0; d0 (Prodigy's first step-size estimate, 1e-6 by default) raised so that a
    # few steps suffice: from 1e-6 the estimate takes dozens of steps to grow
    ("prodigy", "Prodigy", ["+optim.optimizer.d0=1e-3"]),
    ("adafactor", "Adafactor", ["optim.optimizer.lr=3e-3"]),  # a fixed lr it must honour (tiny model, few steps)
])
def test_optimizer_preset_builds_and_trains_the_lora(tiny_sd15, preset, optimizer_class, overrides):
    """The preset's optimizer trains a real LoRA UNet: the B matrices leave zero and the loss on a fixed
    batch falls. Catches a preset whose settings do not reach the optimizer (Adafactor's relative_step
    ignoring lr, Prodigy kept at a tiny lr) or that cannot be built from its _target_."""
    cfg = resolved(compose_cfg(*TINY, f"optim={preset}", "optim.scheduler.name=constant", *overrides))
    module = LoRATrainingModule(cfg)
    module.setup("fit")
    torch.manual_seed(0)
    named = named_trainable_lora_parameters(module.parts.unet)
    opt = build_optimization(cfg["optim"], cfg["trainer"], named, device=torch.device("cpu"), total_steps=8)
    optimizer = opt["optimizer"]
    assert type(optimizer).__name__ == optimizer_class
    with torch.no_grad():
        text = module.family.encode_prompts(module.parts, ["a red circle", "a blue square"])
        before = _fixed_batch_loss(module, text).item()
    for _ in range(8):
        optimizer.zero_grad()
        _fixed_batch_loss(module, text).backward()
        optimizer.step()
    with torch.no_grad():
        after = _fixed_batch_loss(module, text).item()
    moved = max(p.abs().max().item() for n, p in named if ".lora_B." in n)
    assert moved > 1e-4, moved  # lora_B starts at zero
    assert after < before * 0.985, (before, after)


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lora_plus_ratio=0"], r"optim.lora_plus_ratio must be a number > 0 .* got 0\. Fix: e\.g\. optim\.lora_plus_ratio=16"),
    (["optim.lora_plus_ratio=-4"], r"optim.lora_plus_ratio must be a number > 0 .* got -4"),
    (["optim.lora_plus_ratio=sixteen"], r"optim.lora_plus_ratio must be a number > 0 .* got 'sixteen'"),
    (["optim.lora_plus_ratio=true"], r"optim.lora_plus_ratio must be a number > 0 .* got True"),
    (["optim.scheduler.eta_min=1e-5"], r"optim.scheduler.eta_min=1e-05 is a floor for the cosine schedules only; "
                                       r"constant_with_warmup cannot honour it. Fix: optim.scheduler.name=cosine"),
    (["optim.scheduler.name=cosine", "optim.scheduler.eta_min=1e-4"],
     r"optim.scheduler.eta_min=0.0001 must be below optim.optimizer.lr=0.0001 .*Fix: e\.g\. optim\.scheduler\.eta_min=1e-05"),
    (["optim.scheduler.name=cosine", "optim.scheduler.eta_min=-1e-6"], r"optim.scheduler.eta_min must be >= 0, got -1e-06"),
    (["+optim.scheduler.min_lr=1e-6"], r"optim.scheduler.min_lr is not a setting .*a floor for cosine is eta_min"),
    (["train.ema.decay=1.0"], r"train.ema.decay must be in \(0, 1\), got 1.0"),
    (["train.ema.decay=0"], r"train.ema.decay must be > 0, got 0"),
    (["train.ema.use_for_export=true"], r"train.ema.use_for_export=true, but train.ema.enabled=false .*Fix: add train.ema.enabled=true"),
    (["train.ema.enabled=yes"], r"train.ema.enabled must be true or false, got 'yes'"),
])
def test_bad_optimizer_and_ema_values_are_refused_with_the_key_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(*TINY, *overrides))


def test_a_missing_optional_optimizer_package_names_the_pip_command(monkeypatch):
    """prodigyopt is an optional extra: without it, optim=prodigy stops before any model loads, with the install command."""
    validate(compose_cfg(*TINY, "optim=prodigy"))  # installed here (the dev extra): accepted
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what `import prodigyopt` sees when it is not installed
    with pytest.raises(ConfigError, match=r"optim.optimizer._target_=prodigyopt.Prodigy needs the package prodigyopt, "
                                          r"which is not installed. Fix: pip install prodigyopt==1.1.2"):
        validate(compose_cfg(*TINY, "optim=prodigy"))
