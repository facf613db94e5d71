"""The GPU memory a training run will need, by component and phase, before any weight is read.

:func:`plan_memory` reads the run config, builds the run's model on the meta device
(:mod:`sdtune.planning.model`) and adds up, for each phase of a run:

- **caching** (only with ``data.cache_latents`` or a text-embedding cache): at fit start the
  denoiser with its LoRA, the VAE and every text encoder are on the GPU while the latents and the
  captions' embeddings are computed, :data:`~sdtune.planning.model.CACHE_BATCH` at a time
  (:mod:`sdtune.training.fit_caches`);
- **training step**: the denoiser, the VAE unless latents are cached, the text encoders unless
  their outputs are cached, the LoRA with its gradients and optimizer state, the step's
  activations, and the caches held on the device (:mod:`sdtune.data.cache_memory`).

The peak is the larger phase, plus :data:`CUDA_OVERHEAD`. Frozen weights are counted by
:func:`sdtune.families.quantize.part_bytes` in the precision's dtype and each part's
``model.quantize`` mode; the report (``render``) and the presets read this module only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from sdtune.data.latent_fill import encode_batch_size
from sdtune.families.quantize import choice, part_bytes, quantized_linears, quantized_text_encoders
from sdtune.inference.sampling import sample_batch_size
from sdtune.planning import model as planned
from sdtune.planning import suggest
from sdtune.planning.data_size import cache_sizes
from sdtune.planning.optimizer_state import optimizer_name, state_bytes
from sdtune.planning.render import render
from sdtune.training.class_images import prior_enabled
from sdtune.training.text_encoders import text_cache_blocker

#: The CUDA context (the driver's and PyTorch's kernels, cuBLAS and cuDNN handles and workspaces,
#: about 500 MiB on an H100 with lazy module loading) plus the caching allocator's slack
#: (rounding and fragmentation between differently sized blocks, about 256 MiB at these sizes):
#: memory the card loses that no tensor accounts for. One constant, in one place; checked against
#: measured peaks where a GPU is lent (docs/memory.md).
CUDA_OVERHEAD = 768 * 2**20
OVERHEAD_ROW = "CUDA context + allocator (constant)"
CACHING, TRAINING, SAMPLING = "caching", "training step", "sampling"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass
class MemoryPlan:
    """A run's planned GPU memory (bytes): ``phases`` maps each phase to its components, and
    :attr:`components` is the peak phase's."""

    cfg: dict[str, Any]
    phases: dict[str, dict[str, int]]
    #: The step's activations at the run's batch, with and without gradient checkpointing.
    activations: dict[bool, int]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def components(self) -> dict[str, int]:
        return self.phases[self.peak_phase]

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())

    def fits(self, gib: float) -> bool:
        """Whether the peak fits a card of ``gib`` GiB."""
        return self.peak_bytes <= gib * 2**30

    def suggestions(self, gib: float | None = None) -> list[tuple[str, int]]:
        """(override, planned peak with it) for each switch that lowers the peak by 1% or more, applied alone
        (:func:`sdtune.planning.suggest.candidates`); when ``gib`` is given and none fits alone,
        also all of them together."""
        out = []
        for override, _ in suggest.candidates(self.cfg):
            peak = plan_memory(suggest.apply_all(self.cfg, [override]), gib).peak_bytes
            if peak < 0.99 * self.peak_bytes:  # a switch that saves under 1% is no advice
                out.append((override, peak))
        if gib is not None and len(out) > 1 and not any(peak <= gib * 2**30 for _, peak in out):
            overrides = suggest.combined([o for o, _ in out])
            out.append((" ".join(overrides), plan_memory(suggest.apply_all(self.cfg, overrides), gib).peak_bytes))
        return out

    def render(self, gib: float | None = None) -> str:
        """The plan as a table by component and phase, the verdict for ``gib`` and the suggestions."""
        return render(self, gib)


