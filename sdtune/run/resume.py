"""``python -m sdtune ckpt_path=<run folder or one of its .ckpt>``: continue that run as it was set up.

A run folder keeps the command line that made it (``.hydra/overrides.yaml``). Resuming replays
those overrides, adds the ones given now (which win, key by key: ``trainer.max_steps=600``
extends a run) and continues in the same run folder unless ``hydra.run.dir`` is given. Done on
the raw command line before Hydra composes anything, so the resumed config is composed exactly as
the original was. Which settings differ from the checkpoint's is printed by the trainer
(:func:`changed_settings`).

A run folder may come from someone else, so what is read back from it is data, never code and
never a safety switch (:func:`vet_replay`): an override that sets or adds a ``_target_`` (which
Python callable Hydra runs), adds a key outside sdtune's known sections, touches Hydra's own
settings, calls a resolver other than the plain ones, or names pickle weights inside the folder is
refused; ``model.allow_pickle`` and ``data.allow_outside_root`` are dropped (they count only when
given on this command line). What is replayed is printed.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdtune.config.overrides import hydra_quote
from sdtune.config.paths import CONF_DIR
from sdtune.utils.errors import ConfigError

RUN_DIR_KEY = "hydra.run.dir"
OVERRIDES = Path(".hydra") / "overrides.yaml"
#: Safety switches: they count only when given on the command line of the run being started.
SAFETY_SWITCHES = ("model.allow_pickle", "data.allow_outside_root")
#: Where a replayed ``+key``/``++key`` may add a key: sdtune's own sections (whose keys
#: :func:`sdtune.config.schema.check_known_keys` checks against conf/), and the keyword arguments of the optimizer,
#: schedule and Lightning Trainer that conf/ chose. A new callback or logger entry is never added.
ADDABLE = ("model.", "lora.", "data.", "train.", "speed.", "resume.", "eval.", "embedding.",
           "optim.optimizer.", "optim.scheduler.", "optim.lora_plus_ratio", "trainer.")
#: Hydra's instantiation keys: the callable to run and how to call it.
_INSTANTIATE_KEY = re.compile(r"(?<![A-Za-z0-9])_(target|args|partial|recursive|convert)_(?![A-Za-z0-9])")
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
#: Resolvers a replayed value may call: they read, they never build a config node.
SAFE_RESOLVERS = {"now", "hydra", "oc.env", "oc.select", "sdtune_root", "sdtune_cwd", "sdtune_per_family",
                  "sdtune_direction"}
_RUN_FOLDER_REFS = ("${paths.output_dir}", "${hydra:runtime.output_dir}", "${hydra:run.dir}")


def override_key(arg: str) -> str | None:
    """The config key an override sets (``+a.b=1`` -> ``a.b``); None for flags like ``-m``."""
    if arg.startswith("-") or "=" not in arg:
        return None
    return arg.split("=", 1)[0].lstrip("+~")


def run_folder_of(value: str) -> Path | None:
    """The sdtune run folder ``ckpt_path`` points into (the folder, or a .ckpt in its checkpoints/)."""
    path = Path(value).expanduser()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / OVERRIDES).is_file():
            return candidate.resolve()
    return None


def _has_checkpoints(folder: Path) -> bool:
    return any(any(f.glob("*.ckpt")) for f in (folder / "checkpoints", folder) if f.is_dir())


def check_ckpt_path(value: str, settings_given: bool) -> None:
    """Refuse a ``ckpt_path`` that can resume nothing, naming it and what a run folder holds, before
    Hydra composes a config without the run's settings (which would report ``data.root``)."""
    if value in ("", "last", "null", "None") or "${" in value:
        return
    path = Path(value).expanduser()
    holds = ("A run folder (outputs/runs/<time>) holds .hydra/overrides.yaml (the command line that made the run) "
             "and checkpoints/*.ckpt.")
    fix = ("Fix: ckpt_path=<run folder> or one of its checkpoints/*.ckpt files, or ckpt_path=last "
           "hydra.run.dir=<run folder>.")
    if run_folder_of(value) is not None:  # inside a run: the replayed settings let the trainer say what is wrong
        return
    if not path.exists():
        where = "" if path.is_absolute() else f" (looked for {os.path.abspath(path)})"
        raise ConfigError(f"ckpt_path={value!r}: there is no such file or folder{where}. {holds} {fix}")
    if path.is_dir() and not _has_checkpoints(path):
        raise ConfigError(f"ckpt_path={value!r} is not a run folder: it holds no .hydra/overrides.yaml and no "
                          f"checkpoints. {holds} {fix}")
    if settings_given:
        return
    if path.is_dir():
        raise ConfigError(f"ckpt_path={value!r} is not a run folder: it holds checkpoints but not .hydra/overrides.yaml, "
                          f"so the settings the run was made with are unknown. {holds} {fix} With a folder of bare "
                          "checkpoints, also give the run's settings (e.g. experiment=... data.root=...).")
    raise ConfigError(f"ckpt_path={value!r} is a checkpoint outside a run folder, so the settings it was trained with "
                      f"are unknown. {holds} Fix: point ckpt_path at its run folder, or give the run's settings too "
                      "(e.g. experiment=... data.root=...; the run's config.yaml lists them).")


