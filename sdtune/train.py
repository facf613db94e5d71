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

from .config import validate
from .data import ImageCaptionDataModule, load_records
from .io import write_text_atomic
from .module import LoRATrainingModule

log = logging.getLogger(__name__)
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
    records = load_records(cfg.data.root)  # every data problem surfaces before a model is loaded
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(int(cfg.seed), workers=True)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # plain types for checkpoints
    write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(resolved))

    datamodule = ImageCaptionDataModule.from_config(records, resolved["data"], seed=int(cfg.seed))
    module = LoRATrainingModule(resolved)
    module.num_train_images = len(records)
    module.model_source = module.resolve_source()  # an unreachable model fails here, in seconds
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
        default_root_dir=str(output_dir),
    )
    log.info("training a rank-%d %s LoRA on %d images into %s", module.spec.rank, cfg.model.family, len(records), output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("done: %s", {k: round(v, 5) for k, v in metrics.items()})
    return metrics
