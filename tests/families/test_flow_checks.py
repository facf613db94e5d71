"""What a flow-matching family refuses up front, through the real config checks (nothing loads):
image sizes off its pixel multiple, the speed switches its denoiser has no use for, and hardware
presets too small for its weights (counted on the meta device from published configs), each with
the key, the value and the fix. The families are registered by the test (tests/helpers/flow_family.py)."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from sdtune.config.paths import yaml_file
from sdtune.families import get_family
from sdtune.run.checks import validate
from sdtune.utils.errors import ConfigError
from tests.helpers.config import compose_cfg
from tests.helpers.flow_family import FLUX_DEV, SD35_LARGE, SD35_MEDIUM, ConfigFlow, ConfigFlux, flow_folder, registered
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


@pytest.fixture(scope="module")
def preset_cfg():
    return compose_cfg("experiment=quickstart", "hardware=24gb")


def _on_card(preset_cfg, family, folder, gib: int, **settings):
    """``preset_cfg`` (hardware=24gb) as a ``gib`` card listing ``family``, the base at ``folder``."""
    return _cfg(preset_cfg, family, model__path=str(folder), hardware_preset__name=f"{gib}gb",
                hardware_preset__memory_gib=gib, hardware_preset__families=[family], trainer__precision="bf16-mixed",
                data__batch_size=1, train__gradient_checkpointing=True, **settings)


def test_a_flux_sized_transformer_is_refused_at_24gb_and_fits_48gb(preset_cfg, tmp_path):
    folder = flow_folder(tmp_path, FLUX_DEV)
    with registered(ConfigFlux):
        with pytest.raises(ConfigError, match=r"hardware=24gb does not fit this config_flux base .*: the frozen weights "
                                              r"that stay on the GPU take 23.8 GB in bfloat16 \(denoiser 23.8 GB\), over "
                                              r"the 21.9 GB a 24 GiB card leaves them .*Fix: hardware=48gb"):
            validate(_on_card(preset_cfg, ConfigFlux.name, folder, 24))
        validate(_on_card(preset_cfg, ConfigFlux.name, folder, 48))


def test_sd35_large_fits_24gb_not_16gb_and_the_text_encoders_count_unless_cached(preset_cfg, tmp_path):
    large, medium = flow_folder(tmp_path / "large", SD35_LARGE), flow_folder(tmp_path / "medium", SD35_MEDIUM)
    with registered(ConfigFlow):
        validate(_on_card(preset_cfg, ConfigFlow.name, large, 24))  # 16.3 GB, the pos-embed buffer included
        validate(_on_card(preset_cfg, ConfigFlow.name, medium, 16))
        with pytest.raises(ConfigError, match=r"take 16.3 GB in bfloat16 \(denoiser 16.3 GB\), over the 14.6 GB a "
                                              r"16 GiB card leaves them.*Fix: hardware=24gb"):
            validate(_on_card(preset_cfg, ConfigFlow.name, large, 16))
        # without the caches the VAE and the text encoders (here SD1.5's, 0.25 GB in all) stay on the GPU too
        with pytest.raises(ConfigError, match=r"\(denoiser 4.9 GB, vae 0.2 GB, text_encoders 0.2 GB\).*Fix: hardware="
                                              r"8gb .*or cache the captions' embeddings"):
            validate(_on_card(preset_cfg, ConfigFlow.name, medium, 5, data__cache_latents=False,
                              train__cache_text_embeddings=False))


def test_presets_refuse_a_family_they_do_not_list_with_their_own_reason():
    """Every preset gives each family it leaves out a reason whose fix names a preset that lists it; the
    check prints that reason."""
    presets = {f.stem: yaml_file(f)["hardware_preset"] for f in (ROOT / "conf" / "hardware").glob("*.yaml")}
    assert set(presets) == {"8gb", "12gb", "16gb", "24gb", "48gb"}
    for name, preset in presets.items():
        assert preset["name"] == name and preset["memory_gib"] == int(name.removesuffix("gb"))
        refused = set(preset["refusals"])
        assert refused == {"sd15", "sdxl", "kolors", "flux", "sd35"} - set(preset["families"]), name
        for family, why in preset["refusals"].items():
            fix = re.search(r"Fix: hardware=(\d+gb)", why).group(1)
            assert family in presets[fix]["families"], (name, family, fix)
    assert [n for n, p in sorted(presets.items(), key=lambda x: x[1]["memory_gib"]) if "flux" in p["families"]] == ["48gb"]
    flux = compose_cfg("experiment=quickstart", "hardware=24gb", "model.family=flux")
    with pytest.raises(ConfigError, match=r"hardware=24gb does not fit a flux LoRA \(it covers \['sd15', 'sdxl', "
                                          r"'kolors', 'sd35'\]\): FLUX.1's transformer alone is 23.8 GB in bf16.*"
                                          r"Fix: hardware=48gb"):
        validate(flux)
