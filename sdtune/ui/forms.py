"""The new-run form: its presets and fields, the command line it stands for, and its checks.

A form becomes the arguments of ``python -m sdtune`` (:func:`form_argv`), and is checked by the
command line's own path (:func:`sdtune.run.preflight.compose_training` and
:func:`~sdtune.run.preflight.preflight`), so the message beside a field is the one the CLI prints.
Refusals come first, because a form may come from anyone who can reach the page: no ``_target_``
(or Hydra's other instantiation keys) in an override, no ``hydra.*`` key and no ``@package`` key
(Hydra's own settings run callbacks and choose the config search path), no resolver that builds
config nodes, and a config group's value must be a plain option of that group's folder in ``conf/``
(a path such as ``../../x`` would load any YAML on disk). After composing (Hydra's own section
included), every ``_target_`` must be one the shipped ``conf/`` or Hydra's defaults name.
"""

from __future__ import annotations

import functools
import re
import shlex
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from sdtune.config.overrides import hydra_quote
from sdtune.config.paths import CONF_DIR
from sdtune.run.preflight import compose_training, conf_targets, preflight
from sdtune.run.resume import SAFE_RESOLVERS
from sdtune.utils.errors import DataError, SdtuneError

#: The form's common keys: (key, label, type, help).
FIELDS = (
    ("data.root", "Dataset folder", "str", "a folder of images with captions (metadata.csv or kohya .txt files)"),
    ("lora.rank", "LoRA rank", "int", "the adapter's rank: 4-32 is usual"),
    ("lora.alpha", "LoRA alpha", "float", "scale = alpha / rank"),
    ("optim.optimizer.lr", "Learning rate", "float", "the optimizer's learning rate"),
    ("data.batch_size", "Batch size", "int", "images per step"),
    ("data.resolution", "Resolution", "int", "training size in pixels (divisible by 8)"),
    ("trainer.max_steps", "Steps", "int", "optimizer steps of the run"),
    ("seed", "Seed", "int", "the run's random seed"),
    ("train.gradient_checkpointing", "Gradient checkpointing", "bool", "less memory, ~30% slower"),
    ("trainer.precision", "Precision", "str", "32, bf16-mixed or 16-mixed (CUDA)"),
)
FIELD_KEYS = tuple(f[0] for f in FIELDS)
_INSTANTIATE = re.compile(r"_(target|args|partial|recursive|convert)_")
_DOTTED = re.compile(r"(?<![\w./-])[a-z_]+(?:\.[a-z_0-9]+)+(?![\w.])|(?<![\w./-])seed(?![\w.])")
_OPTION = re.compile(r"[A-Za-z0-9_][\w.-]*")
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")


class FormError(Exception):
    """One problem of a form: the field it belongs to and the message shown beside it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if not p.stem.startswith("_"))


def preset_model(experiment: str | None) -> str:
    """The model an experiment preset picks (its ``override /model``), else the root config's."""
    files = [CONF_DIR / "experiment" / f"{experiment}.yaml"] if experiment else []
    for path in [*files, CONF_DIR / "config.yaml"]:
        for entry in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("defaults", []):
            if isinstance(entry, dict):
                for key, value in entry.items():
                    if key.replace("override ", "").strip().lstrip("/") == "model":
                        return str(value)
    return ""


@functools.lru_cache(maxsize=64)
def defaults(experiment: str | None, model: str | None) -> dict[str, Any]:
    """Each field's value in the config composed from the preset alone."""
    cfg = compose_training(preset_argv(experiment, model))
    return {key: _plain(OmegaConf.select(cfg, key, default=None)) for key in FIELD_KEYS}


def presets(experiment: str | None = None, model: str | None = None) -> dict[str, Any]:
    """``GET /api/presets``: the preset names and the fields with the preset's defaults."""
    values = defaults(experiment, model)
    fields = [{"key": k, "label": label, "type": kind, "default": values[k], "help": text}
              for k, label, kind, text in FIELDS]
    return {"experiments": experiments(), "models": models(), "fields": fields,
            "preset_models": {name: preset_model(name) for name in experiments()}}


