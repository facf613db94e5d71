"""The diffusion maths by number: targets, min-SNR-gamma weights, latent scaling, per-sample randomness,
and the LightningModule's loss wired to exactly these pieces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdtune.families.objectives import DDPMObjective
from sdtune.training.diffusion import min_snr_weights, regression_target, sample_randomness, scale_latents, weighted_mse

T = torch.tensor([0, 10, 250, 500, 999])


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def _snr(scheduler, t):
    a = scheduler.alphas_cumprod[t].double()
    return a / (1 - a)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_snr_or_snr_plus_one(prediction_type):
    """Hang et al. 2023 as diffusers' train_text_to_image_lora.py applies it, from alphas_cumprod by hand."""
    scheduler = _scheduler(prediction_type)
    snr = _snr(scheduler, T)
    clipped = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    got = min_snr_weights(scheduler, T, 5.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)
    # noisy steps (SNR < gamma) keep full weight for epsilon; clean ones are damped to gamma / SNR
    if prediction_type == "epsilon":
        assert got[-1] == pytest.approx(1.0) and got[0] < 0.01


def test_regression_target_is_the_noise_or_the_velocity():
    latents, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    assert torch.equal(regression_target(_scheduler("epsilon"), latents, noise, T), noise)
    v = regression_target(_scheduler("v_prediction"), latents, noise, T)
    a = _scheduler("v_prediction").alphas_cumprod[T].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * latents)  # v = sqrt(a) eps - sqrt(1-a) x0
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        regression_target(_scheduler("sample"), latents, noise, T)


def test_weighted_mse_weights_each_samples_mean_error():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])  # per-sample MSE 1 and 9
    assert weighted_mse(pred, target).item() == pytest.approx(5.0)
    assert weighted_mse(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 * 1 + 9 * 0.5) / 2)


def test_scale_latents_applies_shift_then_scale():
    class Config:
        scaling_factor, shift_factor = 0.5, 0.25

    z = torch.tensor([1.25, 0.25])
    assert scale_latents(z, Config).tolist() == [0.5, 0.0]
    Config.shift_factor = None  # SD/SDXL/Kolors VAEs have none
    assert scale_latents(z, Config).tolist() == [0.625, 0.125]


def test_each_sample_draws_from_its_own_seed_whatever_the_batch():
    shape = (4, 8, 8)
    eps, noise, t = sample_randomness([7, 8, 9], shape, objective=DDPMObjective(_scheduler("epsilon")))
    alone = sample_randomness([8], shape, objective=DDPMObjective(_scheduler("epsilon")))
    assert torch.equal(eps[1], alone[0][0]) and torch.equal(noise[1], alone[1][0]) and t[1] == alone[2][0]
    assert not torch.equal(noise[0], noise[1])
    # the offset adds one constant per sample and channel on top of the same noise
    _, offset_noise, _ = sample_randomness([7, 8, 9], shape, objective=DDPMObjective(_scheduler("epsilon")), noise_offset=0.1)
    delta = offset_noise - noise
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-6) and delta.abs().max() > 0.01


def test_the_modules_loss_is_this_maths_on_its_unet(tmp_path, tiny_sd15):
    """snr_gamma, the prediction type and the latent inputs reach the loss: recomputed by hand."""
    from sdtune.data.collate import collate
    from sdtune.training.module import LoRATrainingModule
    from tests.helpers.config import compose_cfg, resolved

    cfg = compose_cfg("experiment=quickstart", "model=tiny", "train.snr_gamma=5.0", "train.prediction_type=v_prediction",
                      output_dir=tmp_path)
    module = LoRATrainingModule(resolved(cfg))
    module.setup("fit")
    item = {"pixel_values": torch.zeros(3, 64, 64), "text": "a red circle", "original_size": torch.tensor([64, 64]),
            "crop_top_left": torch.tensor([0, 0]), "target_size": torch.tensor([64, 64])}
    batch = collate([item] * 3)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 990])
    with torch.no_grad():
        text = module.encode_text(batch["text"])
        loss = module.diffusion_loss(latents, text, batch, noise=noise, timesteps=t)
        scheduler = module.parts.noise_scheduler
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = module.parts.unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, encoder_hidden_states=text["encoder_hidden_states"]).sample
        per_sample = F.mse_loss(pred, a.sqrt() * noise - (1 - a).sqrt() * latents, reduction="none").mean(dim=(1, 2, 3))
        snr = a.flatten() / (1 - a.flatten())
    expected = (per_sample * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
