"""Every check of a training config, assembled: :func:`validate` before anything is read or loaded,
:func:`check_against_base` once the base model's configs can be read, :func:`check_device` before
its weights load.

Each section's checks live beside the code that uses the section, all with one call shape
(``check(cfg: DictConfig) -> None``, raising :class:`~sdtune.utils.errors.ConfigError`);
:data:`SECTION_CHECKS` runs them in order, so a typo costs a second, not a model download. The
settings of the run as a whole (``trainer.*``, ``seed``, ``optimized_metric``, checkpoints kept)
and the hardware checks are checked here: ``run/`` is where they are used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from sdtune.config.overrides import complete_optional_mappings
from sdtune.config.paths import CONF_DIR, yaml_file
from sdtune.config.schema import check_known_keys
from sdtune.config.values import Settings
from sdtune.data import config as data_config
from sdtune.evaluation import config as eval_config
from sdtune.families import checks as model_checks
from sdtune.families import quantize_checks
from sdtune.lora import layers
from sdtune.lora.checks import first_line
from sdtune.training import diffusion, ema, embeddings, optimization, speed, text_encoders
from sdtune.training.optimization import OPTIONAL_OPTIMIZERS
from sdtune.utils.errors import ConfigError

PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true")
#: pip commands of the optimizers' packages beyond the base install (prodigyopt is an extra of pyproject.toml).
OPTIMIZER_PACKAGES = {**OPTIONAL_OPTIMIZERS, "bitsandbytes": "pip install bitsandbytes"}


def check_trainer(cfg: DictConfig) -> None:
    """``trainer.*`` that sdtune reads itself (precision, accumulation, the non-finite check, the
    run's length) and ``seed``; the other Trainer keys go to ``lightning.Trainer`` as they are."""
    s = Settings(cfg)
    precision = str(s.get("trainer.precision"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported; use one of {list(PRECISIONS)}.")
    s.integer("trainer.accumulate_grad_batches", ge=1)
    s.integer("trainer.nonfinite_check_every", ge=1,
              fix="e.g. trainer.nonfinite_check_every=10 (steps between reads of the NaN/Inf record).")
    limits = {}
    for key in ("trainer.max_steps", "trainer.max_epochs"):  # each a positive integer or -1 (no limit)
        value = s.get(key)
        value = -1 if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(
                f"{key} must be a positive integer, or -1 for no limit, got {value!r}. "
                "Fix: e.g. trainer.max_steps=1000 (or trainer.max_steps=-1 trainer.max_epochs=10)."
            )
        limits[key] = value
    if all(v == -1 for v in limits.values()):
        raise ConfigError(
            "trainer.max_steps=-1 and trainer.max_epochs=-1: the run would never end. "
            "Fix: set one of them, e.g. trainer.max_steps=1000 or trainer.max_epochs=10."
        )
    seed = s.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer from 0 to 2**32-1 (4294967295), got {seed!r}. Fix: e.g. seed=42.")


def check_run(cfg: DictConfig) -> None:
    """The checkpoints kept (``callbacks.model_checkpoint.keep_last``) and ``optimized_metric``."""
    s = Settings(cfg)
    s.integer("callbacks.model_checkpoint.keep_last", ge=1, optional=True, fix="e.g. keep_last=3, or null to keep all.")
    metric = s.get("optimized_metric")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ConfigError(f"optimized_metric must be a logged metric name such as val/loss, or null; got {metric!r}.")
    if metric == "val/loss" and not s.get("data.val_images"):
        raise ConfigError(
            "optimized_metric=val/loss, but data.val_images=0 logs no validation loss. Fix: data.val_images=4 "
            "(a fixed validation loss on 4 training images), or optimize another metric."
        )


#: The share of a GPU memory preset's card (``hardware_preset.memory_gib``) a run's planned peak may
#: take; the rest is for the desktop and other programs on the card. The presets are set so that every
#: family they list plans under it (tests/planning/test_presets.py).
PRESET_SHARE = 0.95


def check_hardware(cfg: DictConfig) -> None:
    """A GPU memory preset (``hardware=<N>gb``) on a CUDA machine: the run, with whatever overrides
    were added to the preset, must plan under :data:`PRESET_SHARE` of its card
    (:func:`check_planned_fit`). Without CUDA the preset is refused by :func:`check_device` anyway,
    and the full-size plan (seconds of CPU) is not made."""
    preset = Settings(cfg).get("hardware_preset")
    if not preset or preset.get("memory_gib") is None or not torch.cuda.is_available():
        return
    check_planned_fit(cfg)


def check_planned_fit(cfg: DictConfig) -> None:
    """Refuse a run whose planned GPU peak (:func:`sdtune.planning.plan_memory`) exceeds
    :data:`PRESET_SHARE` of its preset's card, naming the largest components and the switches that
    bring it under, each with its planned peak."""
    # deferred: the planner builds the model on the meta device and steps it (seconds): GPU runs only
    from sdtune.planning import plan_memory

    s = Settings(cfg)
    preset = s.get("hardware_preset")
    gib = float(preset.memory_gib)
    allowed = PRESET_SHARE * gib * 2**30
    plan = plan_memory(cfg, gib)
    if plan.peak_bytes <= allowed:
        return
    largest = sorted(plan.components.items(), key=lambda item: -item[1])[:3]
    fits = [f"{override} (planned {peak / 2**30:.2f} GiB)" for override, peak in plan.suggestions(gib) if peak <= allowed]
    bigger = sorted((size, name) for name, size in hardware_presets().items() if PRESET_SHARE * size * 2**30 >= plan.peak_bytes)
    fix = "; or ".join(fits[:3]) if fits else (f"hardware={bigger[0][1]} (a bigger card)" if bigger else "a smaller base")
    raise ConfigError(
        f"hardware={preset.name}: this run is planned to need {plan.peak_bytes / 2**30:.2f} GiB of GPU memory at its "
        f"peak ({plan.peak_phase}: " + ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in largest)
        + f"), over the {allowed / 2**30:.2f} GiB this preset allows ({PRESET_SHARE:.0%} of {preset.memory_gib} GiB). "
        f"Fix: {fix}. python -m sdtune.plan with the same overrides lists every component.")


def hardware_presets() -> dict[str, float]:
    """``conf/hardware/<name>.yaml``'s card memory (GiB) by preset name."""
    return {file.stem: float(yaml_file(file)["hardware_preset"]["memory_gib"])
            for file in sorted((CONF_DIR / "hardware").glob("*.yaml"))}


#: The checks :func:`validate` runs, in order: the first problem found is the one reported.
SECTION_CHECKS: tuple[Callable[[DictConfig], None], ...] = (
    check_known_keys,  # a typo in a key first: its value would be ignored
    model_checks.check_config,  # model.*
    quantize_checks.check_config,  # model.quantize, and the LoRA variants a quantized base refuses
    layers.check_config,  # lora.*
    text_encoders.check_config,  # lora.text_encoder
    data_config.check_config,  # data.*
    check_trainer,  # trainer.*, seed
    optimization.check_config,  # optim.*
    diffusion.check_config,  # the objective's train.* (prediction_type, snr_gamma), noise_offset
    ema.check_config,  # train.ema
    check_run,  # keep_last, optimized_metric
    data_config.check_methods,  # train.masked_loss, prior preservation
    eval_config.check_config,  # eval
    embeddings.check_config,  # embedding
    speed.check_config,  # speed.*
    check_hardware,  # last: it plans the whole run (hardware=<N>gb against the card, CUDA machines only)
)


def validate(cfg: DictConfig, *, planned_fit: bool = True) -> None:
    """Raise :class:`ConfigError` for the first invalid training setting (the keys a dotted override
    left out of an optional mapping are filled in first). ``planned_fit=False`` leaves out
    :func:`check_hardware` (``sdtune.plan`` prints the plan it would refuse on)."""
    complete_optional_mappings(cfg)
    for check in SECTION_CHECKS:
        if planned_fit or check is not check_hardware:
            check(cfg)


def check_against_base(cfg: Any, source: str, captions: list[str]) -> None:
    """Settings checked against the base model's own configs and tokenizers, before its weights load:
    ``lora.targets`` and ``lora.rank`` against the UNet's layers and ``lora.text_encoder.targets``
    against the text encoders' (all built on the meta device), ``embedding.tokens`` and
    ``embedding.num_vectors`` against the tokenizers and the captions. Only a diffusers folder has
    the configs; for other sources the same checks run once the model has loaded."""
    base = model_checks.base_on_meta(cfg, source)
    if base is None:
        return
    layers.check_base(cfg, base.denoiser, base.family.default_lora_targets)
    text_encoders.check_targets_in_configs(cfg, base.family, base.arch)
    embeddings.check_base(cfg, source, captions)


def _gpu_requested(cfg: DictConfig) -> bool:
    accelerator = str(Settings(cfg).get("trainer.accelerator") or "auto")
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def preset_sets(cfg: DictConfig, *, precision: bool = True) -> str:
    """``hardware=8gb (a GPU memory preset) sets trainer.precision=16-mixed and optim=adamw8bit ...: ``
    when a GPU memory preset chose the settings a message is about, else ``""``."""
    s = Settings(cfg)
    preset = s.get("hardware_preset")
    if not preset:
        return ""
    optimizer = str(s.get("optim.optimizer._target_") or "")
    what = [f"trainer.precision={s.get('trainer.precision')}"] if precision else []
    if optimizer.startswith("bitsandbytes."):
        what.append("optim=adamw8bit (8-bit AdamW from bitsandbytes, CUDA only)")
    return f"hardware={preset.get('name')} (a GPU memory preset) sets {' and '.join(what)}: "


def check_device(cfg: DictConfig) -> None:
    """Settings that need hardware or an optional package; checked once the model is known to
    exist, before it loads."""
    import torch

    s = Settings(cfg)
    accelerator = str(s.get("trainer.accelerator") or "auto")
    preset = preset_sets(cfg)
    cpu_fix = (f" Fix: drop hardware={s.get('hardware_preset.name')} on a machine without a GPU (the presets are "
               "for GPUs), or add trainer=cpu trainer.precision=32 optim=adamw." if preset else "")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{preset}trainer.accelerator={accelerator} (trainer=gpu, which the GPU presets such as experiment=kolors_lora "
            "use) but this machine has no CUDA GPU."
            + (cpu_fix or " Fix: run it on a GPU machine, or add trainer=cpu trainer.precision=32 to train on the CPU "
               "(very slow at full size).")
        )
    if str(s.get("trainer.precision")) == "16-mixed" and not _gpu_requested(cfg):
        raise ConfigError(
            f"{preset}trainer.precision=16-mixed needs a CUDA GPU and none is in use."
            + (cpu_fix or " Fix: trainer.precision=32 (or bf16-mixed) on the CPU, e.g. with trainer=cpu.")
        )
    check_optimizer_importable(cfg)
    quantize_checks.check_device(cfg)  # fp8/nf4 need a CUDA GPU that runs them


def check_optimizer_importable(cfg: DictConfig) -> None:
    """``optim.optimizer._target_`` imports: a missing package (bitsandbytes for optim=adamw8bit and
    hardware=8gb/12gb) is named with its pip command here, not by Hydra after the model loaded."""
    target = str(Settings(cfg).get("optim.optimizer._target_") or "")
    module, _, name = target.rpartition(".")
    if not module:
        raise ConfigError(f"optim.optimizer._target_={target!r} is not an importable class path such as "
                          "torch.optim.AdamW. Fix: pick an optimizer preset (optim=adamw|adamw8bit|prodigy|adafactor).")
    package = module.split(".")[0]
    preset = preset_sets(cfg, precision=False) if package == "bitsandbytes" else ""
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        install = OPTIMIZER_PACKAGES.get(package, f"install the package that provides {module}")
        raise ConfigError(
            f"{preset}optim.optimizer._target_={target} needs the package {package}, which is not installed or does "
            f"not import ({first_line(err)}). Fix: {install}, or pick another optimizer (e.g. optim=adamw)."
        ) from None
    if not hasattr(found, name):
        raise ConfigError(f"optim.optimizer._target_={target}: {module} has no {name}. Fix: check the spelling, "
                          "or pick an optimizer preset (optim=adamw|adamw8bit|prodigy|adafactor).")
