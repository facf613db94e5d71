"""Run one case: sdtune's LoRATrainingModule under a real ``lightning.Trainer``, or the reference loop.

sdtune cases are wired as ``sdtune.run.train`` wires a run (module, datamodule from the config,
Trainer from the ``trainer`` config) with the bench's timing callback in place of the run's
callbacks and loggers (checkpoints, LoRA export, sample grids, CSV/TensorBoard logs), since those
write files rather than train. With ``bench.random_init`` the module gets random full-size parts
(``arch.build_random_parts``) instead of loading ``model.path``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sdtune.bench.cases import REFERENCE, Case
from sdtune.bench.measure import MemoryMeter, StepClock, batch_size_of, release_memory
from sdtune.bench.reference import run_reference
from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.families import ModelParts, get_family
from sdtune.families.arch import build_random_parts
from sdtune.families.builder import build_parts, model_source
from sdtune.families.quantize import choice
from sdtune.families.quantize_load import quantize_parts
from sdtune.training.module import LoRATrainingModule
from sdtune.training.trainable import WEIGHT_DTYPES
from sdtune.utils.io import write_text_atomic

log = logging.getLogger(__name__)


class StepTimer(L.Callback):
    """Ticks a :class:`StepClock` at the end of every training batch; resets peak memory at train start.

    ``on_train_start`` comes after ``on_fit_start``, so the latent and text caches are filled and
    the text encoders have left the GPU: the memory peak is the training loop's own.
    """

    def __init__(self, clock: StepClock, meter: MemoryMeter):
        self.clock = clock
        self.meter = meter

    def on_train_start(self, trainer, pl_module) -> None:
        self.meter.begin_loop()
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick(batch_size_of(batch))


def trainer_kwargs(trainer_cfg: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """The ``trainer`` config as ``lightning.Trainer`` arguments (sdtune's own keys dropped)."""
    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    kwargs = {k: v for k, v in trainer_cfg.items() if k in accepted}
    kwargs.update(
        max_steps=max_steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return kwargs


def random_parts(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ModelParts:
    """The full-size architecture with random weights, quantized as ``model.quantize`` says."""
    parts = build_random_parts(cfg["model"]["family"], device=device, dtype=dtype, seed=int(cfg.get("seed", 0)))
    quantize_parts(get_family(cfg["model"]["family"]), parts, choice(cfg["model"]), dtype)
    return parts


def run_sdtune(cfg: dict[str, Any], records, *, device: torch.device, steps: int, clock: StepClock,
               meter: MemoryMeter, random_init: bool, root_dir: Path,
               callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """Fit ``steps`` steps; ``callbacks`` (e.g. :class:`sdtune.bench.watch.Watch`) run before the timer's hooks."""
    module = LoRATrainingModule(cfg, num_train_images=len(records),
                                model_source=None if random_init else model_source(cfg["model"]))
    if random_init:
        module.attach(random_parts(cfg, device, module.weight_dtype))
    datamodule = ImageCaptionDataModule.from_config(records, cfg["data"], seed=int(cfg.get("seed", 0)))
    trainer = L.Trainer(**trainer_kwargs(cfg["trainer"], steps), callbacks=[*callbacks, StepTimer(clock, meter)],
                        default_root_dir=str(root_dir))
    trainer.fit(module, datamodule=datamodule)
    return trainer


def load_reference_parts(cfg: dict[str, Any], device: torch.device, random_init: bool) -> ModelParts:
    """The same base model sdtune loads: the same loader, or the same random architecture."""
    dtype = WEIGHT_DTYPES.get(str(cfg["trainer"].get("precision", "32")), torch.float32)
    if random_init:
        return random_parts(cfg, device, dtype)
    return build_parts(cfg["model"], dtype=dtype)[1]  # the loader sdtune uses (a tiny model is built if needed)


def run_case(case: Case, cfg: dict[str, Any], records, *, device: torch.device, warmup: int, steps: int,
             random_init: bool, root_dir: Path) -> tuple[list[float], float, str]:
    """One round of ``case``: (seconds of each timed step, peak memory in MB, how memory was measured)."""
    meter = MemoryMeter(device)
    clock = StepClock(device)
    meter.begin_case()
    L.seed_everything(int(cfg.get("seed", 0)), verbose=False)
    total = warmup + steps
    try:
        if case.kind == REFERENCE:
            parts = load_reference_parts(cfg, device, random_init)
            run_reference(cfg, records, parts, device=device, steps=total, clock=clock, meter=meter)
            del parts
        else:
            run_sdtune(cfg, records, device=device, steps=total, clock=clock, meter=meter,
                       random_init=random_init, root_dir=root_dir)
        peak = meter.peak_mb()
    finally:
        release_memory()
    seconds = clock.durations(warmup, int(cfg["data"]["batch_size"]))
    if not seconds:
        raise RuntimeError(f"case {case.name}: no full-size batch among {len(clock.sizes)} steps after {warmup} warm-up")
    return seconds, peak, meter.method


def first_batch(cfg: dict[str, Any], records) -> dict[str, Any]:
    """One collated batch from the real datamodule (for FLOP counting: shapes and SDXL sizes)."""
    datamodule = ImageCaptionDataModule.from_config(records, {**cfg["data"], "num_workers": 0}, seed=0)
    return next(iter(datamodule.train_dataloader()))


def profile_case(case: Case, cfg: dict[str, Any], records, *, device: torch.device, steps: int, random_init: bool,
                 root_dir: Path, out: Path, top: int = 45) -> None:
    """Run ``case`` once under cProfile and write the top functions (by own and by cumulative time)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run_case(case, cfg, records, device=device, warmup=0, steps=steps, random_init=random_init, root_dir=root_dir)
    finally:
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"cProfile of {case.name} ({steps} steps, model loading included)\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)

    write_text_atomic(out, text.getvalue())
