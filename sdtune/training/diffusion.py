"""The diffusion maths of one training step, as pure functions of tensors and the noise scheduler.

Kept apart from the LightningModule so that each piece can be checked by number: the regression
target per prediction type, the min-SNR-gamma weights (against diffusers' ``compute_snr``), the
VAE latent scaling, and the per-sample randomness that makes resumed and multi-process runs
reproduce one uninterrupted run. :func:`check_config` checks the ``train:`` settings these
functions take (prediction type, min-SNR gamma, noise offset). The split of a DreamBooth batch's loss
into its instance and class halves (:func:`split_prior_loss`) is here too: the data side only marks
which half is which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from sdtune.config.values import Settings

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_config(cfg: DictConfig) -> None:
    """``train.prediction_type`` (null: the model's), ``train.snr_gamma`` (null: off) and
    ``train.noise_offset``."""
    s = Settings(cfg)
    s.choice("train.prediction_type", (None, *PREDICTION_TYPES),
             said=", ".join(PREDICTION_TYPES) + " or null (use the model's)")
    s.number("train.snr_gamma", gt=0, optional=True)
    s.number("train.noise_offset", ge=0)


def regression_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict for ``latents`` noised with ``noise`` at ``timesteps``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; sdtune trains {PREDICTION_TYPES}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023), as diffusers'
    ``train_text_to_image_lora.py`` computes them: ``min(SNR, gamma) / SNR`` for epsilon
    prediction and ``min(SNR, gamma) / (SNR + 1)`` for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=float(gamma))
    return clipped / snr if scheduler.config.prediction_type == "epsilon" else clipped / (snr + 1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None, *,
                 mask: torch.Tensor | None = None, per_sample: bool = False) -> torch.Tensor:
    """Mean squared error in fp32; with ``weights``, each sample's mean error is weighted first.

    ``mask`` (B, 1, h, w) on the latent grid weights each pixel's error (masked loss); a sample's
    error is then normalised by the mean over *all* its pixels, as kohya's ``apply_masked_loss``
    does, not by the mask's sum: a mask of ones is exactly the unmasked loss, and a sample whose
    mask covers a quarter of the image weighs a quarter as much. ``per_sample`` returns the (B,)
    per-sample losses (min-SNR weights applied) instead of their mean, for prior preservation.
    """
    pred, target = pred.float(), target.float()
    if weights is None and mask is None and not per_sample:
        return F.mse_loss(pred, target, reduction="mean")
    error = F.mse_loss(pred, target, reduction="none")
    if mask is not None:
        error = error * mask.to(error.device, error.dtype)
    losses = error.mean(dim=list(range(1, pred.ndim)))
    if weights is not None:
        losses = losses * weights
    return losses if per_sample else losses.mean()


def cast_floats(value, dtype: torch.dtype):
    """Cast floating tensors, also inside nested dicts (SDXL's ``added_cond_kwargs``)."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def denoising_loss(unet, scheduler, latents: torch.Tensor, conditioning: dict, noise: torch.Tensor,
                   timesteps: torch.Tensor, *, dtype: torch.dtype, snr_gamma: float | None = None,
                   mask: torch.Tensor | None = None, per_sample: bool = False) -> torch.Tensor:
    """The training loss: noise ``latents`` at ``timesteps``, let the UNet predict, and regress the
    scheduler's target (weighted by min-SNR-gamma when ``snr_gamma`` is set, per pixel by ``mask``;
    ``per_sample``: one loss per sample, see :func:`weighted_mse`).

    ``dtype`` is the frozen weights' dtype, passed in because asking the UNet (``unet.dtype``)
    walks all of its ~1,000-7,500 submodules on every step (2 ms tiny SD1.5, 20 ms SDXL on a CPU).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = regression_target(scheduler, latents, noise, timesteps)
    kwargs = cast_floats(conditioning, dtype)
    pred = unet(noisy.to(dtype), timesteps, **kwargs, return_dict=False)[0].float()
    return weighted_mse(pred, target, min_snr_weights(scheduler, timesteps, snr_gamma) if snr_gamma else None,
                        mask=mask, per_sample=per_sample)


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents as the UNet sees them: ``(z - shift_factor) * scaling_factor`` (no shift in SD/SDXL/Kolors)."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents.float() - shift) * vae_config.scaling_factor


def sample_randomness(seeds: Sequence[int], latent_shape: tuple[int, int, int], *, num_train_timesteps: int,
                      noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent eps, noise, timesteps) for a batch, each sample's drawn from its own seed in a fixed order.

    Independent of batch composition, process count and interruptions: the same sample seed gets
    the same draws whichever batch, rank or resumed run it lands in.
    """
    c, h, w = latent_shape
    eps, noise, timesteps = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        eps.append(torch.randn(c, h, w, generator=g))
        n = torch.randn(c, h, w, generator=g)
        if noise_offset:
            n = n + noise_offset * torch.randn(c, 1, 1, generator=g)
        noise.append(n)
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
    return torch.stack(eps), torch.stack(noise), torch.cat(timesteps)


def validation_randomness(seed: int, batch_idx: int, latent_shape: tuple[int, ...], num_train_timesteps: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for validation batch ``batch_idx``: fixed per run seed, so losses compare
    across steps and across runs with the same seed."""
    g = torch.Generator().manual_seed(int(seed) * 1000 + batch_idx)
    noise = torch.randn(latent_shape, generator=g)
    return noise, torch.randint(0, num_train_timesteps, (latent_shape[0],), generator=g)


def latent_shape(batch: dict, vae_config) -> tuple[int, int, int]:
    """(channels, height, width) of one sample's latent, from cached latent parameters or pixels."""
    if "latent_params" in batch:
        c2, h, w = batch["latent_params"].shape[1:]
        return c2 // 2, h, w
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    _, _, h, w = batch["pixel_values"].shape
    return vae_config.latent_channels, h // factor, w // factor


@torch.no_grad()
def batch_latents(vae, batch: dict, *, device: torch.device, dtype: torch.dtype, deterministic: bool = False,
                  eps: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled latents from cached distributions (``latent_params``) or by encoding ``pixel_values``.

    ``deterministic`` takes the mean; ``eps`` is the standard-normal draw for the sample
    (``mean + std * eps``), so the caller controls the randomness; otherwise the VAE samples.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_params" in batch:
        dist = DiagonalGaussianDistribution(batch["latent_params"].float().to(device))
    else:
        # ``device`` is the caller's (the module's): ``vae.device`` walks every VAE submodule per call
        dist = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
    if deterministic:
        latents = dist.mode()
    elif eps is not None:
        latents = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
    else:
        latents = dist.sample()
    return scale_latents(latents, vae.config).to(device)


def split_prior_loss(losses: torch.Tensor, prior: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, class loss) from per-sample ``losses``: mean over instance samples + ``weight`` x
    mean over class samples, diffusers' ``loss + args.prior_loss_weight * prior_loss``.

    Means of masked sums, not ``losses[prior]``: boolean indexing has to read the mask back to
    size its result, a host sync on every step on a GPU.
    """
    prior = prior.to(losses.device)
    zero = losses.new_zeros(())
    class_loss = torch.where(prior, losses, zero).sum() / prior.sum()
    instance_loss = torch.where(prior, zero, losses).sum() / (~prior).sum()
    return instance_loss + float(weight) * class_loss, class_loss
