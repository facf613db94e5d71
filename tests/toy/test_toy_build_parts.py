"""Pieces of the toy build that need no training: the widened 16-channel VAE and the report merge."""

from __future__ import annotations

import random

import pytest
import torch

from sdtune.data.images import to_tensor
from sdtune.toy.build import TOY_ROOT, merge_results
from sdtune.toy.domain import random_colour_image
from sdtune.toy.widen import widen_vae


@pytest.mark.slow  # 4 s on the shared 2-core machine (load 8)
@torch.no_grad()
def test_widened_vae_keeps_the_4_channel_code_in_flux_sd3_layout():
    from diffusers import AutoencoderKL

    vae4 = AutoencoderKL.from_pretrained(TOY_ROOT / "sd15" / "vae", torch_dtype=torch.float32)
    vae16 = widen_vae(vae4, 16)
    assert vae16.config.latent_channels == 16 and vae16.quant_conv is None and vae16.post_quant_conv is None
    rng = random.Random(0)
    x = torch.stack([to_tensor(random_colour_image(rng, 64)) for _ in range(2)])
    code4, code16 = vae4.encode(x).latent_dist, vae16.encode(x).latent_dist
    # quant_conv folded into conv_out: the first 4 channels are the 4-channel means; log-variance starts at -8
    torch.testing.assert_close(code16.mean[:, :4], code4.mean, atol=1e-4, rtol=1e-4)
    assert code16.mean[:, 4:].abs().max() < 0.3 and torch.all(code16.logvar == -8.0)
    # post_quant_conv folded into conv_in: the same pictures back (inexact only at the border)
    interior = (vae16.decode(code16.mean).sample - vae4.decode(code4.mean).sample)[..., 8:-8, 8:-8]
    assert interior.abs().max() < 0.1


def test_merge_results_keeps_the_families_not_rebuilt():
    old = {"probe": {"sd15": {"colour": 0.97}}, "seconds": {"vae": 400.0, "sd15": 300.0, "total": 710.0},
           "recipe": {"seed": 0}, "headline_guidance": {"sd15": 2.0}}
    fresh = {"probe": {"flux": {"colour": 0.9}}, "seconds": {"vae16": 100.0, "flux": 50.0, "total": 150.0},
             "recipe": {"seed": 0, "flow_steps": 2200}, "headline_guidance": {"flux": 1.0}}
    merged = merge_results(old, fresh)
    assert merged["probe"] == {"sd15": {"colour": 0.97}, "flux": {"colour": 0.9}}
    assert merged["seconds"] == {"vae": 400.0, "sd15": 300.0, "vae16": 100.0, "flux": 50.0, "total": 850.0}
    assert merged["recipe"] == fresh["recipe"] and merged["headline_guidance"] == {"sd15": 2.0, "flux": 1.0}
    # re-measuring only (no stage timed) leaves the recorded times as they were
    assert merge_results(old, {"probe": {"sd15": {"colour": 0.5}}})["seconds"] == old["seconds"]