def read_overrides(run: Path) -> list[str]:
    """The run's saved command line: a YAML list of override strings, else our error naming the file."""
    path = run / OVERRIDES
    fix = (f"Fix: restore {path} (a YAML list, one override a line, e.g. `- lora.rank=8`), or resume with the run's "
           f"settings on the command line: python -m sdtune <settings> hydra.run.dir={run} ckpt_path=last "
           "(its config.yaml lists them).")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}. {fix}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path} is not valid YAML{at} ({getattr(err, 'problem', None) or type(err).__name__}); "
                          f"it should hold the command line that made the run. {fix}") from None
    if saved is None:
        return []
    if not isinstance(saved, list):
        raise ConfigError(f"{path} holds a {type(saved).__name__}, not the list of overrides Hydra writes there. {fix}")
    bad = [(i, item) for i, item in enumerate(saved) if not isinstance(item, str)]
    if bad:
        i, item = bad[0]
        shown = repr(item) if len(repr(item)) <= 80 else repr(item)[:80] + "..."
        raise ConfigError(f"{path}: entry {i + 1} is a {type(item).__name__} ({shown}), not an override string like "
                          f"'lora.rank=8'. {fix}")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for item in saved:
        try:
            parser.parse_overrides([item])
        except OverrideParseException:
            raise ConfigError(f"{path}: the entry {item!r} is not a Hydra override (key=value). {fix}") from None
    return saved


@dataclass
class Replay:
    """The vetted command line of a run folder: what is replayed, dropped, refused (with why)."""

    replayed: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


#: Leaf keys whose value is a model that gets loaded (model.path, model.vae_path, controlnet.path,
#: eval.clip_model, eval.dino_model, eval.aesthetic_model), wherever a saved override puts them (a dotted key or a mapping).
MODEL_PATH_LEAVES = ("path", "vae_path", "clip_model", "dino_model", "aesthetic_model")


def _leaves(key: str, value: Any) -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of an override's value (a mapping value is flattened)."""
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)]
    return [(key, value)]


def _interpolated_model_path(key: str, value: Any) -> str | None:
    """The dotted key of a model path in this override whose value is an interpolation (``${...}``):
    what it points at is known only once the config is composed, so it cannot be vetted here."""
    for leaf, leaf_value in _leaves(key, value):
        if leaf.rsplit(".", 1)[-1] in MODEL_PATH_LEAVES and any("${" in s for s in _strings(leaf_value)):
            return leaf
    return None


def _pickle_in_folder(text: str, run: Path) -> bool:
    """Whether ``text``, read as a path, names pickle weights inside the run folder ``run``."""
    # deferred: the sdtune.families package (torch, diffusers: seconds); resume_argv runs before Hydra
    # on every `python -m sdtune`, and only a replayed path needs this
    from sdtune.families.source import PICKLE_SUFFIXES, pickle_weights

    for ref in _RUN_FOLDER_REFS:
        text = text.replace(ref, str(run))
    if "${" in text:  # an interpolation we cannot follow: judge by the suffix
        return text.lower().rstrip("/").endswith(PICKLE_SUFFIXES)
    try:
        path = Path(text).expanduser()
        inside = any(Path(p).is_relative_to(run) for p in (os.path.abspath(path), path.resolve()))
        return inside and (text.lower().endswith(PICKLE_SUFFIXES) or bool(pickle_weights(path)))
    except (OSError, RuntimeError, ValueError):  # not a path at all (~unknown-user, ...)
        return False


def _group(key: str) -> Path | None:
    folder = CONF_DIR / key.replace(".", "/")
    return folder if key and folder.is_dir() else None


