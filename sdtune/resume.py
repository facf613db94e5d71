"""``python -m sdtune ckpt_path=<run folder or one of its .ckpt>``: continue that run as it was set up.

A run folder keeps the command line that made it (``.hydra/overrides.yaml``). Resuming replays
those overrides, adds the ones given now (which win, key by key: ``trainer.max_steps=600``
extends a run) and continues in the same run folder unless ``hydra.run.dir`` is given. Done on
the raw command line before Hydra composes anything, so the resumed config is composed exactly as
the original was. Which settings differ from the checkpoint's is printed by the trainer
(:func:`changed_settings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

RUN_DIR_KEY = "hydra.run.dir"


def override_key(arg: str) -> str | None:
    """The config key an override sets (``+a.b=1`` -> ``a.b``); None for flags like ``-m``."""
    if arg.startswith("-") or "=" not in arg:
        return None
    return arg.split("=", 1)[0].lstrip("+~")


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra override value: as is when plain, else single-quoted with escapes
    (a run folder like ``lora.rank=8,seed=1`` would otherwise be parsed as a list)."""
    if all(c.isalnum() or c in "/._-:" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_folder_of(value: str) -> Path | None:
    """The sdtune run folder ``ckpt_path`` points into (the folder, or a .ckpt in its checkpoints/)."""
    path = Path(value).expanduser()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / ".hydra" / "overrides.yaml").is_file():
            return candidate.resolve()
    return None


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with a resumed run's own overrides put first (see the module docstring)."""
    given = {override_key(a): a for a in argv if override_key(a)}
    if "-m" in argv or "--multirun" in argv or "ckpt_path" not in given:
        return argv
    run = run_folder_of(given["ckpt_path"].split("=", 1)[1].strip("'\""))
    if run is None:
        return argv
    saved = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")) or []
    replayed = [a for a in saved if isinstance(a, str) and override_key(a) not in given and override_key(a) != "ckpt_path"]
    run_dir = [] if RUN_DIR_KEY in given else [f"{RUN_DIR_KEY}={hydra_quote(str(run))}"]
    return [*replayed, *argv, *run_dir]


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def changed_settings(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting of ``now`` that differs from the checkpoint's ``then``."""
    a, b = _flat(then), _flat(now)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(a.keys() | b.keys())
            if k != "ckpt_path" and a.get(k) != b.get(k)]
