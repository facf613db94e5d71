"""The LightningModule that trains a LoRA on a family's denoiser (a UNet).

The base model is loaded in ``setup()`` (not ``__init__``) and never enters hyperparameters or
checkpoints: ``on_save_checkpoint`` keeps only the LoRA tensors, so a checkpoint is the LoRA plus
optimizer, scheduler and loop state. Everything family-specific goes through ``self.family``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

import sdtune.training.embeddings as token_embeddings
from sdtune.data.latents import LatentStore
from sdtune.data.masks import batch_mask
from sdtune.data.sampler import skip_finished_batches
from sdtune.data.text_cache import TextEmbeddingCache, TokenCache
from sdtune.families import ModelParts, get_family
from sdtune.families.builder import build_parts
from sdtune.families.objectives import Objective
from sdtune.lora.layers import (
    LoraSpec,
    live_lora_state,
    named_trainable_lora_parameters,
    spec_from_config,
    text_encoder_spec,
    trainable_lora_parameters,
)
from sdtune.training.checkpointing import keep_lora_only
from sdtune.training.diffusion import (
    batch_latents,
    denoising_loss,
    latent_shape,
    sample_randomness,
    split_prior_loss,
    validation_randomness,
)
from sdtune.training.ema import LoraEMA, exports_ema, start_ema
from sdtune.training.fit_caches import prepare_fit
from sdtune.training.nonfinite import NonFiniteGuard, all_finite
from sdtune.training.optimization import build_optimization
from sdtune.training.text_encoders import (
    attach_text_encoders,
    inject_text_encoders,
    spec_dict,
    text_encoder_param_group,
    text_encoder_state,
    text_grad,
)
from sdtune.training.trainable import prepare_for_training, weight_dtype

log = logging.getLogger(__name__)

class LoRATrainingModule(L.LightningModule):
    """Diffusers' text-to-image LoRA recipe as a LightningModule.

    ``cfg`` is the resolved run config as a plain dict; it is saved as the hyperparameters so that
    export, generate and merge can read back how the LoRA was made.
    """

    def __init__(self, cfg: dict[str, Any], *, model_source: str | None = None, num_train_images: int | None = None,
                 data_manifest: dict[str, str] | None = None):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.family = get_family(cfg["model"]["family"])
        self.spec: LoraSpec = spec_from_config(cfg["lora"], self.family.default_lora_targets)
        self.te_spec: LoraSpec | None = text_encoder_spec(cfg, self.family)  # lora.text_encoder (None: frozen encoders)
        self.parts: ModelParts | None = None
        self.objective: Objective | None = None  # the family's training objective, built with the parts
        self.num_train_images = num_train_images  # goes into LoRA headers
        self.data_manifest = data_manifest  # see checkpointing.data_manifest
        self.model_source = model_source  # model.path already resolved by the caller (None: resolve in setup)
        self.text_cache: TextEmbeddingCache | None = None
        self.latent_store: LatentStore | None = None  # data.cache_latents held in memory (sdtune.training.fit_caches)
        self.tokens: TokenCache | None = None  # captions encoded every step are tokenized once (encode_text)
        self.embeddings: token_embeddings.TrainedEmbeddings | None = None  # new words' rows (embedding.*)
        self.skipped_nonfinite = 0
        # trainer.skip_nonfinite=false: NaN/Inf losses are recorded on the device and read every
        # trainer.nonfinite_check_every steps and before anything is saved (sdtune.training.nonfinite)
        self.nonfinite = NonFiniteGuard(int(cfg["trainer"].get("nonfinite_check_every") or 10))
        self.ema: LoraEMA | None = None  # train.ema: started in on_train_start, after a resume restored the weights
        self._saved_ema: dict[str, Any] | None = None
        # Checkpoints hold LoRA tensors only, so the frozen base weights are legitimately absent.
        self.strict_loading = False

    # -- building -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.parts is not None:
            return
        _, parts = build_parts(self.cfg["model"], dtype=self.weight_dtype, source=self.model_source)
        self.attach(parts)

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen base weights, from ``trainer.precision``."""
        return weight_dtype(self.cfg["trainer"])

    def attach(self, parts: ModelParts) -> None:
        """Make ``parts`` trainable as the config says (:func:`sdtune.training.trainable.prepare_for_training`)."""
        prepare_for_training(parts, self.cfg, self.spec, self.weight_dtype, self.family)
        self.objective = self.family.objective(parts, self.cfg["train"])  # draws nothing
        if self.te_spec is not None:  # sdtune.training.text_encoders: the encoders train and become submodules
            inject_text_encoders(parts, self.te_spec, self.family, dropout=float(self.cfg["lora"].get("dropout", 0.0)),
                                 init=self.cfg["lora"].get("init", "gaussian"),
                                 gradient_checkpointing=bool(self.cfg["train"].get("gradient_checkpointing")))
            attach_text_encoders(self, parts, self.family)
        self.embeddings = token_embeddings.install(self.cfg, self.family, parts)
        # The denoiser and the VAE are submodules, so Lightning moves them to the device. The text
        # encoders are not (unless they train, above): on_fit_start places them, and takes them off
        # the device again once outputs are cached. The denoiser's attribute is its diffusers
        # subfolder name ("unet"), so checkpoint keys keep their prefix.
        setattr(self, self.family.denoiser_subfolder, parts.denoiser)
        self.vae = parts.vae
        self.parts = parts

    def on_fit_start(self) -> None:
        prepare_fit(self, getattr(self.trainer, "datamodule", None))
        params = {id(p): p for m in (self, *self.parts.text_encoders) for p in m.parameters()}  # encoders may be submodules
        total = sum(p.numel() for p in params.values())
        log.info("LoRA: %s trainable parameters (%.3f%% of %s in the model)", f"{self.trainable_parameter_count():,}",
                 100 * self.trainable_parameter_count() / total, f"{total:,}")

    # -- training -----------------------------------------------------------------------------
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.text_cache is not None:
            return self.text_cache.lookup(captions, self.device)
        if self.embeddings is not None:
            captions = self.embeddings.spec.expand(captions)  # sks -> sks sks_1 ... (num_vectors > 1)
        if self.tokens is None:  # created after embeddings.install added the new words to the tokenizers
            self.tokens = TokenCache(lambda texts: self.family.tokenize(self.parts, texts), pin=self.device.type == "cuda")
        with text_grad(self.cfg):  # no_grad unless the encoders train
            return self.family.encode_tokens(self.parts, self.tokens(captions))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A batch from a device-held latent store carries its rows (``latent_group``, ``latent_row``):
        gather its ``latent_params`` (and ``latent_mask``) here, on the device, before any step reads it."""
        if isinstance(batch, dict) and "latent_row" in batch:
            batch = dict(batch)
            batch.update(self.latent_store.gather(batch.pop("latent_group"), batch.pop("latent_row")))
        return batch

    @torch.no_grad()
    def batch_latents(self, batch: dict[str, Any], *, deterministic: bool = False,
                      eps: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents of ``batch`` (:func:`sdtune.training.diffusion.batch_latents`)."""
        return batch_latents(self.parts.vae, batch, device=self.device, dtype=self.weight_dtype,
                             deterministic=deterministic, eps=eps)

    def diffusion_loss(self, latents: torch.Tensor, text: dict[str, torch.Tensor], batch: dict[str, Any], *,
                       noise: torch.Tensor, timesteps: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """:func:`sdtune.training.diffusion.denoising_loss` with this family's denoiser, objective and
        conditioning (and the batch's loss masks, ``train.masked_loss``)."""
        return denoising_loss(self.family, self.parts.denoiser, self.objective, latents,
                              self.family.conditioning(text, batch), noise, timesteps, dtype=self.weight_dtype,
                              mask=batch_mask(batch, tuple(latents.shape[-2:])), per_sample=per_sample)

    def with_randomness(self, batch: dict[str, Any], *, pin: bool = False) -> dict[str, Any]:
        """``batch`` (on the CPU) with its seeds replaced by what they draw: ``eps`` (latent
        sampling), ``noise`` and ``timesteps`` (:func:`sdtune.training.diffusion.sample_randomness`), plus
        ``prior_count``, the number of class samples as a python int. ``pin``: in pinned memory, so
        that the copy to a CUDA device is asynchronous."""
        batch = dict(batch)
        seeds = batch.pop("seed")
        # A device-held latent store's batch carries only its rows: the store knows their shape.
        shape = (self.latent_store.latent_shape(batch["latent_group"]) if "latent_group" in batch
                 else latent_shape(batch, self.parts.vae.config))
        eps, noise, timesteps = sample_randomness(
            seeds.tolist(), shape,
            objective=self.objective,
            noise_offset=float(self.cfg["train"].get("noise_offset") or 0.0),
        )
        drawn = {"eps": eps, "noise": noise, "timesteps": timesteps}
        batch.update({k: v.pin_memory() for k, v in drawn.items()} if pin else drawn)
        if "prior" in batch:
            batch["prior_count"] = int(batch["prior"].sum())
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches get their randomness here, on the CPU, before Lightning moves them: the
        seeds never reach the device (reading them back from it would block every step), and eps,
        noise and timesteps travel with the batch (pinned on CUDA, so Lightning's non_blocking copy
        does not wait). Validation batches keep their fixed randomness (:meth:`validation_step`)."""
        if self._trainer is not None and self.trainer.training and isinstance(batch, dict) and "seed" in batch:
            return self.with_randomness(batch, pin=self.device.type == "cuda")
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if "noise" not in batch:  # called with a collated batch, not through fit's batch transfer
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.with_randomness(batch).items()}
        latents = self.batch_latents(batch, eps=batch["eps"])
        text = self.encode_text(batch["text"])
        prior = batch.get("prior")  # DreamBooth prior preservation: the class half of the batch
        loss = self.diffusion_loss(latents, text, batch, noise=batch["noise"], timesteps=batch["timesteps"],
                                   per_sample=prior is not None)
        if prior is not None:
            loss, prior_loss = split_prior_loss(loss, prior, self.cfg["train"].get("prior_loss_weight", 1.0))
            self.log("train/prior_loss", prior_loss, on_step=True, on_epoch=True, batch_size=batch["prior_count"])
        if self.cfg["trainer"].get("skip_nonfinite"):
            if not all_finite(self.trainer, loss):  # the one per-step host read this option costs
                return self._skip_non_finite(loss)
        else:
            self.nonfinite.note(loss, self.trainer.global_step)  # read later: check_finite
        # Not prog_bar=True: Lightning would read that value back (.item()) after every step. The
        # run's bar (sdtune.run.progress) smooths the step's returned loss on the device instead.
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=latents.shape[0])
        return loss

    def _skip_non_finite(self, loss: torch.Tensor) -> None:
        """``trainer.skip_nonfinite``: Lightning skips the optimizer step on None; count it."""
        self.skipped_nonfinite += 1
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True)
        log.warning("non-finite loss (%s) at step %d skipped (%d so far)", loss.item(), self.trainer.global_step,
                    self.skipped_nonfinite)

    def check_finite(self, before: str | None = None) -> None:
        """Stop the run if a loss since the start was NaN/Inf (:mod:`sdtune.training.nonfinite`); every rank
        calls it at the same point. ``before``: what is about to be written."""
        self.nonfinite.check(self.trainer, lr=self.cfg["optim"]["optimizer"].get("lr"), before=before)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.nonfinite.due(self.trainer.global_step):
            self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite(before="writing the LoRA")  # after the last checkpoint, before on_fit_end's files

    def on_train_start(self) -> None:
        skip_finished_batches(self.trainer)  # resuming mid-epoch: continue where the checkpoint was
        self.ema = start_ema(self.parts.denoiser, self.cfg, self._saved_ema)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss on fixed images with fixed noise and timesteps, so runs and steps compare."""
        latents = self.batch_latents(batch, deterministic=True)
        noise, timesteps = validation_randomness(int(self.cfg.get("seed", 0)), batch_idx, tuple(latents.shape),
                                                 self.objective)
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        loss = self.diffusion_loss(latents, self.encode_text(batch["text"]), batch, noise=noise, timesteps=timesteps)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=latents.shape[0])
        return loss

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        extra = [text_encoder_param_group(self.cfg, self.parts, self.family)] if self.te_spec is not None else []
        if self.embeddings is not None:
            extra.append(token_embeddings.param_group(self.embeddings))
        return build_optimization(self.cfg["optim"], self.cfg["trainer"], named_trainable_lora_parameters(self.parts.denoiser),
                                  extra_groups=extra,
                                  device=self.device, total_steps=int(self.trainer.estimated_stepping_batches))

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning calls this once per optimizer step (after the last micro-batch of an accumulation)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update()

    # -- checkpoints --------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite = int(checkpoint.get("sdtune", {}).get("skipped_nonfinite", 0))
        self._saved_ema = checkpoint.get("sdtune", {}).get("ema")
        token_embeddings.check_resume(checkpoint.get("sdtune", {}).get("embedding"), token_embeddings.spec_from_config(self.cfg))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # every save, periodic, last, on a signal (sdtune.training.stopping)
            self.check_finite(before=f"writing the checkpoint of step {self.trainer.global_step}")
        rows = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("embeddings.")}  # new words' rows
        keep_lora_only(checkpoint, self.spec, family=self.family.name, num_train_images=self.num_train_images,
                       data=self.data_manifest,  # what a resume compares the dataset against
                       skipped_nonfinite=self.skipped_nonfinite, ema=self.ema.state_dict() if self.ema else None,
                       text_encoder=spec_dict(self.te_spec),
                       embedding=self.embeddings.spec.record() if self.embeddings is not None else None)
        checkpoint["state_dict"].update(rows)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """What the run exports: the EMA weights with ``train.ema.use_for_export``, else the trained ones."""
        if self.ema is not None and exports_ema(self.cfg):
            return self.ema.tensors()
        return live_lora_state(self.parts.denoiser)

    def text_encoder_lora_state(self) -> dict[int, dict[str, torch.Tensor]] | None:
        """The text encoders' LoRA per encoder index (file names), None when they do not train."""
        return None if self.te_spec is None else text_encoder_state(self.parts, self.family)

    def trainable_parameter_count(self) -> int:
        models = [self.parts.denoiser, *(self.parts.text_encoders if self.te_spec is not None else [])]
        rows = sum(p.numel() for p in self.embeddings.rows) if self.embeddings is not None else 0
        return rows + sum(p.numel() for m in models for p in trainable_lora_parameters(m))
