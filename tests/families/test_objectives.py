"""The family interface's denoiser and objectives, by number.

On the tiny SD1.5: the default ``predict`` is the UNet call, ``DDPMObjective`` is the DDPM maths the
loss used before it existed, building one draws nothing, and the old names (``parts.unet``,
``unet_conditioning``) still answer. ``FlowMatchObjective`` against diffusers' SD3/FLUX training
scripts and FLUX's sampler: noisy input, target, loss weights, the sigma distributions and shifts,
per-seed draws; and the ``train:`` settings each objective refuses, through the real config checks.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from omegaconf import OmegaConf

from sdtune.families import get_family
from sdtune.families.objectives import DDPMObjective, FlowMatchObjective
from sdtune.training.diffusion import sample_randomness, validation_randomness, weighted_mse
from sdtune.utils.errors import ConfigError
from tests.helpers.flow_family import FLUX_SCHEDULER, ConfigFlow, ConfigFlux, registered
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
    # the bench's plain loop draws a whole batch at once, as diffusers' script does
    batch = objective.batch_timesteps(3, (3, 4, 8, 8), torch.Generator().manual_seed(9))
    assert torch.equal(batch, torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(9)))


# --- flow matching (diffusers' train_dreambooth_lora_sd3.py / _flux.py maths) -------------------------------------

def _flow(flow: dict | None = None, **scheduler) -> FlowMatchObjective:
    return FlowMatchObjective(FlowMatchEulerDiscreteScheduler(**scheduler), flow)


def test_flow_noisy_target_and_weights_are_the_sd3_scripts_maths():
    objective = _flow()
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    assert torch.equal(objective.noisy(x, noise, sigma), (1.0 - s) * x + s * noise)
    assert torch.equal(objective.target(x, noise, sigma), noise - x)
    assert torch.equal(objective.model_timestep(sigma), sigma * 1000)  # what the pipelines pass the transformer
    assert objective.dummy_timesteps(2, "cpu").dtype == torch.float32
    assert objective.weights(sigma) is None  # loss_weighting: none
    pred = torch.randn(3, 16, 4, 4, generator=g)
    for scheme, closed in (("sigma_sqrt", sigma ** -2), ("cosmap", 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)))):
        weights = _flow({"loss_weighting": scheme}).weights(sigma)
        torch.testing.assert_close(weights, closed)
        # the scripts' loss: mean over each sample of weighting * (pred - target)^2, then over the batch
        target = noise - x
        script = torch.mean((closed.view(-1, 1, 1, 1) * (pred - target) ** 2).reshape(3, -1), 1).mean()
        torch.testing.assert_close(weighted_mse(pred, target, weights), script)


def test_flow_sigma_distributions_from_a_fixed_generator():
    """4000 draws of each scheme (no shift) against their closed forms, and against the draw itself."""
    n = 4000
    shape = (n, 16, 8, 8)
    logit = _flow({"logit_mean": 0.5, "logit_std": 0.8}, shift=1.0)
    sigma = logit.validation_timesteps(torch.Generator().manual_seed(1), n, shape)
    assert torch.equal(sigma, torch.sigmoid(torch.normal(0.5, 0.8, (n,), generator=torch.Generator().manual_seed(1))))
    z = torch.logit(sigma.double())
    assert abs(z.mean() - 0.5) < 0.04 and abs(z.std() - 0.8) < 0.03
    assert abs(sigma.median() - torch.sigmoid(torch.tensor(0.5))) < 0.02
    uniform = _flow({"timestep_sampling": "uniform"}, shift=1.0).validation_timesteps(
        torch.Generator().manual_seed(2), n, shape)
    for q in (0.1, 0.5, 0.9):
        assert abs(torch.quantile(uniform, q) - q) < 0.02
    mode = _flow({"timestep_sampling": "mode", "mode_scale": 1.29}, shift=1.0).validation_timesteps(
        torch.Generator().manual_seed(3), n, shape)
    # σ = f(u) = 1 - u - s·(cos²(πu/2) - 1 + u) falls with u, so its (1-v)-quantile is f(v)
    f = lambda u: 1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u)  # noqa: E731
    for v in (0.25, 0.5, 0.75):
        assert abs(torch.quantile(mode, 1 - v) - f(v)) < 0.03
    assert 0 <= float(mode.min()) and float(mode.max()) <= 1


def test_flux_dynamic_shift_is_its_samplers_at_the_same_resolution():
    """FLUX's scheduler shifts by resolution (use_dynamic_shifting): at 1024² (a 128x128 latent, 64x64 = 4096
    packed tokens) mu = 1.15, and each drawn σ is what FluxPipeline's scheduler makes of the same u."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    objective = _flow(**FLUX_SCHEDULER)
    for h, w, mu in ((128, 128, 1.15), (64, 96, None)):
        packed = FluxPipeline._pack_latents(torch.zeros(1, 16, h, w), 1, 16, h, w)  # the sampler's latents
        sampler_mu = calculate_shift(packed.shape[1], 256, 4096, 0.5, 1.15)
        if mu is not None:
            assert sampler_mu == pytest.approx(mu)
        g = torch.Generator().manual_seed(7)
        sigma = objective.validation_timesteps(g, 5, (5, 16, h, w))
        u = torch.sigmoid(torch.normal(0.0, 1.0, (5,), generator=torch.Generator().manual_seed(7)))
        scheduler = objective.scheduler
        assert torch.equal(sigma, scheduler.time_shift(sampler_mu, 1.0, u))
        assert torch.equal(sigma, objective.batch_timesteps(5, (5, 16, h, w), torch.Generator().manual_seed(7)))
        sampler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        sampler.set_timesteps(sigmas=u.numpy(), mu=sampler_mu)  # FluxPipeline.__call__'s retrieve_timesteps
        torch.testing.assert_close(sigma, sampler.sigmas[:-1])
    # a number in train.flow.shift forces the static shift s·u/(1+(s-1)·u), even on FLUX's scheduler
    for objective, s in ((_flow({"shift": 2.0}, **FLUX_SCHEDULER), 2.0), (_flow(shift=3.0), 3.0)):
        sigma = objective.validation_timesteps(torch.Generator().manual_seed(7), 5, (5, 16, 128, 128))
        torch.testing.assert_close(sigma, s * u / (1 + (s - 1) * u))


