"""The diffusion maths of one training step, as pure functions of tensors, the family and its objective.

Kept apart from the LightningModule so that each piece can be checked by number: the loss (the
objective's noising, target and weights, :mod:`sdtune.families.objectives`, around the family's
``predict``), the VAE latent scaling, and the per-sample randomness that makes resumed and
multi-process runs reproduce one uninterrupted run. :func:`check_config` checks the ``train:``
settings these functions take (the objective's, and the noise offset). The split of a DreamBooth batch's loss
into its instance and class halves (:func:`split_prior_loss`) is here too: the data side only marks
which half is which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from sdtune.config.values import Settings
from sdtune.families import get_family
from sdtune.families.base import ModelFamily
from sdtune.families.objectives import PREDICTION_TYPES, Objective, min_snr_weights, regression_target

# The DDPM maths moved to sdtune.families.objectives (DDPMObjective); the names stay importable here.
__all__ = ["PREDICTION_TYPES", "min_snr_weights", "regression_target"]


def check_config(cfg: DictConfig) -> None:
    """``train.noise_offset``, then the objective's own ``train:`` settings (for the UNet families:
    ``train.prediction_type``, null: the model's, and ``train.snr_gamma``, null: off; a flow-matching
    objective refuses those and the offset)."""
    s = Settings(cfg)
    s.number("train.noise_offset", ge=0)
    get_family(s.get("model.family")).objective_class.check_config(cfg)


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


def denoising_loss(family: ModelFamily, denoiser, objective: Objective, latents: torch.Tensor, conditioning: dict,
                   noise: torch.Tensor, timesteps: torch.Tensor, *, dtype: torch.dtype,
                   mask: torch.Tensor | None = None, per_sample: bool = False) -> torch.Tensor:
    """The training loss: noise ``latents`` at ``timesteps`` (``objective``), let the family's
    denoiser predict, and regress the objective's target (weighted per sample by the objective,
    e.g. min-SNR-gamma, and per pixel by ``mask``; ``per_sample``: one loss per sample, see
    :func:`weighted_mse`).

    ``dtype`` is the frozen weights' dtype, passed in because asking the denoiser (``unet.dtype``)
    walks all of its ~1,000-7,500 submodules on every step (2 ms tiny SD1.5, 20 ms SDXL on a CPU).
    """
    noisy = objective.noisy(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps)
    kwargs = cast_floats(objective.conditioning(conditioning, latents.shape[0]), dtype)
    pred = family.predict(denoiser, noisy.to(dtype), objective.model_timestep(timesteps), kwargs).float()
    return weighted_mse(pred, target, objective.weights(timesteps), mask=mask, per_sample=per_sample)


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents as the UNet sees them: ``(z - shift_factor) * scaling_factor`` (no shift in SD/SDXL/Kolors)."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents.float() - shift) * vae_config.scaling_factor


def sample_randomness(seeds: Sequence[int], latent_shape: tuple[int, int, int], *, objective: Objective,
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
        timesteps.append(objective.draw_timestep(g, latent_shape))
    return torch.stack(eps), torch.stack(noise), torch.cat(timesteps)


def validation_randomness(seed: int, batch_idx: int, latent_shape: tuple[int, ...], objective: Objective
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for validation batch ``batch_idx``: fixed per run seed, so losses compare
    across steps and across runs with the same seed."""
    g = torch.Generator().manual_seed(int(seed) * 1000 + batch_idx)
    noise = torch.randn(latent_shape, generator=g)
    return noise, objective.validation_timesteps(g, latent_shape[0], latent_shape)


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