def plan_memory(cfg: Any, gib: float | None = None) -> MemoryPlan:
    """The plan of the run config ``cfg`` (a composed DictConfig or its plain dict) on a CUDA GPU of
    ``gib`` GiB (None: ``hardware_preset.memory_gib``, else unknown: only the caches' placement
    depends on it)."""
    cfg = planned.plain(cfg)
    preset = cfg.get("hardware_preset") or {}
    if gib is None and preset.get("memory_gib") is not None:
        gib = float(preset["memory_gib"])
    run = planned.built(cfg)
    key = planned.build_key(cfg)
    dtype, notes = run.dtype, []
    train, data = cfg["train"], cfg["data"]
    resolution, batch = int(data["resolution"]), int(data["batch_size"])
    if prior_enabled(data):  # DreamBooth prior preservation: every batch carries as many class images
        batch *= 2
        notes.append("prior preservation doubles each batch (class images); their caches are not counted")
    autocast = planned.autocast_dtype(cfg["trainer"])
    auto = None if autocast is None else str(autocast)

    modes = choice(cfg["model"])
    weights = frozen_weights(run, modes)
    lora = run.trainable()
    lora_bytes = sum(p.numel() * p.element_size() for p in lora)
    lora_dtypes = "/".join(sorted({DTYPE_NAMES.get(p.dtype, str(p.dtype)) for p in lora})) or "none"
    try:
        optim_bytes = state_bytes(cfg["optim"], cfg["trainer"], lora)
    except ImportError as err:
        optim_bytes = 2 * 4 * sum(p.numel() for p in lora)
        notes.append(f"optimizer state counted as AdamW's (2 x fp32): its package does not import here ({err})")
    ratio = optim_bytes / (4 * max(1, sum(p.numel() for p in lora)))
    optimizer_row = f"optimizer state ({optimizer_name(cfg['optim'])}: {ratio:.2g} x fp32)"

    latents_cached = bool(data.get("cache_latents"))
    text_cached = bool(train.get("cache_text_embeddings", True)) and not text_cache_blocker(cfg) \
        and not data.get("shuffle_tags")
    checkpointing = bool(train.get("gradient_checkpointing"))
    if text_cache_blocker(cfg):
        notes.append("the text encoders' own activations while they train (lora.text_encoder, embedding) are not "
                     "counted")

    def step_activations(on: bool) -> int:  # the VAE and text encoders run first in a step that encodes
        figure = planned.denoiser_step(key, resolution, auto, on).activations * batch
        if not latents_cached:
            figure = max(figure, planned.vae_encode(key, resolution, auto).activations * batch)
        if not text_cached:
            figure = max(figure, planned.text_encode(key)[0].activations * batch)
        return figure

    activations = {on: step_activations(on) for on in (False, True)}
    if planned.text_encode(key)[1]:
        notes.append(planned.text_encode(key)[1])
    latent_cache, text_cache, cache_note = cache_sizes(cfg, run, gib, latents_cached, text_cached)
    if cache_note:
        notes.append(cache_note)

    train_phase = {weights["denoiser"][0]: weights["denoiser"][1]}
    if not text_cached:
        train_phase[weights["text_encoders"][0]] = weights["text_encoders"][1]
    if not latents_cached:
        train_phase[weights["vae"][0]] = weights["vae"][1]
    train_phase.update({
        f"LoRA weights ({lora_dtypes})": lora_bytes,
        "LoRA gradients": lora_bytes,
        optimizer_row: optim_bytes,
        f"activations ({'checkpointed' if checkpointing else 'not checkpointed'}, batch {batch})": activations[checkpointing],
    })
    if modes["denoiser"]:
        largest = max((m.weight.numel() for m in quantized_linears(run.parts.denoiser).values()), default=0)
        train_phase["dequantized weight (largest Linear, transient)"] = largest * dtype.itemsize
    train_phase.update({"latent cache on device": latent_cache, "text cache on device": text_cache,
                        OVERHEAD_ROW: CUDA_OVERHEAD})
    phases = {}
    if latents_cached or text_cached:
        per_call = encode_batch_size(resolution, resolution)
        encode = max(planned.vae_encode(key, resolution, None).activations * per_call if latents_cached else 0,
                     planned.text_encode(key)[0].activations * planned.CACHE_BATCH if text_cached else 0)
        # One device: the denoiser waits in CPU memory while the caches fill (training.fit_caches.denoiser_parked).
        parked = single_device(cfg["trainer"])
        phases[CACHING] = {weights["denoiser"][0]: 0 if parked else weights["denoiser"][1],
                           weights["text_encoders"][0]: weights["text_encoders"][1],
                           weights["vae"][0]: weights["vae"][1],
                           f"LoRA weights ({lora_dtypes})": 0 if parked else lora_bytes,
                           f"encoding for the caches ({per_call} picture(s) / {planned.CACHE_BATCH} captions a call)": encode,
                           "latent cache on device": latent_cache if text_cached else 0,
                           OVERHEAD_ROW: CUDA_OVERHEAD}
    phases[TRAINING] = train_phase
    samples = (cfg.get("callbacks") or {}).get("samples")
    if samples:
        size = int(samples.get("size") or resolution)
        per_call = sample_batch_size(size)  # what SampleGrid draws per pipeline call
        # classifier-free guidance runs the denoiser on twice the pictures (FLUX.1-dev's embedded guidance does not)
        draw = max(planned.denoiser_inference(key, size, auto).activations * 2 * per_call,
                   planned.vae_decode(key, size, auto).activations * per_call)
        phases[SAMPLING] = {weights["denoiser"][0]: weights["denoiser"][1],
                            weights["text_encoders"][0]: weights["text_encoders"][1],
                            weights["vae"][0]: weights["vae"][1],
                            f"LoRA weights ({lora_dtypes})": lora_bytes,
                            "LoRA gradients": lora_bytes,
                            optimizer_row: optim_bytes,
                            f"drawing samples ({per_call} a call, {size}²)": draw,
                            "latent cache on device": latent_cache, "text cache on device": text_cache,
                            OVERHEAD_ROW: CUDA_OVERHEAD}
    phases = {name: {k: v for k, v in comps.items() if v} for name, comps in phases.items()}
    return MemoryPlan(cfg=cfg, phases=phases, activations=activations, notes=notes)


