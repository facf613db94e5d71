"""One training run: validate, check the data, build Lightning objects from the config, fit.

The base model is loaded by the LightningModule's ``setup()``, after every cheap check has passed.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpointing import AtomicCheckpointIO, check_resumable, resolve_ckpt_path
from .config import check_device, validate
from .data import ImageCaptionDataModule, load_records
from .io import write_text_atomic
from .loggers import drop_rows_after
from .module import LoRATrainingModule

log = logging.getLogger(__name__)
SDTUNE_TRAINER_KEYS = ("skip_nonfinite",)
# The frozen VAE and text encoders are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``; null disables one."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Train a LoRA as ``cfg`` says; returns the final metrics (for sweeps and tests)."""
    validate(cfg)
    # every data problem surfaces before a model is loaded
    records = load_records(cfg.data.root, verify=cfg.data.get("verify_images", True), bad_images=cfg.data.get("bad_images", "error"))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(int(cfg.seed), workers=True)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # plain types for checkpoints
    write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(resolved))

    datamodule = ImageCaptionDataModule.from_config(records, resolved["data"], seed=int(cfg.seed))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if ckpt_path is not None:
        ckpt = check_resumable(ckpt_path, resolved)  # before any model is loaded
        lost = drop_rows_after(output_dir / "logs" / "csv" / "metrics.csv", int(ckpt["global_step"]))
        log.info("resuming from %s (step %d)%s", ckpt_path, ckpt["global_step"], f"; dropped {lost} log rows logged after it" if lost else "")
    module = LoRATrainingModule(resolved)
    module.num_train_images = len(records)
    module.model_source = module.resolve_source()  # an unreachable model fails here, in seconds
    check_device(cfg)
    trainer_kwargs = dict(resolved["trainer"])
    for key in SDTUNE_TRAINER_KEYS:  # ours, not lightning.Trainer's
        trainer_kwargs.pop(key, None)
    trainer = L.Trainer(
        **trainer_kwargs,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(output_dir),
    )
    log.info("training a rank-%d %s LoRA on %d images into %s", module.spec.rank, cfg.model.family, len(records), output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("done: %s", {k: round(v, 5) for k, v in metrics.items()})
    return metrics
