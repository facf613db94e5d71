"""Checkpoints that survive crashes, and finding and vetting the one to resume from.

Lightning writes a checkpoint straight to its final name, so a kill mid-write leaves a truncated
``last.ckpt`` in place of the good one. :class:`AtomicCheckpointIO` writes to a temporary name in
the same folder and renames. Resuming loads with ``weights_only=True`` (no pickle code runs), and
a checkpoint from another model family, rank or target set is refused before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sdtune.data.records import dataset_root
from sdtune.families import get_family
from sdtune.lora.checks import check_finite, file_kind, first_line
from sdtune.lora.layers import LoraSpec, is_lora_key, spec_from_config, text_encoder_spec
from sdtune.training.text_encoders import spec_dict
from sdtune.utils.errors import ConfigError, LoraFileError
from sdtune.utils.io import atomic_path

log = logging.getLogger(__name__)


CHECKPOINT_FIX = "Fix: use another checkpoint from the run's checkpoints/ folder (e.g. RUN/checkpoints/last.ckpt)."


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` (no arbitrary pickle code runs).

    Every failure is one :class:`LoraFileError` that says what the file is (empty, an image, a
    truncated archive, a pickle holding code) and what to do. PyTorch's own message for a refused
    pickle advises ``weights_only=False``, i.e. running the file's code; it is never shown.
    """
    path = Path(path)
    if path.is_dir():
        raise LoraFileError(
            f"checkpoint {str(path)!r} is a folder, not a file. Fix: name a .ckpt file in it, e.g. {str(path / 'checkpoints' / 'last.ckpt')!r}."
        )
    if not path.is_file():
        raise LoraFileError(f"checkpoint {str(path)!r} does not exist")
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError as err:
        raise LoraFileError(f"checkpoint {str(path)!r} cannot be read: {err.strerror or err}.") from err
    if not head:
        raise LoraFileError(
            f"{str(path)!r} is not a readable sdtune checkpoint: it is empty (0 bytes), e.g. from an interrupted copy "
            f"or a full disk. {CHECKPOINT_FIX}"
        )
    what = file_kind(head)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save: zip, or legacy pickle
        looks = f"it is {what}" if what else f"it starts with the bytes {head[:16]!r}"
        raise LoraFileError(
            f"{str(path)!r} is not a readable sdtune checkpoint: it is not a PyTorch/Lightning checkpoint at all ({looks}). "
            "Fix: pass a .ckpt written by `python -m sdtune` (RUN/checkpoints/*.ckpt), or a LoRA .safetensors file."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported" not in str(err):  # a damaged pickle stream, not a refused object
            raise LoraFileError(f"{str(path)!r} is not a readable sdtune checkpoint: it is truncated or damaged. {CHECKPOINT_FIX}") from err
        # weights_only refused an object: the file carries Python objects whose unpickling runs code
        raise LoraFileError(
            f"{str(path)!r} is not a readable sdtune checkpoint: it holds Python objects other than tensors and plain "
            "values, and loading those could run arbitrary code, so sdtune refuses it (sdtune's own checkpoints never "
            f"hold any). {CHECKPOINT_FIX}"
        ) from err
    except Exception as err:
        reason = "" if "weights_only" in str(err) else f" ({first_line(err)})"
        raise LoraFileError(
            f"{str(path)!r} is not a readable sdtune checkpoint: it is truncated or damaged{reason}. {CHECKPOINT_FIX}"
        ) from err
    if not isinstance(ckpt, dict) or "sdtune" not in ckpt or "hyper_parameters" not in ckpt:
        raise LoraFileError(f"{str(path)!r} is not an sdtune training checkpoint (no 'sdtune' section).")
    return ckpt



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


def data_manifest(records: Sequence[Any], root: str | os.PathLike) -> dict[str, str]:
    """``{image path relative to data.root: "<file size>:<caption digest>"}`` for every record.

    Stored in each checkpoint, so a resume can say which images were added, removed, replaced
    or re-captioned since (sizes and names only: no image is read).
    """
    base = dataset_root(root)  # the same normalised root the records were built on
    manifest = {}
    for record in records:
        captions = getattr(record, "captions", None) or (record.text,)
        digest = hashlib.sha1(json.dumps(list(captions), ensure_ascii=False).encode()).hexdigest()[:12]
        manifest[os.path.relpath(os.path.abspath(record.path), base)] = f"{Path(record.path).stat().st_size}:{digest}"
    return manifest


def describe_data_change(then: Mapping[str, str], now: Mapping[str, str]) -> str | None:
    """A one-line account of how the dataset differs from the checkpoint's, or None if it does not."""
    added = sorted(now.keys() - then.keys())
    removed = sorted(then.keys() - now.keys())
    same = now.keys() & then.keys()
    recaptioned = sorted(k for k in same if now[k].split(":")[1] != then[k].split(":")[1])
    replaced = sorted(k for k in same if now[k].split(":")[0] != then[k].split(":")[0])
    parts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
             for what, names in (("added", added), ("removed", removed), ("with a new caption", recaptioned),
                                 ("with a different image file", replaced)) if names]
    if not parts:
        return None
    return f"{len(then)} images then, {len(now)} now: " + "; ".join(parts)


