"""A few real training steps with what a GPU check asserts recorded: losses, LoRA and frozen weights, memory.

``make test-gpu`` (tests/gpu/) trains the full-size random-init architectures for a few steps
and asserts that training is healthy; the CPU twins in ``make test`` run the same checks on the
tiny models. Both go through :func:`watched_run`, which trains exactly as the bench does
(:func:`sdtune.bench.runner.run_sdtune`: ``LoRATrainingModule`` under a real ``lightning.Trainer``,
``random_init`` parts from :mod:`sdtune.families.arch`) with a :class:`Watch` callback that records:

* the loss of every step (finite or not);
* every trainable LoRA tensor at the start of training and at the end (did each one move?);
* a SHA-256 of a few frozen tensors of each model (UNet base, VAE, text encoders) at the start
  and at the end: frozen weights must come out bit-identical, whatever the precision plugin, the
  optimizer or torch.compile did;
* dtypes and devices (frozen weights in the precision's dtype, LoRA in fp32, text encoders off the
  accelerator once their outputs are cached), the optimizer, the GradScaler, the attention
  processors and whether the UNet is compiled;
* peak memory over the training loop, measured as the bench measures it (:class:`MemoryMeter`:
  ``torch.cuda.max_memory_allocated`` on a GPU), so a test's bound and the bench's target agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sdtune.bench.measure import MemoryMeter, StepClock, release_memory
from sdtune.bench.runner import run_sdtune
from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.data.records import load_records
from sdtune.lora.layers import named_trainable_lora_parameters
from sdtune.run.checks import validate

#: Frozen tensors hashed per model: the first, middle and last of its parameters.
PICKS = 3


def digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype, any device; bf16 has no numpy view, uint8 does); a
    quantized weight by its stored tensors (torchao's inner tensors, bitsandbytes' packed data)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return hashlib.sha256("".join(digest(getattr(tensor, n)) for n in names).encode()).hexdigest()
    data = tensor.data.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def frozen_picks(parts) -> dict[str, torch.Tensor]:
    """A few frozen parameters of every model of ``parts`` (denoiser base weights, VAE, each text encoder)."""
    models = {"denoiser": parts.denoiser, "vae": parts.vae, **{f"text_encoder_{i}": m for i, m in enumerate(parts.text_encoders)}}
    out = {}
    for name, model in models.items():
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        for i in sorted({0, len(frozen) // 2, len(frozen) - 1} if frozen else set())[:PICKS]:
            out[f"{name}.{frozen[i][0]}"] = frozen[i][1]
    return out


def frozen_digests(parts) -> dict[str, str]:
    return {name: digest(t) for name, t in frozen_picks(parts).items()}


@dataclass
class Report:
    """What one watched run recorded (see the module docstring)."""

    losses: list[float] = field(default_factory=list)
    lora_start: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_end: dict[str, torch.Tensor] = field(default_factory=dict)
    frozen_start: dict[str, str] = field(default_factory=dict)
    frozen_end: dict[str, str] = field(default_factory=dict)
    frozen_dtypes: set[str] = field(default_factory=set)  # UNet base and VAE
    lora_dtypes: set[str] = field(default_factory=set)
    quantized: list[str] = field(default_factory=list)  # the denoiser's quantized weight types (model.quantize)
    unet_device: str = ""
    encoder_devices: list[str] = field(default_factory=list)  # at train start, after the caches were filled
    optimizer: str = ""
    optimizer_defaults: dict[str, Any] = field(default_factory=dict)
    scaler_scale: float | None = None  # the GradScaler's scale at the end (16-mixed), None without one
    attention: set[str] = field(default_factory=set)
    compiled: bool = False
    gradient_checkpointing: bool = False
    strategy: str = ""
    world_size: int = 1
    peak_mb: float = 0.0
    memory_method: str = ""
    ms_per_step: float = 0.0

    @property
    def changed_lora(self) -> list[str]:
        return [k for k, v in self.lora_start.items() if not torch.equal(v, self.lora_end[k])]

    @property
    def changed_frozen(self) -> list[str]:
        return [k for k, v in self.frozen_start.items() if self.frozen_end.get(k) != v]

    def summary(self) -> str:
        """One line for a failing assertion or the test log."""
        return (f"losses={[round(x, 4) for x in self.losses]} lora changed {len(self.changed_lora)}/{len(self.lora_start)} "
                f"frozen changed {self.changed_frozen} peak={self.peak_mb:.0f} MiB ({self.memory_method}) "
                f"encoders on {self.encoder_devices} optimizer={self.optimizer} fused={self.optimizer_defaults.get('fused')} "
                f"scale={self.scaler_scale} attention={sorted(self.attention)} compiled={self.compiled} "
                f"checkpointing={self.gradient_checkpointing} strategy={self.strategy}x{self.world_size}")


class Watch(L.Callback):
    """Fills a :class:`Report` during ``fit``; put it before the bench's StepTimer, whose
    ``on_train_start`` resets the memory peak after this callback's snapshots."""

    def __init__(self, report: Report):
        self.report = report

    def on_train_start(self, trainer, pl_module) -> None:
        r, parts = self.report, pl_module.parts
        r.lora_start = {n: p.detach().float().cpu().clone() for n, p in named_trainable_lora_parameters(parts.denoiser)}
        r.lora_dtypes = {str(p.dtype) for _, p in named_trainable_lora_parameters(parts.denoiser)}
        r.frozen_start = frozen_digests(parts)
        r.frozen_dtypes = {str(p.dtype) for m in (parts.denoiser, parts.vae) for p in m.parameters()
                           if not p.requires_grad and not hasattr(p, "quant_state")}  # bitsandbytes packs into uint8
        r.quantized = sorted({type(p).__name__ for p in parts.denoiser.parameters()
                              if hasattr(p, "__tensor_flatten__") or hasattr(p, "quant_state")})
        r.unet_device = str(next(parts.denoiser.parameters()).device.type)
        r.encoder_devices = [str(next(m.parameters()).device.type) for m in parts.text_encoders]
        optimizer = trainer.optimizers[0]
        r.optimizer = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        r.optimizer_defaults = dict(optimizer.defaults)
        r.attention = {type(p).__name__ for p in parts.denoiser.attn_processors.values()}
        r.compiled = getattr(parts.denoiser, "_compiled_call_impl", None) is not None
        r.gradient_checkpointing = bool(getattr(parts.denoiser, "is_gradient_checkpointing", False))
        r.strategy = type(trainer.strategy).__name__
        r.world_size = int(trainer.world_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.report.losses.append(float(loss) if loss is not None else float("nan"))  # None: a skipped step

    def on_train_end(self, trainer, pl_module) -> None:
        r, parts = self.report, pl_module.parts
        r.lora_end = {n: p.detach().float().cpu().clone() for n, p in named_trainable_lora_parameters(parts.denoiser)}
        r.frozen_end = frozen_digests(parts)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        r.scaler_scale = float(scaler.get_scale()) if scaler is not None else None


def watched_run(cfg: dict[str, Any], *, device: str | torch.device, steps: int, random_init: bool,
                root_dir: str | Path) -> Report:
    """Train ``steps`` steps of ``cfg`` (a composed bench config, see :func:`compose`) and report."""
    device = torch.device(device)
    report = Report()
    meter, clock = MemoryMeter(device), StepClock(device)
    meter.begin_case()
    L.seed_everything(int(cfg.get("seed", 0)), verbose=False)
    records = load_records(cfg["data"]["root"])
    try:
        run_sdtune(cfg, records, device=device, steps=steps, clock=clock, meter=meter, random_init=random_init,
                   root_dir=Path(root_dir), callbacks=[Watch(report)])
        report.peak_mb, report.memory_method = meter.peak_mb(), meter.method
    finally:
        release_memory()
    durations = clock.durations(1, int(cfg["data"]["batch_size"]))
    report.ms_per_step = 1000 * sorted(durations)[len(durations) // 2] if durations else 0.0
    return report


def compose(*overrides: str, output_dir: str | Path) -> dict[str, Any]:
    """``conf/bench.yaml`` with ``overrides`` (e.g. ``bench/preset=gpu_sdxl``), validated and resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("bench", overrides=[*overrides, f"paths.output_dir={output_dir}"])
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def target(cfg: dict[str, Any], metric: str) -> float | None:
    """The bound a bench preset sets on ``metric`` (``bench.targets``), e.g. SDXL's peak_mem_mib 9537."""
    for t in cfg.get("bench", {}).get("targets") or []:
        if t["metric"] == metric:
            return float(t.get("at_most", t.get("below", t.get("at_least"))))
    return None