def test_flow_draws_are_per_seed_and_independent_of_the_batch():
    before = torch.random.get_rng_state()
    objective = ConfigFlux().objective(
        dataclasses.make_dataclass("P", ["noise_scheduler"])(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)),
        {"flow": {"timestep_sampling": "logit_normal"}})
    assert torch.equal(torch.random.get_rng_state(), before)  # building it draws nothing
    together = sample_randomness([3, 4, 5], (16, 8, 8), objective=objective)
    alone = sample_randomness([4], (16, 8, 8), objective=objective)
    assert all(torch.equal(a[1:2], b) for a, b in zip(together, alone, strict=True))
    assert together[2].dtype == torch.float32 and ((0 < together[2]) & (together[2] < 1)).all()
    g = torch.Generator().manual_seed(4)
    torch.randn(16, 8, 8, generator=g), torch.randn(16, 8, 8, generator=g)  # eps, noise: the draw order
    assert torch.equal(alone[2], objective.draw_timestep(g, (16, 8, 8)))


def test_flow_guidance_input_is_on_the_texts_device_and_dtype_follows_the_step():
    objective = FlowMatchObjective(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), guidance=3.5)
    cond = objective.conditioning({"encoder_hidden_states": torch.zeros(2, 3, 4, device="meta")}, 2)
    assert cond["guidance"].device.type == "meta" and cond["guidance"].shape == (2,)
    assert torch.equal(objective.conditioning({"x": torch.zeros(1)}, 2)["guidance"], torch.full((2,), 3.5))
    assert "guidance" not in _flow().conditioning({"x": torch.zeros(1)}, 2)


@pytest.fixture(scope="module")
def quickstart_cfg():
    from tests.helpers.config import compose_cfg

    return compose_cfg("experiment=quickstart")


FLOW_REFUSALS = [
    ("train.snr_gamma", 5.0, r"train.snr_gamma=5.0 does not apply to model.family=config_flow: min-SNR weights .*"
                             r"train.flow.loss_weighting.*Fix: train.snr_gamma=null"),
    ("train.prediction_type", "epsilon", r"train.prediction_type='epsilon' does not apply .*velocity noise - latents"
                                         r".*Fix: train.prediction_type=null"),
    ("train.noise_offset", 0.05, r"train.noise_offset=0.05 does not apply .*pure noise. Fix: train.noise_offset=0.0"),
    ("train.flow.timestep_sampling", "cosine", r"train.flow.timestep_sampling"),
    ("train.flow.logit_std", 0, r"train.flow.logit_std must be > 0"),
    ("train.flow.shift", -1, r"train.flow.shift must be > 0"),
    ("train.flow.loss_weighting", "snr", r"train.flow.loss_weighting"),
    ("train.flow.mode_scale", 2.5, r"train.flow.mode_scale .*1.7519"),  # past 2/(pi-2) the mode map folds back on itself
]


@pytest.mark.parametrize(("key", "value", "message"), FLOW_REFUSALS, ids=[c[0] for c in FLOW_REFUSALS])
def test_the_config_checks_refuse_what_the_flow_objective_does_not_have(quickstart_cfg, key, value, message):
    from sdtune.run.checks import validate

    cfg = quickstart_cfg.copy()
    OmegaConf.update(cfg, "model.family", "config_flow")
    with registered(ConfigFlow):
        validate(cfg.copy())  # the shipped defaults pass, an integer zero offset too
        OmegaConf.update(cfg, "train.noise_offset", 0)
        validate(cfg.copy())
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ConfigError, match=message):
            validate(cfg)


@pytest.mark.parametrize(("key", "value"), [("shift", 3.0), ("timestep_sampling", "uniform"), ("guidance", 3.5)])
def test_the_ddpm_objective_refuses_flow_settings_that_would_do_nothing(quickstart_cfg, key, value):
    from sdtune.run.checks import validate

    cfg = quickstart_cfg.copy()
    OmegaConf.update(cfg, f"train.flow.{key}", value)
    with pytest.raises(ConfigError, match=rf"train.flow.{key}={value!r} applies to flow-matching bases only, and "
                                          rf"model.family=sd15 trains on a DDPM schedule.*Fix: drop it"):
        validate(cfg)
