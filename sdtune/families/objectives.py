"""Training objectives: how a step noises the latents, what the denoiser learns to predict, and
how each sample's loss is weighted.

A family picks its objective (:meth:`sdtune.families.base.ModelFamily.objective`), so the
training step never asks which kind of model it trains: the UNet families regress noise or
velocity on a DDPM schedule (:class:`DDPMObjective`); flow-matching transformers regress a
velocity on a continuous sigma. Every draw of randomness goes through a caller's generator, one
sample at a time, so a resumed or multi-process run draws what one uninterrupted run draws, and
building an objective draws nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from omegaconf import DictConfig

from sdtune.config.values import Settings

PREDICTION_TYPES = ("epsilon", "v_prediction")


class Objective(ABC):
    """One training objective, over the family's training scheduler."""

    @classmethod
    @abstractmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Check this objective's ``train:`` settings and refuse those it does not have (before anything loads)."""

    @abstractmethod
    def draw_timestep(self, g: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """One sample's training timestep, shape (1,), drawn from ``g`` (its per-sample generator)."""

    @abstractmethod
    def validation_timesteps(self, g: torch.Generator, batch: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """(B,) fixed timesteps for a validation batch of latents of ``latent_shape`` (B, C, h, w)."""

    @abstractmethod
    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's input: ``latents`` noised with ``noise`` at ``timesteps``."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to predict."""

    def model_timestep(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep as the denoiser takes it."""
        return timesteps

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (None: all 1)."""
        return None

    @abstractmethod
    def dummy_timesteps(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """Timesteps of the right dtype for a step whose values do not matter (the FLOP counter)."""


class DDPMObjective(Objective):
    """Noise (epsilon) or velocity regression on a DDPM schedule, diffusers' text-to-image recipe.

    ``prediction_type`` (``train.prediction_type``; None: the scheduler's own) is written into the
    scheduler's config, which the sampling schedulers are built from; ``snr_gamma`` turns on
    min-SNR-gamma weights.
    """

    def __init__(self, scheduler: Any, *, snr_gamma: float | None = None, prediction_type: str | None = None):
        if prediction_type:
            scheduler.register_to_config(prediction_type=prediction_type)
        self.scheduler = scheduler
        self.snr_gamma = snr_gamma
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """``train.prediction_type`` (null: the model's) and ``train.snr_gamma`` (null: off)."""
        s = Settings(cfg)
        s.choice("train.prediction_type", (None, *PREDICTION_TYPES),
                 said=", ".join(PREDICTION_TYPES) + " or null (use the model's)")
        s.number("train.snr_gamma", gt=0, optional=True)

    def draw_timestep(self, g: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (1,), generator=g)

    def validation_timesteps(self, g: torch.Generator, batch: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=g)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return regression_target(self.scheduler, latents, noise, timesteps)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        return min_snr_weights(self.scheduler, timesteps, self.snr_gamma) if self.snr_gamma else None

    def dummy_timesteps(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.long, device=device)


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
