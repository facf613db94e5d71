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

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from omegaconf import DictConfig

from sdtune.config.values import Settings
from sdtune.utils.errors import ConfigError

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

    def batch_timesteps(self, batch: int, latent_shape: tuple[int, ...],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) training timesteps drawn for a whole batch at once from ``generator`` (None: torch's
        global one), as a plain training loop draws them (the bench's reference loop); sdtune's own
        step draws per sample (:meth:`draw_timestep`)."""
        return self.validation_timesteps(generator, batch, latent_shape)

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

    def conditioning(self, cond: dict[str, Any], batch: int) -> dict[str, Any]:
        """The family's conditioning plus what the objective itself feeds the denoiser (none here)."""
        return cond


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
        flow = s.get("train.flow") or {}
        for key, default in FLOW_DEFAULTS.items():
            if key in flow and flow[key] != default:
                raise ConfigError(
                    f"train.flow.{key}={flow[key]!r} applies to flow-matching bases only, and "
                    f"model.family={s.get('model.family')} trains on a DDPM schedule, so it would do nothing. "
                    f"Fix: drop it (train.flow.{key}={'null' if default is None else default}).")

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


#: ``train.flow.*`` as shipped (conf/config.yaml); the DDPM objective refuses any other value,
#: which would silently do nothing there.
FLOW_DEFAULTS = {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                 "shift": None, "loss_weighting": "none", "guidance": 1.0}
TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


class FlowMatchObjective(Objective):
    """Rectified flow matching (SD3 paper; diffusers' ``train_dreambooth_lora_{sd3,flux}.py``).

    A sample's "timestep" is its continuous sigma in [0, 1]: the input is ``(1-σ)·x + σ·noise`` and
    the target the velocity ``noise - x``. σ is drawn by diffusers'
    ``compute_density_for_timestep_sampling`` (logit-normal, uniform or mode) and then shifted
    towards noise: with ``shift: null`` by the scheduler's own rule, which for FLUX
    (``use_dynamic_shifting``) is the resolution-dependent shift its sampler uses
    (``calculate_shift`` over the image's token count, then ``time_shift``), and otherwise the
    static ``s·u / (1 + (s-1)·u)`` with the scheduler's ``shift``; a number forces the static shift.
    σ is continuous (no 1000-entry table), as kohya's and SimpleTuner's trainers draw it.
    Loss weights are diffusers' ``compute_loss_weighting_for_sd3``.
    """

    def __init__(self, scheduler: Any, flow: dict[str, Any] | None = None, *, guidance: float | None = None,
                 patch_size: int = 2):
        settings = {**FLOW_DEFAULTS, **(flow or {})}
        self.scheduler = scheduler
        self.sampling = settings["timestep_sampling"]
        self.logit_mean, self.logit_std = float(settings["logit_mean"]), float(settings["logit_std"])
        self.mode_scale = float(settings["mode_scale"])
        self.shift = None if settings["shift"] is None else float(settings["shift"])
        self.loss_weighting = settings["loss_weighting"]
        #: The guidance-embedding value the denoiser is trained at (FLUX-dev); None: it has none.
        self.guidance = None if guidance is None else float(guidance)
        self.patch_size = int(patch_size)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """``train.flow.*``, and the DDPM settings a flow-matching base has no use for, refused with the reason."""
        s = Settings(cfg)
        reasons = {
            "train.snr_gamma": (None, "min-SNR weights are defined through a DDPM schedule's alphas_cumprod; "
                                      "use train.flow.loss_weighting (none, sigma_sqrt or cosmap)"),
            "train.prediction_type": (None, "a flow-matching base predicts the velocity noise - latents, the only "
                                            "target it was trained on"),
            "train.noise_offset": (0.0, "offset noise makes up for DDPM's non-zero terminal SNR; at sigma=1 flow "
                                        "matching's input is already pure noise"),
        }
        for key, (default, why) in reasons.items():
            value = s.get(key)
            if value is not None and value != default:  # 0 == 0.0: an integer zero offset is no offset
                raise ConfigError(f"{key}={value!r} does not apply to model.family={s.get('model.family')}: {why}. "
                                  f"Fix: {key}={'null' if default is None else default}.")
        s.choice("train.flow.timestep_sampling", TIMESTEP_SAMPLING)
        s.number("train.flow.logit_mean")
        s.number("train.flow.logit_std", gt=0)
        # the SD3 paper's range: below -1 "mode" maps draws outside [0, 1]; above 2/(pi-2) the map folds back
        # on itself, so it is no longer the density the paper describes
        s.number("train.flow.mode_scale", ge=-1, le=round(2 / (math.pi - 2), 4))
        s.number("train.flow.shift", gt=0, optional=True)
        s.choice("train.flow.loss_weighting", LOSS_WEIGHTING)
        s.number("train.flow.guidance", ge=0)

    def _sigmas(self, g: torch.Generator, batch: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.sampling, batch, self.logit_mean, self.logit_std,
                                                  self.mode_scale, generator=g)
        config = self.scheduler.config
        if self.shift is None and config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            h, w = latent_shape[-2:]
            tokens = (h // self.patch_size) * (w // self.patch_size)
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
            return self.scheduler.time_shift(mu, 1.0, u)
        s = self.shift if self.shift is not None else float(config.get("shift", 1.0))
        return s * u / (1 + (s - 1) * u)

    def draw_timestep(self, g: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return self._sigmas(g, 1, latent_shape)

    def validation_timesteps(self, g: torch.Generator, batch: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return self._sigmas(g, batch, latent_shape)

    @staticmethod
    def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigmas.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._expand(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def model_timestep(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ on the scheduler's 0-1000 timestep scale, which the pipelines pass the transformer."""
        return timesteps * self.num_train_timesteps

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.loss_weighting == "none":
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.loss_weighting, timesteps.float())

    def dummy_timesteps(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch,), 0.5, device=device)

    def conditioning(self, cond: dict[str, Any], batch: int) -> dict[str, Any]:
        """``cond`` plus FLUX-dev's guidance embedding input, when the denoiser has one."""
        if self.guidance is None:
            return cond
        device = next((v.device for v in cond.values() if torch.is_tensor(v)), None)  # the text's: the step's device
        return {**cond, "guidance": torch.full((batch,), self.guidance, device=device)}
