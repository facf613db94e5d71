"""sdtune's own Lightning callbacks: write the LoRA file and the sample grid when fit ends.

Both act on global rank 0 only, so multi-process runs write each file once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sdtune.lora.adapters import base_weights
from sdtune.lora.files import FORMATS, default_format, run_header, save_lora
from sdtune.run.plots import plot_run_loss, read_metrics
from sdtune.training.ema import with_ema_facts
from sdtune.training.embeddings import lora_trains
from sdtune.training.stopping import AFTER_TRAINING, graceful_stop, writes_outputs
from sdtune.utils.errors import ConfigError
from sdtune.utils.io import write_text_atomic

log = logging.getLogger(__name__)


class TrainingCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a save when training stops between two intervals.

    Lightning writes ``last.ckpt`` only when a periodic save falls on the final step; a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` would otherwise end without a
    checkpoint of its final state.
    """

    def __init__(self, *args, keep_last: int | None = None, **kwargs):
        if keep_last is not None:  # validated with the config (sdtune.run.checks.check_run)
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
    (one file for ComfyUI, A1111/Forge, kohya sd-scripts and, for the UNet families, diffusers) or
    diffusers; None: the family's layout (``default_export_format``)."""

    def __init__(self, dirpath: str, filename: str = "lora.safetensors", format: str | None = None):
        if format is not None and format not in FORMATS:
            raise ConfigError(f"callbacks.lora_export.format={format!r} is not a LoRA layout; choose one of {list(FORMATS)}.")
        self.path = Path(dirpath) / filename
        self.format = format

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not writes_outputs(trainer):
            return
        if not lora_trains(pl_module.cfg):
            log.info("embedding.with_lora=false (textual inversion alone): no LoRA trained, %s not written", self.path.name)
            return
        write_run_lora(self.path, pl_module, steps=trainer.global_step, format=self.format)
        log.info("wrote %s", self.path)


def write_run_lora(path: Path, pl_module, *, steps: int, format: str | None = None) -> Path:
    """Write ``pl_module``'s LoRA (the EMA weights where the run exports them) with the run's header to
    ``path``, in ``format`` (None: the family's): what a run leaves as ``lora.safetensors``."""
    denoiser = pl_module.parts.denoiser
    header = run_header(
        pl_module.cfg,
        pl_module.spec,
        steps=steps,
        num_train_images=pl_module.num_train_images,
        output_name=Path(path).stem,
        denoiser_config=denoiser.config,
    )
    header = with_ema_facts(header, pl_module.cfg)  # lora_state() gives the EMA weights then
    tensors = pl_module.lora_state()
    format = format or default_format(pl_module.cfg["model"]["family"])
    return save_lora(path, tensors, header, format=format, denoiser_config=denoiser.config,
                     text_encoders=pl_module.text_encoder_lora_state(), base_weights=base_weights(denoiser, tensors))


class RunSummary(L.Callback):
    """Write ``summary.json``: what a sweep report needs that the metric logs do not hold.

    Written when fit is torn down, after every callback's ``on_fit_end``. Any callback with a
    ``summary_section()`` method adds its dict (computed by ``on_train_end``, or by ``on_fit_end``
    when a finished run is resumed). The training time, steps and final
    metrics are also kept in each checkpoint, so resuming a finished run (which trains nothing:
    Lightning then skips ``on_train_start``/``on_train_end``) writes the same summary again,
    and says whether training finished and what stopped the run.
    """

    def __init__(self, dirpath: str, lora_filename: str = "lora.safetensors"):
        self.dirpath = Path(dirpath)
        self.lora_filename = lora_filename
        self._trainer: L.Trainer | None = None
        self._start = None
        self._start_step = 0
        self._wall: float | None = None
        self._restored: dict[str, Any] = {}  # the trained run's numbers, from the checkpoint resumed

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict() records the metrics at each checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._start_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._wall = self._elapsed()

    def _elapsed(self) -> float | None:
        if self._wall is not None:
            return self._wall
        return time.perf_counter() - self._start if self._start is not None else None

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if self._start is None or trainer is None:  # nothing trained in this fit
            return dict(self._restored)
        return {"wall_seconds": self._elapsed(), "steps": trainer.global_step - self._start_step,
                "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # After every callback's on_fit_end (the evaluation and concept probe of a resumed finished
        # run add their sections there); not called when fit raised.
        if stage != "fit":
            return
        trained = self._start is not None
        if not trained:  # a finished run resumed: its final metrics come from the checkpoint
            for key, value in (self._restored.get("final_metrics") or {}).items():
                trainer.callback_metrics.setdefault(key, torch.tensor(value))
        if not writes_outputs(trainer):
            self._trainer = None
            return
        # training only: sampling and export at fit end are not counted
        wall = self._elapsed() if trained else self._restored.get("wall_seconds")
        steps = trainer.global_step - self._start_step if trained else self._restored.get("steps")
        # The exporter's own path, so a renamed LoRA file (callbacks.lora_export.filename) is found.
        export = next((c for c in trainer.callbacks if isinstance(c, LoRAExport)), None)
        lora = export.path if export is not None else self.dirpath / self.lora_filename
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        stop = graceful_stop(trainer)
        stopped_by = stop.signal_name if stop is not None else None
        stopped_in = stop.stopped_in if stopped_by else None
        summary = {
            "global_step": trainer.global_step,
            "trainable_params": pl_module.trainable_parameter_count(),
            "wall_seconds": round(wall, 3) if wall is not None else None,
            "steps_per_second": round(steps / wall, 4) if wall and steps is not None else None,
            "lora_bytes": lora.stat().st_size if lora.is_file() else None,
            "final_metrics": metrics,
            "training_finished": stopped_in != "training",
            "stopped_by": stopped_by,
            "stopped_in": stopped_in,  # "training" (resume to finish it) or "final renders" (samples skipped)
        }
        if stopped_by:
            after = stopped_in == AFTER_TRAINING
            summary["note"] = (f"training finished (step {trainer.global_step}); {stopped_by} skipped the final renders"
                               if after else f"stopped by {stopped_by} at step {trainer.global_step}")
            if stop.resumable(trainer):
                summary["note"] += f"; resume to {'draw them' if after else 'finish'}: {stop.resume_command()}"
        for callback in trainer.callbacks:  # sections other callbacks measured (e.g. the concept probe)
            section = getattr(callback, "summary_section", None)
            if callable(section) and section():
                summary.update(section())
        write_text_atomic(self.dirpath / "summary.json", json.dumps(summary, indent=2))
        self._trainer = None


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
        for logger in trainer.loggers:
            logger.save()  # flush rows the CSV logger still holds
        train, val = read_metrics(self.metrics)
        if not train and not val:
            log.warning("no loss was logged to %s; loss.png not written", self.metrics)
            return
        family = pl_module.cfg["model"]["family"]
        plot_run_loss(train, val, self.path, title=f"{family} LoRA rank {pl_module.spec.rank}: loss")
        log.info("wrote %s", self.path)
