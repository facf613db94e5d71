"""One training run: validate, check the data, build Lightning objects from the config, fit.

The base model is loaded by the LightningModule's ``setup()``, after every cheap check has passed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from sdtune.data.datamodule import ImageCaptionDataModule
from sdtune.data.masks import find_masks, mask_manifest
from sdtune.evaluation.reference import evaluation_callbacks
from sdtune.families.builder import model_source
from sdtune.run.checks import check_against_base, check_device
from sdtune.run.folder import check_fresh, check_writable, is_secondary_rank, run_folder_lock
from sdtune.run.loggers import drop_rows_after
from sdtune.run.preflight import preflight
from sdtune.run.progress import RunProgress
from sdtune.run.resume import changed_settings
from sdtune.training.checkpointing import AtomicCheckpointIO, check_resumable, data_manifest, resolve_ckpt_path
from sdtune.training.class_images import class_manifest, class_records
from sdtune.training.module import LoRATrainingModule
from sdtune.training.stopping import GracefulStop, StopNow
from sdtune.utils.console import tidy_console
from sdtune.utils.errors import OutputError, RunStopped
from sdtune.utils.io import write_text_atomic

log = logging.getLogger(__name__)
SDTUNE_TRAINER_KEYS = ("skip_nonfinite", "nonfinite_check_every")
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# The frozen VAE and text encoders are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``; null disables one."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Train a LoRA as ``cfg`` says; returns the final metrics (for sweeps and tests)."""
    tidy_console()
    records = preflight(cfg)  # every setting's check, then the data: all before a model is loaded
    output_dir = Path(output_dir)
    if is_secondary_rank():  # DDP's extra processes: rank 0 owns the folder and its checks
        return _fit(cfg, output_dir, records)
    check_writable(output_dir)
    with run_folder_lock(output_dir):
        return _fit(cfg, output_dir, records)


def _build_trainer(cfg: DictConfig, resolved: dict[str, Any], output_dir: Path) -> tuple[L.Trainer, GracefulStop]:
    """The Lightning Trainer the config describes, with sdtune's stop handling and progress bar."""
    trainer_kwargs = dict(resolved["trainer"])
    for key in SDTUNE_TRAINER_KEYS:  # ours, not lightning.Trainer's
        trainer_kwargs.pop(key, None)
    stop = GracefulStop(output_dir)
    callbacks = [*_instantiate_all(cfg.get("callbacks")), *evaluation_callbacks(resolved, output_dir), stop]
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        # Lightning would otherwise add its own per-epoch checkpoint; null means no checkpoints.
        trainer_kwargs["enable_checkpointing"] = False
        log.warning("callbacks.model_checkpoint is off: this run writes no checkpoints and cannot be resumed")
    if trainer_kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.insert(0, RunProgress())  # one bar over the run's steps; first, so it closes before any render
    # Lightning's summary table adds a column of zero FLOPs; the module logs its parameter counts itself.
    trainer_kwargs.setdefault("enable_model_summary", False)
    trainer = L.Trainer(
        **trainer_kwargs,
        callbacks=callbacks,
        logger=_instantiate_all(cfg.get("logger")) or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(output_dir),
    )
    return trainer, stop