def single_device(trainer: Mapping[str, Any]) -> bool:
    """Whether the run trains on one device with Lightning's single-device strategy (the default):
    the case where the denoiser leaves the GPU while the caches fill."""
    strategy = str(trainer.get("strategy") or "auto")
    return strategy in ("auto", "single_device") and str(trainer.get("devices", 1)) in ("1", "auto") \
        and int(trainer.get("num_nodes") or 1) == 1


def frozen_weights(run: planned.RunModel, modes: Mapping[str, str | None]) -> dict[str, tuple[str, int]]:
    """(row name, bytes) of the denoiser, the VAE and the text encoders as loaded for the run."""
    dtype = run.dtype
    name = DTYPE_NAMES.get(dtype, str(dtype))
    denoiser_mode = modes["denoiser"]
    out = {"denoiser": (f"denoiser weights ({denoiser_mode or name})",
                        part_bytes(run.parts.denoiser, denoiser_mode, dtype, frozen_only=True)),
           "vae": (f"VAE weights ({name})", part_bytes(run.parts.vae, None, dtype))}
    quantized = set(quantized_text_encoders(run.family)) if modes["text_encoder"] else set()
    total, labels = 0, []
    for index, encoder in enumerate(run.parts.text_encoders):
        mode = modes["text_encoder"] if index in quantized else None
        total += part_bytes(encoder, mode, dtype, frozen_only=True)
        if mode:
            labels.append(f"{run.family.text_encoder_kinds[index].upper()} {mode}")
    label = name + (f"; {', '.join(labels)}" if labels else "")
    out["text_encoders"] = (f"text encoders weights ({label})", total)
    return out