def keep_lora_only(checkpoint: dict[str, Any], spec: LoraSpec, **facts: Any) -> None:
    """Shrink a Lightning checkpoint to the LoRA tensors (the frozen base is loaded from
    ``model.path``, never saved) and record what a resume and an export check it against."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_lora_key(k)}
    checkpoint["sdtune"] = {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets), "adapter": spec.kind,
                            **facts}


def check_resumable(path: Path, cfg: Mapping[str, Any], manifest: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load ``path`` safely and refuse it if it was trained on another family, rank or target set,
    holds non-finite values, or (unless ``resume.allow_data_change``) saw other data."""
    ckpt = load_checkpoint(path)  # weights_only=True, clear error if truncated or foreign
    saved = ckpt["sdtune"]
    family = get_family(cfg["model"]["family"])
    spec = spec_from_config(cfg["lora"], family.default_lora_targets)
    now = {"family": family.name, "rank": spec.rank, "alpha": spec.alpha, "targets": sorted(spec.targets), "adapter": spec.kind,
           "text_encoder": spec_dict(text_encoder_spec(cfg, family))}
    then = {"family": saved["family"], "rank": saved["rank"], "alpha": float(saved["alpha"]), "targets": sorted(saved["targets"]),
            "adapter": saved.get("adapter", "lora"), "text_encoder": saved.get("text_encoder")}
    diffs = [f"{k}: checkpoint {then[k]!r}, config {now[k]!r}" for k in now if now[k] != then[k]]
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: it was trained with a different setup ({'; '.join(diffs)}). "
            "Fix: resume with the settings of that run (its config.yaml is in the run folder), or start a new run."
        )
    check_finite(_resume_tensors(ckpt), f"{path}")
    if manifest is not None and saved.get("data") is not None:
        change = describe_data_change(saved["data"], manifest)
        allowed = bool((cfg.get("resume") or {}).get("allow_data_change"))
        if change and not allowed:
            raise ConfigError(
                f"cannot resume from {path}: the dataset changed since it was written ({change}). The data order and "
                "sample seeds of the rest of the run would differ from what the checkpoint expects. Fix: restore "
                "the dataset, or accept the change with resume.allow_data_change=true."
            )
        if change:
            log.warning("resuming on a changed dataset (resume.allow_data_change=true): %s", change)
    return ckpt


def _resume_tensors(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The LoRA weights (the denoiser's, under any family's attribute, and the text encoders'), every
    optimizer-state tensor (a NaN moment poisons the next step too) and the EMA's."""
    tensors = {k: v for k, v in ckpt.get("state_dict", {}).items() if is_lora_key(k)}
    for i, opt in enumerate(ckpt.get("optimizer_states", [])):
        for pid, state in (opt.get("state") or {}).items():
            for name, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    tensors[f"optimizer[{i}].state[{pid}].{name}"] = value
    ema = (ckpt.get("sdtune") or {}).get("ema") or {}  # train.ema: the moving average goes on from these
    tensors.update({f"ema.{n}": t for n, t in zip(ema.get("names", ()), ema.get("shadow_params", ()))})
    return tensors