def vet_replay(saved: list[str], run: Path, given: set[str]) -> Replay:
    """Sort a run folder's saved overrides (those not given now) into replayed, dropped and refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    out = Replay()
    parser = OverridesParser.create()
    for item in saved:
        override = parser.parse_overrides([item])[0]
        key = override.key_or_group
        if key in given or key == "ckpt_path":
            continue
        group = _group(key)
        resolvers = sorted(set(_RESOLVER.findall(item)) - SAFE_RESOLVERS)
        value = override.value() if override.type != OverrideType.DEL else None
        why = None
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            why = "it changes Hydra's own settings (hydra.callbacks, for one, run code); they are never replayed"
        elif _INSTANTIATE_KEY.search(item):
            why = ("it sets a _target_ (which Python callable runs) or how it is called; _target_ comes only from "
                   "sdtune's own conf/")
        elif resolvers:
            why = f"it calls the resolver {resolvers[0]}, which can build config nodes; only plain values are replayed"
        elif key in SAFETY_SWITCHES or any(leaf in SAFETY_SWITCHES for leaf, _ in _leaves(key, value)):
            out.dropped.append((item, f"{key} is a safety switch: it counts only when given on this command line "
                                      f"(add {key}=true if you trust what it allows)"))
            continue
        elif group is not None and override.type != OverrideType.DEL and isinstance(value, str) \
                and not (group / f"{value}.yaml").is_file():
            why = f"{value!r} is not an option of sdtune's conf/{key.replace('.', '/')}/"
        elif override.type in (OverrideType.ADD, OverrideType.FORCE_ADD) and group is None \
                and not key.startswith(ADDABLE):
            why = (f"it adds {key}, which sdtune's conf/ does not define (an added callback or logger entry is "
                   "code to run)")
        elif _interpolated_model_path(key, value):
            why = (f"it sets the model path {_interpolated_model_path(key, value)} through an interpolation (${{...}}), "
                   "which cannot be checked for pickle weights before it is composed; a model path is replayed only "
                   "as a plain path")
        elif any(_pickle_in_folder(text, run) for text in _strings(value)):
            why = ("it names pickle weights inside the shared run folder (loading them can run code); such a path "
                   "is never taken from a file")
        if why:
            out.refused.append((item, why))
        else:
            out.replayed.append(item)
    return out


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with a resumed run's own overrides put first (see the module docstring); what is
    replayed and what is dropped is printed; an unsafe or unreadable saved command line is refused."""
    given = {override_key(a): a for a in argv if override_key(a)}
    if "-m" in argv or "--multirun" in argv or "ckpt_path" not in given:
        return argv
    value = given["ckpt_path"].split("=", 1)[1].strip("'\"")
    settings = [k for k in given if k != "ckpt_path" and k != "hydra" and not k.startswith(("hydra.", "hydra/"))]
    check_ckpt_path(value, settings_given=bool(settings))
    if value == "last":  # this run folder (hydra.run.dir): never the current folder's
        return argv
    run = run_folder_of(value)
    if run is None:
        return argv
    replay = vet_replay(read_overrides(run), run, set(given))
    source = run / OVERRIDES
    for item, why in replay.dropped:
        print(f"resume: not replaying {item!r} from {source}: {why}.", file=sys.stderr)
    if replay.refused:
        lines = "; ".join(f"{item!r}: {why}" for item, why in replay.refused)
        raise ConfigError(
            f"{source} holds override(s) that resuming does not replay, because a run folder can come from someone "
            f"else and what is read from it must never run code: {lines}. Nothing was run. Fix: if you wrote them "
            "yourself and trust them, give them on the command line together with ckpt_path=..., or remove those "
            f"lines from {source}; otherwise do not resume this folder."
        )
    shown = " ".join(replay.replayed) if replay.replayed else "(no overrides)"
    print(f"resume: replaying the command line of {run} ({OVERRIDES}): {shown}", file=sys.stderr)
    run_dir = [] if RUN_DIR_KEY in given else [f"{RUN_DIR_KEY}={hydra_quote(str(run))}"]
    # The safety switches are decided by this command line alone: off unless given now, whatever a
    # replayed line (a mapping on model= or data=, say) tried to set.
    switches = [f"++{key}=false" for key in SAFETY_SWITCHES if key not in given]
    return [*replay.replayed, *switches, *argv, *run_dir]


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
