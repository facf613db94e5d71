"""The GPU memory presets are planned, not guessed: every family a ``hardware=<N>gb`` preset lists plans
under :data:`~sdtune.run.checks.PRESET_SHARE` of its card at full size, every family it refuses plans
over it with the figures its refusal quotes, and a run pushed past its preset by an override is
refused on a GPU with its planned peak and the switches that bring it back under."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from sdtune.config.paths import CONF_DIR, yaml_file
from sdtune.planning import plan_memory
from sdtune.run.checks import PRESET_SHARE, check_planned_fit
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg

PRESETS = sorted(((f.stem, yaml_file(f)["hardware_preset"]) for f in (CONF_DIR / "hardware").glob("*.yaml")),
                 key=lambda item: item[1]["memory_gib"])
FAMILIES = ("sd15", "sdxl", "kolors", "flux", "sd35")
GIB = 2**30


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_preset_plans_its_families_under_the_card_and_quotes_the_plan_when_it_refuses(family):
    """Full-size plans (the shipped configs on the meta device, ~15 s for the first preset of a family,
    ~1 s for the others: the builds and steps are cached per process)."""
    for name, preset in PRESETS:
        allowed = PRESET_SHARE * preset["memory_gib"] * GIB
        if family in preset["families"]:
            plan = plan_memory(compose_cfg(f"hardware={name}", f"model={family}"))
            assert plan.peak_bytes <= allowed, (name, family, plan.render(preset["memory_gib"]))
            continue
        quoted = re.findall(r"`([^`]*)`: (\d+\.\d\d) GiB", preset["refusals"][family])
        assert quoted, (name, family, "the refusal quotes no planned figure")
        for overrides, figure in quoted:
            plan = plan_memory(compose_cfg(f"hardware={name}", f"model={family}", *overrides.split()))
            assert plan.peak_bytes > allowed, (name, family, overrides)
            assert f"{plan.peak_bytes / GIB:.2f}" == figure, (name, family, overrides, plan.peak_bytes / GIB)
        fix = re.search(r"Fix: hardware=(\d+gb) \((\w+).*?, planned (\d+\.\d\d) GiB\)", preset["refusals"][family])
        fixed = plan_memory(compose_cfg(f"hardware={fix[1]}", f"model={family}"))
        assert (fixed.cfg["model"]["quantize"], f"{fixed.peak_bytes / GIB:.2f}") == (fix[2], fix[3]), (name, family)


@pytest.mark.slow
def test_a_run_pushed_past_its_preset_is_refused_with_its_plan_and_the_switches_that_fit():
    """The toy base at batch 256 without gradient checkpointing: ~1.07 GiB planned (0.75 of it the
    CUDA constant), over the 0.95 GiB a 1 GiB "card" allows; checkpointing or batch 1 fit."""
    cfg = compose_cfg("experiment=quickstart", "hardware=24gb", "data.batch_size=256", "data.resolution=64",
                      "train.gradient_checkpointing=false", "trainer.precision=16-mixed")
    OmegaConf.update(cfg, "hardware_preset.memory_gib", 1)
    plan = plan_memory(cfg, 1)
    assert plan.peak_bytes > PRESET_SHARE * GIB
    with pytest.raises(ConfigError) as refused:
        check_planned_fit(cfg)
    message = str(refused.value)
    assert f"planned to need {plan.peak_bytes / GIB:.2f} GiB of GPU memory at its peak (training step: " in message
    assert "activations (not checkpointed, batch 256)" in message and "(95% of 1 GiB)" in message
    fits = re.findall(r"(\S+=\S+) \(planned (\d+\.\d\d) GiB\)", message.split("Fix: ")[1])
    assert {"train.gradient_checkpointing=true", "data.batch_size=1"} <= {o for o, _ in fits}
    assert all(float(gib) <= PRESET_SHARE for _, gib in fits)
    OmegaConf.update(cfg, "hardware_preset.memory_gib", 2)
    check_planned_fit(cfg)  # the same run on a 2 GiB card passes
