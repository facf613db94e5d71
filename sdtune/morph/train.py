"""``python -m sdtune.morph ... train=true``: one single-image LoRA per input, with sdtune's own trainer.

Each image (already cut to the morph's size) is written with its prompt as a one-image dataset
(``image.png`` + ``metadata.csv``) under the morph's output folder, and trained in this process
with the ``experiment=morph_single`` preset: the same composed config and :func:`sdtune.run.train.train`
that ``python -m sdtune`` runs, so every training check and file (config.yaml, logs, loss.png,
lora.safetensors) is the usual one.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sdtune.config.overrides import normalize_overrides
from sdtune.config.paths import CONF_DIR
from sdtune.run.train import train
from sdtune.utils.errors import ConfigError
from sdtune.utils.io import save_image_atomic, write_text_atomic

log = logging.getLogger(__name__)
PRESET = "experiment=morph_single"
#: how train_overrides is written on a command line: Hydra's grammar takes ``key=value`` inside a
#: list only as a quoted string, and the shell's single quotes keep those double quotes
OVERRIDES_EXAMPLE = """'train_overrides=["trainer.max_steps=100","optim.optimizer.lr=1e-4"]'"""


def training_config(overrides: Sequence[str], *, data_root: Path, run_dir: Path, seed: int,
                    model: Mapping[str, Any] | None = None) -> DictConfig:
    """The config ``python -m sdtune experiment=morph_single OVERRIDES`` composes, pointed at one
    dataset and run folder. ``model`` (the morph's own ``model=``), when given, replaces the composed one.

    Paths are set after composing, not as overrides, so any character in them is safe. Works
    inside a running Hydra app too (``python -m sdtune.morph``): its global state is put back.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[PRESET, *normalize_overrides(list(overrides))])
    except HydraException as err:  # a mistyped override: name the key and the way to write one
        raise ConfigError(f"train_overrides={list(overrides)} do not compose: {str(err).splitlines()[0]}. Fix: "
                          f"give python -m sdtune overrides, each one quoted inside the list, e.g. {OVERRIDES_EXAMPLE}.") from None
    finally:
        restore_gh_from_backup(backup)
    if model:
        cfg.model = OmegaConf.create(dict(model))
    cfg.data.root = str(data_root)
    cfg.paths.output_dir = str(run_dir)
    cfg.seed = int(seed)
    return cfg


def write_one_image_dataset(folder: Path, image: Image.Image, caption: str) -> Path:
    """``folder/image.png`` and ``folder/metadata.csv`` (file_name,text) for ``image``."""
    save_image_atomic(image, folder / "image.png")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("file_name", "text"), ("image.png", caption)])
    write_text_atomic(folder / "metadata.csv", buf.getvalue())
    return folder


def train_single_loras(images: Sequence[Image.Image], prompts: Sequence[str], out_dir: Path, *,
                       overrides: Sequence[str], seed: int, model: Mapping[str, Any] | None,
                       cpu: bool) -> list[Path]:
    """Train one LoRA per image into ``out_dir/train/<a|b>/run``; the lora.safetensors paths.

    On the CPU ``trainer=cpu`` comes first (fp32, no CUDA), so the user's overrides still win.
    """
    loras = []
    for name, image, prompt in zip("ab", images, prompts):
        base = out_dir / "train" / name
        data = write_one_image_dataset(base / "data", image, prompt)
        run = base / "run"
        cfg = training_config([*(["trainer=cpu"] if cpu else []), *overrides], data_root=data, run_dir=run,
                              seed=seed, model=model)
        export = cfg.callbacks.get("lora_export")
        if export is None:
            raise ConfigError(f"train_overrides={list(overrides)} switch off callbacks.lora_export, so training "
                              "would write no LoRA to morph with. Fix: leave callbacks.lora_export on.")
        export.filename = f"lora_{name}.safetensors"  # distinct names: frames' infotext tags them <lora:lora_a:0.7>
        log.info("training the single-image LoRA of image %s (%d steps) into %s", name, cfg.trainer.max_steps, run)
        train(cfg, run)
        lora = run / export.filename
        loras.append(lora)
    return loras
