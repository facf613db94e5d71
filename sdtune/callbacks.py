"""sdtune's own Lightning callbacks: write the LoRA file and the sample grid when fit ends.

Both act on global rank 0 only, so multi-process runs write each file once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from .adapters import base_weights
from .ema import with_ema_facts
from .embeddings import lora_trains
from .errors import ConfigError
from .io import write_text_atomic
from .lora_files import DEFAULT_FORMAT, FORMATS, run_header, save_lora
from .stopping import GracefulStop

log = logging.getLogger(__name__)


def writes_outputs(trainer: L.Trainer) -> bool:
    """Whether this process writes the run's files: rank 0 only, and never in a ``fast_dev_run``
    (Lightning's smoke test writes no checkpoints; nor do we write LoRAs, samples or reports)."""
    return trainer.is_global_zero and not trainer.fast_dev_run


class TrainingCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a save when training stops between two intervals.

    Lightning writes ``last.ckpt`` only when a periodic save falls on the final step; a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` would otherwise end without a
    checkpoint of its final state.
    """

    def __init__(self, *args, keep_last: int | None = None, **kwargs):
        if keep_last is not None:  # validated with the config (sdtune.config.validate)
            # Lightning's own top-k, ranked by the global step: the newest N periodic checkpoints
            # survive (last.ckpt is saved apart from the top-k and always kept).
            kwargs.update(monitor="step", mode="max", save_top_k=keep_last)
        super().__init__(*args, **kwargs)

    def save_now(self, trainer: L.Trainer) -> None:
        """Checkpoint this step (its periodic name and last.ckpt), unless that was just done."""
        if self._last_global_step_saved == trainer.global_step or trainer.fast_dev_run or trainer.sanity_checking:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.save_now(trainer)


class LoRAExport(L.Callback):
    """Write ``<dirpath>/<filename>`` with its header at the end of ``fit``, in ``format``: kohya
    (the default, one file for ComfyUI, A1111/Forge, kohya sd-scripts and diffusers) or diffusers."""

    def __init__(self, dirpath: str, filename: str = "lora.safetensors", format: str = DEFAULT_FORMAT):
        if format not in FORMATS:
            raise ConfigError(f"callbacks.lora_export.format={format!r} is not a LoRA layout; choose one of {list(FORMATS)}.")
        self.path = Path(dirpath) / filename
        self.format = format

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not writes_outputs(trainer):
            return
        if not lora_trains(pl_module.cfg):
            log.info("embedding.with_lora=false (textual inversion alone): no LoRA trained, %s not written", self.path.name)
            return
        header = run_header(
            pl_module.cfg,
            pl_module.spec,
            steps=trainer.global_step,
            num_train_images=pl_module.num_train_images,
            output_name=self.path.stem,
        )
        header = with_ema_facts(header, pl_module.cfg)  # lora_state() gives the EMA weights then
        tensors = pl_module.lora_state()
        save_lora(self.path, tensors, header, format=self.format, unet_config=pl_module.parts.unet.config,
                  text_encoders=pl_module.text_encoder_lora_state(), base_weights=base_weights(pl_module.parts.unet, tensors))
        log.info("wrote %s", self.path)


class RunSummary(L.Callback):
    """Write ``summary.json``: what a sweep report needs that the metric logs do not hold.

    Any callback with a ``summary_section()`` method adds its dict (computed by ``on_train_end``).
    """

    def __init__(self, dirpath: str, lora_filename: str = "lora.safetensors"):
        self.dirpath = Path(dirpath)
        self.lora_filename = lora_filename
        self._start = None
        self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._start_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._wall = time.perf_counter() - self._start if self._start is not None else None

    def on_fit_end(self, trainer, pl_module) -> None:
        if not writes_outputs(trainer) or getattr(self, "_wall", None) is None:
            return
        wall = self._wall  # training only: sampling and export at fit end are not counted
        steps = trainer.global_step - self._start_step
        # The exporter's own path, so a renamed LoRA file (callbacks.lora_export.filename) is found.
        export = next((c for c in trainer.callbacks if isinstance(c, LoRAExport)), None)
        lora = export.path if export is not None else self.dirpath / self.lora_filename
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        summary = {
            "global_step": trainer.global_step,
            "trainable_params": pl_module.trainable_parameter_count(),
            "wall_seconds": round(wall, 3),
            "steps_per_second": round(steps / wall, 4) if wall > 0 else None,
            "lora_bytes": lora.stat().st_size if lora.is_file() else None,
            "final_metrics": metrics,
            "stopped_by": next((c.signal_name for c in trainer.callbacks if isinstance(c, GracefulStop)), None),
        }
        for callback in trainer.callbacks:  # sections other callbacks measured (e.g. the concept probe)
            section = getattr(callback, "summary_section", None)
            if callable(section) and section():
                summary.update(section())
        write_text_atomic(self.dirpath / "summary.json", json.dumps(summary, indent=2))


class LossPlot(L.Callback):
    """Write ``loss.png`` when fit ends: the smoothed train loss, and the validation loss if any.

    Read back from the CSV logger's ``metrics.csv``, so a resumed run plots its whole history.
    """

    def __init__(self, dirpath: str, metrics: str | None = None, filename: str = "loss.png"):
        self.path = Path(dirpath) / filename
        self.metrics = Path(metrics) if metrics else Path(dirpath) / "logs" / "csv" / "metrics.csv"

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not writes_outputs(trainer):
            return
        from .report import plot_run_loss, read_metrics

        for logger in trainer.loggers:
            logger.save()  # flush rows the CSV logger still holds
        train, val = read_metrics(self.metrics)
        if not train and not val:
            log.warning("no loss was logged to %s; loss.png not written", self.metrics)
            return
        family = pl_module.cfg["model"]["family"]
        plot_run_loss(train, val, self.path, title=f"{family} LoRA rank {pl_module.spec.rank}: loss")
        log.info("wrote %s", self.path)