def preset_argv(experiment: str | None, model: str | None) -> list[str]:
    argv = [f"experiment={experiment}"] if experiment else []
    if model and model != preset_model(experiment):
        argv.append(f"model={model}")
    return argv


def _plain(value: Any) -> Any:
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _same(value: Any, default: Any) -> bool:
    a, b = _text(value).strip(), _text(default)
    if a == b:
        return True
    try:
        return not isinstance(default, bool) and float(a) == float(b)
    except ValueError:
        return False


@functools.lru_cache(maxsize=1)
def groups() -> frozenset[str]:
    """The config groups: every folder under conf/ (``model``, ``bench/preset``)."""
    return frozenset(p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*") if p.is_dir())


def refuse_group_value(key: str, value: str, field: str) -> None:
    """``group=value``: the value must be an option file of that group's folder (or null)."""
    options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
    if value != "null" and (not _OPTION.fullmatch(value) or value not in options):
        raise FormError(field, f"{key}={value!r} is not an option of sdtune's conf/{key}/ (a group's value is the "
                        f"name of one of its files, not a path). Fix: one of {options}.")


def refuse_unsafe(arg: str, field: str) -> None:
    """The form's own refusals, before anything is composed (see the module docstring)."""
    key, _, value = arg.partition("=")
    key = key.lstrip("+~")
    if "@" in key:
        raise FormError(field, f"{arg!r}: a package override (key@package) is refused: it can move a preset into "
                        "Hydra's own settings. Fix: write group=option or key=value.")
    if arg.startswith("-"):
        raise FormError(field, f"{arg!r}: command-line flags are not taken by the form (only key=value overrides). "
                        "Fix: run flags such as -m or --cfg from a shell.")
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        raise FormError(field, f"{arg!r}: Hydra's own settings (hydra.*) cannot be set from the web app: the run "
                        "folder is chosen by the queue and hydra.* can run code. Fix: remove it.")
    found = _INSTANTIATE.search(arg)
    if found:
        raise FormError(field, f"{arg!r}: {found.group(0)} is refused: it chooses which Python callable runs (or how "
                        "it is called), and only the presets in sdtune's conf/ may do that. Fix: pick a preset "
                        "(e.g. optim=adamw) instead of naming a class.")
    unsafe = sorted(set(_RESOLVER.findall(arg)) - SAFE_RESOLVERS)
    if unsafe:
        raise FormError(field, f"{arg!r}: the resolver {unsafe[0]} can build config nodes, so it is refused here. "
                        "Fix: write the plain value.")
    if "/" in key and key not in groups():
        raise FormError(field, f"{arg!r}: {key} is not a config group of sdtune's conf/. Fix: one of {sorted(groups())}.")
    if key in groups() and "=" in arg:
        refuse_group_value(key, value.strip(), field)
    if key == "ckpt_path":
        raise FormError(field, f"{arg!r}: a new run starts fresh; resume a run with its Resume button (which runs "
                        "python -m sdtune ckpt_path=<run folder>).")


def form_argv(body: dict[str, Any]) -> list[str]:
    """The overrides of ``python -m sdtune`` that the form stands for (refusals raised as FormError):
    the presets, each field that differs from the preset's default, then the override text."""
    experiment, model = body.get("experiment") or None, body.get("model") or None
    for name, known in (("experiment", experiments()), ("model", models())):
        value = body.get(name) or None
        if value is not None and value not in known:
            raise FormError(name, f"{name}={value!r} is not a preset of sdtune's conf/{name}/. Fix: one of {known}.")
    try:
        extra = shlex.split(str(body.get("overrides") or ""))
    except ValueError as err:
        raise FormError("overrides", f"the overrides text cannot be read as a shell line ({err}). Fix: close the "
                        "quotes, one key=value per word.") from None
    for arg in extra:
        refuse_unsafe(arg, "overrides")
        if "=" not in arg:
            raise FormError("overrides", f"{arg!r} is not an override. Fix: write key=value (e.g. lora.rank=8) or "
                            "group=option (e.g. optim=prodigy).")
    argv = preset_argv(experiment, model)
    given = body.get("fields") or {}
    if not isinstance(given, dict):
        raise FormError("overrides", "fields must be an object {key: value}.")
    for key, value in given.items():
        if key not in FIELD_KEYS:
            raise FormError("overrides", f"{key!r} is not a field of the form ({', '.join(FIELD_KEYS)}). Fix: set it "
                            "in the overrides text instead.")
        if value is None or _text(value).strip() == "":
            continue
        arg = f"{key}={hydra_quote(_text(value).strip())}"
        refuse_unsafe(arg, key)
        if not _same(value, defaults(experiment, model)[key]):  # composed once per preset (cached)
            argv.append(arg)
    return argv + extra


def command_text(argv: list[str], module: str = "sdtune") -> str:
    """The shell command that runs ``argv`` (what the page shows, to repeat a run from a shell)."""
    return shlex.join(["python", "-m", module, *argv])


def field_of(message: str, fields: tuple[str, ...] = FIELD_KEYS) -> str:
    """The form key a message is about: the first dotted key it names (sdtune's messages start with the
    setting, ``lora.rank must be >= 1``), when that is a field; a Hydra group error names its group
    (``experiment``, ``model``); anything else belongs to the overrides text."""
    first = _DOTTED.search(message)
    if first and first.group(0) in fields:
        return first.group(0)
    for group in ("experiment", "model"):
        if re.search(rf"'{group}/|^{group}=|options in '{group}'", message):
            return group
    return "overrides"


def unknown_targets(cfg: DictConfig, allowed: frozenset[str]) -> list[str]:
    """``key=target`` for every ``_target_`` of ``cfg`` that the shipped conf/ does not name."""
    found = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "_target_" and str(v) not in allowed:
                    found.append(f"{prefix}_target_={v}")
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def check_form(body: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/check``: ``{ok, command, argv}`` or ``{ok: false, command, errors}``; never raises for
    a bad form. The checks run are the command line's (see the module docstring)."""
    try:
        argv = form_argv(body)
    except FormError as err:
        return {"ok": False, "command": "", "argv": [], "errors": [{"field": err.field, "message": err.message}]}
    result: dict[str, Any] = {"command": command_text(argv), "argv": argv}
    try:
        cfg = compose_training(argv, return_hydra_config=True)
        bad = unknown_targets(cfg, conf_targets() | hydra_targets())
        if bad:
            raise FormError("overrides", f"the composed config names {bad[0]}, a _target_ that no preset of sdtune's "
                            "conf/ names; only the presets' own targets run. Fix: pick presets instead.")
        with open_dict(cfg):
            del cfg["hydra"]  # the run's own config has no hydra section (Hydra keeps it apart)
        preflight(cfg)
        check_device(cfg)
    except FormError as err:
        return {**result, "ok": False, "errors": [{"field": err.field, "message": err.message}]}
    except SdtuneError as err:
        return {**result, "ok": False, "errors": [{"field": _error_field(err), "message": str(err)}]}
    except Exception as err:  # a bug or an unforeseen input: shown, never a crashed server
        return {**result, "ok": False, "errors": [{"field": "overrides", "message": f"{type(err).__name__}: {err}"}]}
    return {**result, "ok": True}


@functools.lru_cache(maxsize=1)
def hydra_targets() -> frozenset[str]:
    """The ``_target_`` values of Hydra's own section as the shipped config composes it (its launcher
    and sweeper): all a hydra section may name."""
    cfg = compose_training([], return_hydra_config=True)
    return frozenset(t.rpartition("=")[2] for t in unknown_targets(cfg.hydra, frozenset()))


def check_device(cfg: DictConfig) -> None:
    """The command line's hardware check (:func:`sdtune.run.checks.check_device`: a GPU trainer or
    16-mixed precision without CUDA, an optimizer or quantization whose package is missing), which
    ``train()`` runs once the model is found; the form runs it after :func:`preflight`."""
    # deferred: the checks import torch (seconds), which the server's start does not need
    from sdtune.run.checks import check_device as cli_check_device

    cli_check_device(cfg)


def _error_field(err: SdtuneError) -> str:
    field = field_of(str(err))
    return "data.root" if isinstance(err, DataError) and field == "overrides" else field
