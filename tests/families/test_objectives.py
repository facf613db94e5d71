"""The family interface's denoiser and objective, by number on the tiny SD1.5: the default
``predict`` is the UNet call, ``DDPMObjective`` is the DDPM maths the loss used before it existed,
building one draws nothing, and the old names (``parts.unet``, ``unet_conditioning``) still answer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.families import get_family
from sdtune.families.objectives import DDPMObjective
from sdtune.training.diffusion import sample_randomness, validation_randomness
from tests.helpers.models import unet_inputs


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


@pytest.fixture(scope="module")
def sd15_parts(tiny_sd15):
    family = get_family("sd15")
    return family, family.load(str(tiny_sd15))


def test_predict_is_the_unet_call_and_the_old_names_still_answer(sd15_parts):
    family, parts = sd15_parts
    assert family.denoiser_subfolder == "unet" and type(parts.denoiser).__name__ == family.denoiser_class
    assert type(parts.noise_scheduler).__name__ == family.training_scheduler
    assert parts.unet is parts.denoiser
    with pytest.raises(AttributeError):
        parts.unet = parts.vae  # read-only while call sites move
    sample, t, kwargs = unet_inputs("sd15")
    with torch.no_grad():
        assert torch.equal(family.predict(parts.denoiser, sample, t, kwargs), parts.denoiser(sample, t, **kwargs).sample)
    text = {"encoder_hidden_states": kwargs["encoder_hidden_states"]}
    assert family.unet_conditioning(text, {}) == family.conditioning(text, {})


def test_pipeline_call_kwargs_are_guidance_and_the_cross_attention_scale():
    family = get_family("sdxl")
    assert family.pipeline_call_kwargs(2) == {"guidance_scale": 2.0}
    assert family.pipeline_call_kwargs(5.0, 0.5) == {"guidance_scale": 5.0, "cross_attention_kwargs": {"scale": 0.5}}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_objective_is_the_schedulers_maths(prediction_type):
    scheduler = _scheduler(prediction_type)
    objective = DDPMObjective(scheduler, snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 990])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(objective.noisy(x, noise, t), a.sqrt() * x + (1 - a).sqrt() * noise)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x
    torch.testing.assert_close(objective.target(x, noise, t), target)
    snr = a.flatten() / (1 - a.flatten())
    weights = torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(objective.weights(t), weights)
    assert DDPMObjective(scheduler).weights(t) is None and torch.equal(objective.model_timestep(t), t)
    assert objective.dummy_timesteps(2, "cpu").dtype == torch.long


def test_the_objective_draws_what_randint_drew_and_building_it_draws_nothing():
    """The per-sample draw order (eps, noise, offset, then the timestep) and validation's (noise,
    then the timesteps) are those of the runs recorded in tests/golden/."""
    before = torch.random.get_rng_state()
    scheduler = _scheduler()
    objective = get_family("sd15").objective(dataclasses.make_dataclass("P", ["noise_scheduler"])(scheduler),
                                             {"prediction_type": "v_prediction", "snr_gamma": None})
    assert torch.equal(torch.random.get_rng_state(), before)
    assert scheduler.config.prediction_type == "v_prediction"  # the sampler reads it from the same config
    eps, noise, t = sample_randomness([3, 4], (4, 8, 8), objective=objective, noise_offset=0.1)
    for i, seed in enumerate((3, 4)):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(eps[i], torch.randn(4, 8, 8, generator=g))
        n = torch.randn(4, 8, 8, generator=g)
        assert torch.equal(noise[i], n + 0.1 * torch.randn(4, 1, 1, generator=g))
        assert torch.equal(t[i : i + 1], torch.randint(0, 1000, (1,), generator=g))
    noise, t = validation_randomness(42, 3, (2, 4, 8, 8), objective)
    g = torch.Generator().manual_seed(42 * 1000 + 3)
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=g))
    assert torch.equal(t, torch.randint(0, 1000, (2,), generator=g))
