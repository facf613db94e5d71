"""Checkpoints that survive crashes, and finding and vetting the one to resume from.

Lightning writes a checkpoint straight to its final name, so a kill mid-write leaves a truncated
``last.ckpt`` in place of the good one. :class:`AtomicCheckpointIO` writes to a temporary name in
the same folder and renames. Resuming loads with ``weights_only=True`` (no pickle code runs), and
a checkpoint from another model family, rank or target set is refused before any model loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import ConfigError
from .export import load_checkpoint
from .families import get_family
from .io import atomic_path
from .lora import spec_from_config


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)


def resolve_ckpt_path(value: str | None, output_dir: str | Path) -> Path | None:
    """``ckpt_path``: null, ``last`` (this run folder's last.ckpt), a run folder, or a file."""
    if not value:
        return None
    if value == "last":
        newest = newest_checkpoint(Path(output_dir) / "checkpoints")
        if newest is None:
            raise ConfigError(
                f"ckpt_path=last: there is no checkpoint in {output_dir}/checkpoints. Fix: resume in the "
                "interrupted run's folder (hydra.run.dir=<that run folder> ckpt_path=last), or pass "
                "ckpt_path=<run folder or .ckpt file>."
            )
        return newest
    path = Path(value).expanduser()
    if path.is_dir():
        newest = newest_checkpoint(path / "checkpoints") or newest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"ckpt_path={value!r} is a folder without checkpoints; name a .ckpt file.")
        return newest
    if not path.is_file():
        raise ConfigError(f"ckpt_path={value!r} does not exist.")
    return path


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written checkpoint. Every ``.ckpt`` is complete (writes are atomic), so
    a run killed between a periodic save and ``last.ckpt`` resumes from the periodic one."""
    found = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")] if folder.is_dir() else []
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), default=None)


def check_resumable(path: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Load ``path`` safely and refuse it if it was trained on another family, rank or target set."""
    ckpt = load_checkpoint(path)  # weights_only=True, clear error if truncated or foreign
    saved = ckpt["sdtune"]
    family = get_family(cfg["model"]["family"])
    spec = spec_from_config(cfg["lora"], family.default_lora_targets)
    now = {"family": family.name, "rank": spec.rank, "alpha": spec.alpha, "targets": sorted(spec.targets)}
    then = {"family": saved["family"], "rank": saved["rank"], "alpha": float(saved["alpha"]), "targets": sorted(saved["targets"])}
    diffs = [f"{k}: checkpoint {then[k]!r}, config {now[k]!r}" for k in now if now[k] != then[k]]
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: it was trained with a different setup ({'; '.join(diffs)}). "
            "Fix: resume with the settings of that run (its config.yaml is in the run folder), or start a new run."
        )
    return ckpt
