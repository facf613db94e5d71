"""The run's model built at full size on the meta device, and what its steps keep: the planner's
measurements.

:func:`built` makes the parts the run would train from the base's own configs (a diffusers
folder's, else the shipped full-size ones of ``arch_configs/``) on the meta device, through the
training path itself (:func:`sdtune.training.trainable.prepare_for_training`: LoRA layers, LoRA in
fp32, gradient checkpointing; :func:`sdtune.training.text_encoders.inject_text_encoders` for a
text-encoder LoRA), so the LoRA figures are those of the real model. The step measurements run
the real loss (:func:`sdtune.training.diffusion.denoising_loss`) and the real VAE and text
encoders under :func:`sdtune.planning.tracker.track_step`, at batch 1: activation memory is linear
in the batch (checked on the tiny models by the tests), so the plan scales them. Everything is
cached per process, so the suggestions that re-plan a variant of the run cost no new step.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdtune.families import ModelFamily, ModelParts, get_family
from sdtune.families.arch import architecture, build_random_parts
from sdtune.lora.layers import spec_from_config, text_encoder_spec, trainable_lora_parameters
from sdtune.planning.tracker import StepPeak, track_step
from sdtune.training.diffusion import cast_floats, denoising_loss
from sdtune.training.text_encoders import inject_text_encoders
from sdtune.training.trainable import prepare_for_training, weight_dtype

#: Captions per text-encoder call while the text cache fills (pictures per VAE call:
#: :func:`sdtune.data.latent_fill.encode_batch_size`; ``TextEmbeddingCache.fill``).
CACHE_BATCH = 8


@dataclass
class RunModel:
    """The run's parts on the meta device, with what the plan reads off them."""

    family: ModelFamily
    arch: dict[str, dict[str, Any]]
    parts: ModelParts
    dtype: torch.dtype
    #: Where the configs came from: a diffusers folder, or None (the shipped full-size configs).
    folder: str | None

    def trainable(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters (denoiser, then any text encoder that trains), each once."""
        seen: dict[int, torch.nn.Parameter] = {}
        for model in (self.parts.denoiser, *self.parts.text_encoders):
            for param in trainable_lora_parameters(model):
                seen.setdefault(id(param), param)
        return list(seen.values())

    def vae_factor(self) -> int:
        return 2 ** (len(self.arch["vae"]["block_out_channels"]) - 1)


def config_folder(family: ModelFamily, path: str | None) -> str | None:
    """``path`` when it is a diffusers folder with the denoiser's config, else None (hub id, single
    file: the shipped full-size configs, as :func:`sdtune.families.checks.frozen_weight_bytes`)."""
    if path and Path(path, family.denoiser_subfolder, "config.json").is_file():
        return str(path)
    return None


def build_key(cfg: Mapping[str, Any]) -> str:
    """What :func:`built` depends on, as a cache key."""
    family = get_family(cfg["model"]["family"])
    lora = dict(cfg["lora"])
    return json.dumps({"family": family.name, "folder": config_folder(family, cfg["model"].get("path")),
                       "dtype": str(weight_dtype(cfg["trainer"])), "lora": lora}, sort_keys=True, default=str)


def built(cfg: Mapping[str, Any]) -> RunModel:
    """:func:`_built` for the run config ``cfg`` (a plain dict)."""
    return _built(build_key(cfg))


@functools.lru_cache(maxsize=2)
def _built(key: str) -> RunModel:
    spec = json.loads(key)
    family = get_family(spec["family"])
    dtype = getattr(torch, spec["dtype"].removeprefix("torch."))
    arch = architecture(family, spec["folder"])
    parts = build_random_parts(family, device="meta", dtype=dtype, folder=spec["folder"])
    cfg = {"lora": spec["lora"], "train": {"gradient_checkpointing": False},
           "speed": {"attention": "sdpa", "compile": False, "channels_last": False}}
    prepare_for_training(parts, cfg, spec_from_config(spec["lora"], family.default_lora_targets), dtype, family)
    te_spec = text_encoder_spec(cfg, family)
    if te_spec is not None:
        inject_text_encoders(parts, te_spec, family, dropout=float(spec["lora"].get("dropout", 0.0)),
                             init=spec["lora"].get("init", "gaussian"))
    return RunModel(family, arch, parts, dtype, spec["folder"])


def _set_checkpointing(run: RunModel, on: bool) -> None:
    denoiser = run.parts.denoiser
    if on:
        denoiser.enable_gradient_checkpointing()
    elif getattr(denoiser, "is_gradient_checkpointing", False):
        denoiser.disable_gradient_checkpointing()


def autocast_dtype(trainer_cfg: Mapping[str, Any]) -> torch.dtype | None:
    """The half dtype Lightning's mixed precision autocasts to (None: no autocast)."""
    precision = str(trainer_cfg.get("precision", "32"))
    return weight_dtype(trainer_cfg) if precision.endswith("-mixed") else None


