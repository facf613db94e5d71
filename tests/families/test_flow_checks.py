"""What a flow-matching family refuses up front, through the real config checks (nothing loads):
image sizes off its pixel multiple, the speed switches its denoiser has no use for, and hardware
presets that leave it out, each with the key, the value and the fix. The families are registered by the test (tests/helpers/flow_family.py)."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from sdtune.config.paths import yaml_file
from sdtune.families import get_family
from sdtune.run.checks import validate
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg
from tests.helpers.flow_family import ConfigFlow, registered
from tests.helpers.paths import ROOT


@pytest.fixture(scope="module")
def base_cfg():
    return compose_cfg("experiment=quickstart")


def _cfg(base, family: str = "config_flow", **settings):
    cfg = base.copy()
    OmegaConf.update(cfg, "model.family", family)
    for key, value in settings.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


@pytest.mark.parametrize(("settings", "message"), [
    ({"data__resolution": 72}, r"data.resolution=72 is not divisible by 16 \(the VAE downsamples by 8 and the "
                               r"transformer takes 2x2 patches of latents, model.family=config_flow\). Fix: use 64 or 80"),
    ({"data__bucket_step": 40}, r"data.bucket_step=40 must be a multiple of 16 \(.*model.family=config_flow\). "
                                r"Fix: data.bucket_step=32"),
    ({"speed__channels_last": True}, r"speed.channels_last=true does not apply to model.family=config_flow: the NHWC "
                                     r"layout speeds up convolutions, and a transformer denoiser has none.*"
                                     r"Fix: speed.channels_last=false"),
])
def test_a_flow_family_refuses_sizes_off_its_multiple_and_channels_last(base_cfg, settings, message):
    with registered(ConfigFlow):
        validate(_cfg(base_cfg, data__resolution=80, data__bucket_step=32))  # multiples of 16 pass
        with pytest.raises(ConfigError, match=message):
            validate(_cfg(base_cfg, **settings))


def test_the_unet_families_keep_the_vaes_multiple_and_every_speed_switch(base_cfg):
    """A diffusers UNet upsamples to its skip connections' sizes, so 8 px steps train (conf/data's 64 is a
    convention, the toy tests use 16); the speed refusals are a family attribute, empty for the UNets."""
    assert {get_family(f).pixel_multiple for f in ("sd15", "sdxl", "kolors")} == {8}
    assert not any(get_family(f).speed_refusals for f in ("sd15", "sdxl", "kolors"))
    validate(_cfg(base_cfg, "sd15", data__resolution=72, data__bucket_step=24, speed__channels_last=True))
    with pytest.raises(ConfigError, match=r"data.resolution=100 is not divisible by 8 \(the VAE downsamples by 8, "
                                          r"model.family=sd15\). Fix: use 96 or 104"):
        validate(_cfg(base_cfg, "sd15", data__resolution=100))


def test_speed_refusals_are_read_from_the_family(base_cfg):
    class NoXformers(ConfigFlow):
        name = "config_flow_no_xformers"
        speed_refusals = {"speed.attention=xformers": "its attention has no xformers kernel. Fix: speed.attention=sdpa"}

    with registered(NoXformers):
        validate(_cfg(base_cfg, NoXformers.name, speed__channels_last=True))  # not refused by this family
        with pytest.raises(ConfigError, match=r"speed.attention=xformers does not apply to model.family="
                                              r"config_flow_no_xformers: its attention has no xformers kernel"):
            validate(_cfg(base_cfg, NoXformers.name, speed__attention="xformers"))
    with pytest.raises(ConfigError, match=r"speed.attention must be one of \['sdpa', 'xformers'\], got 'flash'"):
        validate(_cfg(base_cfg, "sd15", speed__attention="flash"))


def test_presets_list_every_family_or_refuse_it_with_a_fix_that_lists_it():
    """Every preset gives each family it leaves out a reason whose fix names a preset that lists it; the
    check prints that reason. FLUX.1 fits from 16 GB on (an nf4 base), as planned (tests/planning/test_presets.py)."""
    presets = {f.stem: yaml_file(f)["hardware_preset"] for f in (ROOT / "conf" / "hardware").glob("*.yaml")}
    assert set(presets) == {"8gb", "12gb", "16gb", "24gb", "48gb"}
    for name, preset in presets.items():
        assert preset["name"] == name and preset["memory_gib"] == int(name.removesuffix("gb"))
        refused = set(preset["refusals"])
        assert refused == {"sd15", "sdxl", "kolors", "flux", "sd35"} - set(preset["families"]), name
        for family, why in preset["refusals"].items():
            fix = re.search(r"Fix: hardware=(\d+gb)", why).group(1)
            assert family in presets[fix]["families"], (name, family, fix)
    assert [n for n, p in sorted(presets.items(), key=lambda x: x[1]["memory_gib"]) if "flux" in p["families"]] == \
        ["16gb", "24gb", "48gb"]
    flux = compose_cfg("experiment=quickstart", "hardware=8gb", "model.family=flux")
    with pytest.raises(ConfigError, match=r"hardware=8gb does not fit a flux LoRA \(it covers \['sd15', 'sdxl'\]\): "
                                          r"FLUX.1 does not fit an 8 GB card even in nf4: its sample images need .*"
                                          r"Planned peak `model.quantize=nf4`: 13.81 GiB \(sampling\).*Fix: hardware=16gb"):
        validate(flux)