def _fit(cfg: DictConfig, output_dir: Path, records: list) -> dict[str, Any]:
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if not is_secondary_rank():
        check_fresh(output_dir, resuming=ckpt_path is not None)
    L.seed_everything(int(cfg.seed), workers=True)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # plain types for checkpoints
    masks = find_masks(records, cfg.data.root, cfg.data.mask_folder) if cfg.train.get("masked_loss") else None
    classes, class_root = class_records(resolved)  # train.prior_loss_weight: rendered once, if need be
    manifest = {**data_manifest(records, cfg.data.root), **mask_manifest(masks, cfg.data.root),
                **class_manifest(classes, class_root)}
    if ckpt_path is not None:
        ckpt = check_resumable(ckpt_path, resolved, manifest)  # before any model is loaded
        changes = changed_settings(ckpt.get("hyper_parameters", {}).get("cfg", {}), resolved)
        if changes:
            log.warning("resuming with %d setting(s) changed from the checkpoint's: %s", len(changes), "; ".join(changes))
    datamodule = ImageCaptionDataModule.from_config(records, resolved["data"], seed=int(cfg.seed), masks=masks,
                                                    class_records=classes)
    _write(lambda: write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(resolved)))
    if ckpt_path is not None:
        lost = drop_rows_after(output_dir / "logs" / "csv" / "metrics.csv", int(ckpt["global_step"]))
        log.info("resuming from %s (step %d)%s", ckpt_path, ckpt["global_step"], f"; dropped {lost} log rows logged after it" if lost else "")
    source = model_source(resolved["model"])  # an unreachable model fails here, in seconds
    check_against_base(resolved, source, [c for r in records for c in r.captions])  # configs and tokenizers only
    # kohya's ss_num_train_images counts repeats: the images one epoch trains on
    module = LoRATrainingModule(resolved, model_source=source, num_train_images=len(datamodule.dataset),
                                data_manifest=manifest)
    check_device(cfg)
    warn_if_over_free_memory(resolved)
    trainer, stop = _build_trainer(cfg, resolved, output_dir)
    log.info("training a rank-%d %s LoRA on %d images (%d with repeats) into %s", module.spec.rank, cfg.model.family,
             len(records), len(datamodule.dataset), output_dir)
    try:
        _write(lambda: trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                                   weights_only=True))
    except StopNow:  # a second Ctrl-C
        raise RunStopped(stop.stopped_at_once_message(trainer.global_step), 128 + signal.SIGINT) from None
    finally:
        stop.restore()  # the caller's handlers, whichever way fit ended
    if stop.signal_name:
        raise RunStopped(stop.stopped_message(trainer.global_step), stop.exit_code)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("done: %s", {k: round(v, 5) for k, v in metrics.items()})
    return metrics


def warn_if_over_free_memory(cfg: dict[str, Any]) -> None:
    """On a CUDA device, plan the run's GPU memory (:func:`sdtune.planning.plan_memory`, a few
    seconds) and warn, naming the largest components, when the planned peak exceeds the device's
    free memory (``torch.cuda.mem_get_info``). Nothing on the CPU, where no plan is made."""
    import torch

    accelerator = str(cfg["trainer"].get("accelerator") or "auto")
    if accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return
    # deferred: the planner (a meta-device step under torch's memory tracker) is for GPU runs only
    from sdtune.planning import plan_memory
    from sdtune.planning.memory_plan import single_device  # deferred: as above

    if not single_device(cfg["trainer"]):  # each rank would open a CUDA context on GPU 0 before its own device
        return

    free, total = torch.cuda.mem_get_info()
    try:
        plan = plan_memory(cfg, total / 2**30)
    except Exception as err:  # the plan is advice: a model it cannot build must not stop the run
        log.warning("memory plan skipped (%s: %s)", type(err).__name__, err)
        return
    if plan.peak_bytes <= free:
        log.info("memory plan: %.2f GiB peak (%s), %.2f GiB free on the GPU", plan.peak_bytes / 2**30, plan.peak_phase,
                 free / 2**30)
        return
    largest = sorted(plan.components.items(), key=lambda item: -item[1])[:4]
    log.warning("memory plan: this run needs about %.2f GiB of GPU memory at its peak (%s), more than the %.2f GiB "
                "free: %s. It may run out of memory; python -m sdtune.plan with the same overrides lists the switches "
                "that lower it.", plan.peak_bytes / 2**30, plan.peak_phase, free / 2**30,
                ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in largest))


def _write(action: Callable[[], Any]) -> Any:
    """Run ``action``; a failed write (full disk, read-only folder) becomes one clear error.

    Every file is written to a temporary name and renamed, so what was there before (the last
    complete checkpoint above all) is still there.
    """
    try:
        return action()
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        where = err.filename or "the run folder"
        raise OutputError(
            f"could not write {where}: {err.strerror}. Files already written stay complete (the last good "
            "checkpoint is in the run's checkpoints/ folder). Fix: free disk space or make the folder writable, "
            "then resume with the same command plus ckpt_path=last."
        ) from None