@functools.lru_cache(maxsize=32)
def denoiser_step(key: str, resolution: int, autocast: str | None, checkpointing: bool) -> StepPeak:
    """One sample's training step of the denoiser (forward and backward of the loss) at ``resolution``²."""
    run = _built(key)
    family, dtype = run.family, run.dtype
    _set_checkpointing(run, checkpointing)
    objective = family.objective(run.parts, {})
    side = resolution // run.vae_factor()

    def step() -> None:
        with torch.device("meta"):
            latents = torch.zeros(1, run.arch["vae"]["latent_channels"], side, side)
            text = {k: torch.zeros(1, *shape, dtype=dtype) for k, shape in family.text_shapes(run.arch).items()}
            sizes = torch.tensor([[float(resolution), float(resolution)]])
            batch = {"original_size": sizes, "target_size": sizes, "crop_top_left": torch.zeros(1, 2)}  # SDXL-style
            timesteps = objective.dummy_timesteps(1, "meta")
            noise = torch.zeros_like(latents)
        loss = denoising_loss(family, run.parts.denoiser, objective, latents, family.conditioning(text, batch), noise,
                              timesteps, dtype=dtype)
        loss.backward()

    try:
        return track_step(step, [run.parts.denoiser], _dtype(autocast))
    finally:
        _set_checkpointing(run, False)


@functools.lru_cache(maxsize=32)
def denoiser_inference(key: str, resolution: int, autocast: str | None) -> StepPeak:
    """One sample's denoiser forward without gradients at ``resolution``² (a sampling step)."""
    run = _built(key)
    family, dtype = run.family, run.dtype
    objective = family.objective(run.parts, {})
    side = resolution // run.vae_factor()

    def step() -> None:
        with torch.device("meta"):
            latents = torch.zeros(1, run.arch["vae"]["latent_channels"], side, side, dtype=dtype)
            text = {k: torch.zeros(1, *shape, dtype=dtype) for k, shape in family.text_shapes(run.arch).items()}
            sizes = torch.tensor([[float(resolution), float(resolution)]])
            batch = {"original_size": sizes, "target_size": sizes, "crop_top_left": torch.zeros(1, 2)}
            timesteps = objective.dummy_timesteps(1, "meta")
        with torch.no_grad():
            kwargs = cast_floats(objective.conditioning(family.conditioning(text, batch), 1), dtype)
            family.predict(run.parts.denoiser, latents, objective.model_timestep(timesteps), kwargs)

    return track_step(step, [], _dtype(autocast))


@functools.lru_cache(maxsize=32)
def vae_decode(key: str, resolution: int, autocast: str | None) -> StepPeak:
    """One picture's VAE decoding (no gradients) at ``resolution``²: the end of every sample."""
    run = _built(key)
    side = resolution // run.vae_factor()

    def step() -> None:
        latents = torch.zeros(1, run.arch["vae"]["latent_channels"], side, side, dtype=run.dtype, device="meta")
        with torch.no_grad():
            run.parts.vae.decode(latents).sample  # noqa: B018 (the picture)

    return track_step(step, [], _dtype(autocast))


@functools.lru_cache(maxsize=32)
def vae_encode(key: str, resolution: int, autocast: str | None) -> StepPeak:
    """One picture's VAE encoding (no gradients) at ``resolution``²."""
    run = _built(key)

    def step() -> None:
        pixels = torch.zeros(1, run.arch["vae"].get("in_channels", 3), resolution, resolution, dtype=run.dtype,
                             device="meta")
        with torch.no_grad():
            run.parts.vae.encode(pixels).latent_dist.parameters  # noqa: B018 (what the cache keeps)

    return track_step(step, [], _dtype(autocast))


@functools.lru_cache(maxsize=32)
def text_encode(key: str) -> tuple[StepPeak, str]:
    """One caption through every text encoder (no gradients, all hidden states kept, as SD's and
    Kolors' penultimate-layer encodings ask), the largest of them; and "" or a note on an encoder
    the meta device cannot run.

    Token lengths: a CLIP's ``max_position_embeddings``; a T5's or ChatGLM's the length of the
    family's encoder output (:meth:`~sdtune.families.base.ModelFamily.text_shapes`), which for SD3.5
    also counts the CLIP tokens placed before T5's: a little over, never under. An encoder whose
    forward fails on meta tensors (ChatGLM's TorchScript rotary embedding) is counted by the hidden
    states it returns, (layers + 1) x tokens x width, and named in the note."""
    run = _built(key)
    length = run.family.text_shapes(run.arch)["encoder_hidden_states"][0]
    peaks, notes = [], []
    for kind, encoder in zip(run.family.text_encoder_kinds, run.parts.text_encoders):
        config = encoder.config
        tokens = int(config.max_position_embeddings) if kind == "clip" else int(length)

        def step(encoder: torch.nn.Module = encoder, tokens: int = tokens) -> None:
            with torch.no_grad():
                encoder(torch.zeros(1, tokens, dtype=torch.long, device="meta"), output_hidden_states=True)

        try:
            peaks.append(track_step(step, [], None).activations)
        except Exception as err:  # an operation without a meta kernel: count what it returns
            layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 0)
            width = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
            peaks.append((int(layers) + 1) * tokens * int(width) * run.dtype.itemsize)
            notes.append(f"the {kind} text encoder does not run on the meta device ({type(err).__name__}); its "
                         "encoding is counted as the hidden states it returns")
    return StepPeak(max(peaks, default=0), 0, 0), "; ".join(notes)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name.removeprefix("torch."))


def plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain-dict copy of a run config (DictConfig or dict)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(dict(cfg))
