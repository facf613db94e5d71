"""The LightningModule that trains a UNet LoRA.

The base model is loaded in ``setup()`` (not ``__init__``) and never enters hyperparameters or
checkpoints: ``on_save_checkpoint`` keeps only the LoRA tensors, so a checkpoint is the LoRA plus
optimizer, scheduler and loop state. Everything family-specific goes through ``self.family``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from .data.latents import LatentCache
from .errors import NonFiniteLossError
from .families import ModelParts, get_family, resolve_model_source
from .lora import LoraSpec, inject, is_lora_key, lora_tensors, spec_from_config, trainable_lora_parameters
from .speed import apply_speed
from .text_cache import TextEmbeddingCache
from .tiny import prepare_tiny

log = logging.getLogger(__name__)

#: Lightning precision setting -> dtype of the frozen base weights. LoRA weights stay fp32.
WEIGHT_DTYPES = {
    "32": torch.float32,
    "32-true": torch.float32,
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,  # everything in bf16, LoRA included (FSDP needs one dtype per flat parameter)
}


class LoRATrainingModule(L.LightningModule):
    """Diffusers' text-to-image LoRA recipe as a LightningModule.

    ``cfg`` is the resolved run config as a plain dict; it is saved as the hyperparameters so that
    export, generate and merge can read back how the LoRA was made.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.family = get_family(cfg["model"]["family"])
        self.spec: LoraSpec = spec_from_config(cfg["lora"], self.family.default_lora_targets)
        self.parts: ModelParts | None = None
        self.num_train_images: int | None = None  # set by the trainer script; goes into LoRA headers
        self.data_manifest: dict[str, str] | None = None  # set by the trainer script; see checkpointing.data_manifest
        self.model_source: str | None = None  # resolved model.path, when the caller already checked it
        self.text_cache: TextEmbeddingCache | None = None
        self.skipped_nonfinite = 0
        # Checkpoints hold LoRA tensors only, so the frozen base weights are legitimately absent.
        self.strict_loading = False

    # -- building -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.parts is not None:
            return
        model_cfg = self.cfg["model"]
        source = self.model_source or self.resolve_source()
        parts = self.family.load(
            source,
            dtype=self.weight_dtype,
            vae_path=model_cfg.get("vae_path"),
            revision=model_cfg.get("revision"),
            config=model_cfg.get("config"),
        )
        self.attach(parts)

    def resolve_source(self) -> str:
        """Build the tiny model if asked, then find ``model.path`` (fails fast when unreachable)."""
        model_cfg = self.cfg["model"]
        prepare_tiny(model_cfg)
        return resolve_model_source(
            str(model_cfg["path"]),
            family=self.family.name,
            revision=model_cfg.get("revision"),
            allow_pickle=bool(model_cfg.get("allow_pickle", False)),
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen base weights, from ``trainer.precision``."""
        return WEIGHT_DTYPES.get(str(self.cfg["trainer"].get("precision", "32")), torch.float32)

    def attach(self, parts: ModelParts) -> None:
        """Freeze ``parts``, cast them for mixed precision, and add the LoRA layers."""
        from diffusers.training_utils import cast_training_params

        train_cfg = self.cfg["train"]
        for module in (parts.unet, *parts.frozen_modules()):
            module.requires_grad_(False)
            if module.dtype != self.weight_dtype:  # parts loaded elsewhere (tests, bench)
                module.to(dtype=self.weight_dtype)
        for module in parts.frozen_modules():
            module.eval()
        parts.unet.train()  # LoRA dropout and diffusers' gradient checkpointing act in train mode only
        lora_cfg = self.cfg["lora"]
        inject(parts.unet, self.spec, dropout=float(lora_cfg.get("dropout", 0.0)), init=lora_cfg.get("init", "gaussian"))
        cast_training_params(parts.unet, dtype=torch.float32)  # LoRA weights train in fp32
        if train_cfg.get("gradient_checkpointing"):
            parts.unet.enable_gradient_checkpointing()
        apply_speed(parts, self.cfg.get("speed") or {})
        prediction_type = train_cfg.get("prediction_type")
        if prediction_type:
            parts.noise_scheduler.register_to_config(prediction_type=prediction_type)
        # UNet and VAE are submodules, so Lightning moves them to the device. The text encoders are
        # not: on_fit_start places them, and takes them off the device again once outputs are cached.
        self.unet = parts.unet
        self.vae = parts.vae
        self.parts = parts

    def on_fit_start(self) -> None:
        for encoder in self.parts.text_encoders:
            encoder.to(self.device)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        self.warn_overlong([c for r in datamodule.dataset.records for c in r.captions])
        if self.cfg["data"].get("cache_latents"):
            self.fill_latent_cache(datamodule)
        if self.cfg["train"].get("cache_text_embeddings", True):
            self.fill_text_cache(datamodule)

    def warn_overlong(self, captions: list[str]) -> None:
        """One warning per run (not per step) for captions the text encoder will truncate."""
        long = self.family.overlong_captions(self.parts, list(dict.fromkeys(captions)))
        if long and self.trainer.is_global_zero:
            limit = self.family.text_max_length(self.parts)
            log.warning(
                "%d caption(s) are longer than the %d-token limit of the %s text encoder and will be truncated, e.g. %r",
                len(long), limit, self.family.name, long[0][:120],
            )

    def fill_latent_cache(self, datamodule) -> None:
        model_cfg = self.cfg["model"]
        cache = LatentCache(
            self.cfg["data"]["latent_cache_dir"],
            model_key=f"{model_cfg['path']}@{model_cfg.get('revision')}|vae={model_cfg.get('vae_path')}|{self.weight_dtype}",
        )
        datamodule.prepare_latents(self.encode_latent_params, cache)
        self.parts.vae.to("cpu")  # not needed again until sampling
        self._free_device_cache()

    @torch.no_grad()
    def encode_latent_params(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.parts.vae
        return vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist.parameters.float().cpu()

    def fill_text_cache(self, datamodule) -> None:
        captions = datamodule.captions()
        if captions is None:
            log.warning("captions change every step (tag shuffling): text embeddings are computed per step, not cached")
            return
        cache_dir = self.cfg["train"].get("text_cache_dir")
        self.text_cache = TextEmbeddingCache(
            self.family,
            self.parts,
            model_key=f"{self.cfg['model']['path']}@{self.cfg['model'].get('revision')}",
            dtype=self.weight_dtype,
            disk_dir=cache_dir,
        )
        self.text_cache.fill(captions)
        for encoder in self.parts.text_encoders:
            encoder.to("cpu")
        self._free_device_cache()

    def _free_device_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def frozen_modules_on_device(self) -> Iterator[None]:
        """Bring offloaded text encoders and VAE back for sampling, then restore where they were."""
        modules = [*self.parts.text_encoders, self.parts.vae]
        before = [next(m.parameters()).device for m in modules]
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module, device in zip(modules, before):
                module.to(device)
            self._free_device_cache()

    # -- training -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.batch_latents({"pixel_values": pixels})

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.text_cache is not None:
            return self.text_cache.lookup(captions, self.device)
        return self.family.encode_prompts(self.parts, captions)

    def diffusion_loss(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise the latents at random (or given) timesteps and regress the scheduler's target."""
        from diffusers.training_utils import compute_snr

        train_cfg = self.cfg["train"]
        scheduler = self.parts.noise_scheduler
        if noise is None:
            noise = torch.randn_like(latents)
            offset = float(train_cfg.get("noise_offset") or 0.0)
            if offset:
                noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
        bsz = latents.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        # attach() cast every frozen weight to weight_dtype; asking the UNet (.dtype) walks all of
        # its ~1,000-7,500 submodules on every step (2 ms for tiny SD1.5, 20 ms for SDXL on a CPU).
        unet_dtype = self.weight_dtype
        kwargs = _cast_floats(self.family.unet_conditioning(text, batch), unet_dtype)
        pred = self.parts.unet(noisy.to(unet_dtype), timesteps, **kwargs, return_dict=False)[0].float()

        snr_gamma = train_cfg.get("snr_gamma")
        if not snr_gamma:
            return F.mse_loss(pred, target.float(), reduction="mean")
        # Min-SNR-gamma (Hang et al. 2023), as in diffusers' train_text_to_image_lora.py.
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=float(snr_gamma))
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        return (per_sample * weights).mean()

    @torch.no_grad()
    def batch_latents(
        self, batch: dict[str, Any], *, deterministic: bool = False, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled latents from cached distributions or from pixels.

        ``deterministic`` takes the mean; ``eps`` is the standard-normal draw for the sample
        (``mean + std * eps``), so the caller controls the randomness.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.parts.vae
        if "latent_params" in batch:
            dist = DiagonalGaussianDistribution(batch["latent_params"].float().to(self.device))
        else:
            dist = vae.encode(batch["pixel_values"].to(vae.device, self.weight_dtype)).latent_dist
        if deterministic:
            latents = dist.mode()
        elif eps is not None:
            latents = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
        else:
            latents = dist.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents.float() - shift) * vae.config.scaling_factor).to(self.device)

    def sample_randomness(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent eps, noise, timesteps) drawn from each sample's own seed, in a fixed order.

        Independent of batch composition, process count and interruptions, which is what makes
        resumed and multi-process runs reproduce single uninterrupted ones.
        """
        c, h, w = self._latent_shape(batch)
        offset = float(self.cfg["train"].get("noise_offset") or 0.0)
        steps = self.parts.noise_scheduler.config.num_train_timesteps
        eps, noise, timesteps = [], [], []
        for seed in batch["seed"].tolist():
            g = torch.Generator().manual_seed(int(seed))
            eps.append(torch.randn(c, h, w, generator=g))
            n = torch.randn(c, h, w, generator=g)
            if offset:
                n = n + offset * torch.randn(c, 1, 1, generator=g)
            noise.append(n)
            timesteps.append(torch.randint(0, steps, (1,), generator=g))
        return torch.stack(eps), torch.stack(noise).to(self.device), torch.cat(timesteps).to(self.device)

    def _latent_shape(self, batch: dict[str, Any]) -> tuple[int, int, int]:
        if "latent_params" in batch:
            c2, h, w = batch["latent_params"].shape[1:]
            return c2 // 2, h, w
        factor = 2 ** (len(self.parts.vae.config.block_out_channels) - 1)
        _, _, h, w = batch["pixel_values"].shape
        return self.parts.vae.config.latent_channels, h // factor, w // factor

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        eps, noise, timesteps = self.sample_randomness(batch)
        latents = self.batch_latents(batch, eps=eps)
        text = self.encode_text(batch["text"])
        loss = self.diffusion_loss(latents, text, batch, noise=noise, timesteps=timesteps)
        # Decided together, so DDP ranks never disagree on skipping (which would hang them).
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return self._non_finite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=latents.shape[0])
        return loss

    def _non_finite(self, loss: torch.Tensor) -> None:
        """Skip the step (``trainer.skip_nonfinite``) or stop with the known causes."""
        step = self.trainer.global_step
        if self.cfg["trainer"].get("skip_nonfinite"):
            self.skipped_nonfinite += 1
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True)
            log.warning("non-finite loss (%s) at step %d skipped (%d so far)", loss.item(), step, self.skipped_nonfinite)
            return None  # Lightning skips the optimizer step
        raise NonFiniteLossError(
            f"training stopped: the loss is {loss.item()} at step {step}. Known causes: the stock SDXL VAE in "
            "fp16 (set model.vae_path to the fp16-fix VAE, or trainer.precision=bf16-mixed); a learning rate "
            f"too high (optim.optimizer.lr={self.cfg['optim']['optimizer'].get('lr')}); fp16 overflow (try "
            "trainer.precision=bf16-mixed). The last good checkpoint is kept in the run's checkpoints/ folder; "
            "resume from it with ckpt_path=..., or set trainer.skip_nonfinite=true to skip and count such steps."
        )

    def on_train_start(self) -> None:
        # After a mid-epoch restore Lightning counts the resumed epoch's finished batches (a save at
        # batch end counts that batch as finished) and runs only the rest; it calls no
        # on_train_epoch_start for that epoch. The sampler, iterated next, skips as many batches.
        loop = self.trainer.fit_loop.epoch_loop
        if not loop.restarting:
            return
        done = loop.batch_progress.current.completed + (1 if loop.restarted_on_train_batch_end else 0)
        if done >= self.trainer.num_training_batches:
            # Saved after the epoch's last batch: Lightning moves on to the next epoch, whole.
            return
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if done and hasattr(sampler, "skip"):
            sampler.skip(done)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss on fixed images with fixed noise and timesteps, so runs and steps compare."""
        latents = self.batch_latents(batch, deterministic=True)
        g = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)) * 1000 + batch_idx)
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        steps = self.parts.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=g).to(latents.device)
        loss = self.diffusion_loss(latents, self.encode_text(batch["text"]), batch, noise=noise, timesteps=timesteps)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=latents.shape[0])
        return loss

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        optim_cfg = self.cfg["optim"]
        params = trainable_lora_parameters(self.parts.unet)
        extra = {}
        if optim_cfg["optimizer"].get("fused", "absent") is None:
            # The fused kernel needs CUDA, and Lightning cannot clip gradients of an optimizer that
            # unscales them itself under mixed precision.
            trainer_cfg = self.cfg["trainer"]
            clipping = bool(trainer_cfg.get("gradient_clip_val"))
            mixed = str(trainer_cfg.get("precision", "32")).endswith("mixed")
            extra["fused"] = self.device.type == "cuda" and not (clipping and mixed)
        optimizer = instantiate(optim_cfg["optimizer"], **extra)(params=params)
        sched_cfg = optim_cfg["scheduler"]
        extra_sched = {k: sched_cfg[k] for k in ("num_cycles", "power", "step_rules") if sched_cfg.get(k) is not None}
        scheduler = get_scheduler(
            sched_cfg["name"],
            optimizer,
            num_warmup_steps=int(sched_cfg.get("warmup_steps", 0)),
            num_training_steps=int(self.trainer.estimated_stepping_batches),
            **extra_sched,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints --------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite = int(checkpoint.get("sdtune", {}).get("skipped_nonfinite", 0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_lora_key(k)}
        checkpoint["sdtune"] = {
            "family": self.family.name,
            "rank": self.spec.rank,
            "alpha": self.spec.alpha,
            "targets": list(self.spec.targets),
            "num_train_images": self.num_train_images,
            "data": self.data_manifest,  # what a resume compares the dataset against
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The trained LoRA as peft-named CPU tensors (the same rule export applies to checkpoints)."""
        return lora_tensors(self.state_dict())

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in trainable_lora_parameters(self.parts.unet))


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors, also inside nested dicts (SDXL's ``added_cond_kwargs``)."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value
