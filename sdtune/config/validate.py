"""Config helpers: OmegaConf resolvers and early validation of leaf settings.

``validate`` runs before any data or model is touched, so a typo costs a second, not a model
download. Each message names the key, the value it got and what would be accepted.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdtune.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true")
PREDICTION_TYPES = (None, "epsilon", "v_prediction")
# pissa/olora also rewrite the base weights, which a plain LoRA file cannot carry: not offered.
LORA_INITS = ("gaussian", True, False)
MAX_RANK = 1024
# What diffusers.optimization.get_scheduler takes besides the optimizer and the step count.
# eta_min is ours (sdtune.training.optimization): a floor for the cosine schedules.
SCHEDULER_KEYS = {"name", "warmup_steps", "num_cycles", "power", "step_rules", "eta_min"}
# Optimizers from optional packages: the command that installs each (an extra of pyproject.toml).
# (bitsandbytes is not checked here: the GPU presets name it and are validated on CPU machines too.)
OPTIONAL_OPTIMIZERS = {"prodigyopt": "pip install prodigyopt==1.1.2"}


def register_resolvers() -> None:
    """``${sdtune_root:}``: the repository root, so configs can find bundled data and caches;
    ``${sdtune_cwd:}``: the folder the command was started in, where outputs go (as with any CLI)."""
    if not OmegaConf.has_resolver("sdtune_root"):
        OmegaConf.register_new_resolver("sdtune_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("sdtune_cwd"):
        OmegaConf.register_new_resolver("sdtune_cwd", lambda: os.getcwd(), use_cache=True)
    if not OmegaConf.has_resolver("sdtune_per_family"):
        OmegaConf.register_new_resolver("sdtune_per_family", per_family)
    if not OmegaConf.has_resolver("sdtune_direction"):  # hparams_search: maximize similarities, minimize the rest
        from sdtune.evaluation.config import sweep_direction

        OmegaConf.register_new_resolver("sdtune_direction", sweep_direction)


def per_family(family: str, table: Any) -> Any:
    """``${sdtune_per_family:${model.family},{sd15: 4, sdxl: 1}}``: the value given for ``family``."""
    if family not in table:
        raise ConfigError(f"this preset has no setting for model family {family!r} (it covers {sorted(table)}).")
    return table[family]


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _int(cfg: DictConfig, key: str, *, minimum: int, hint: str = "") -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}.{hint}")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}.{hint}")
    return value


def _number(cfg: DictConfig, key: str, *, minimum: float, exclusive: bool = False, optional: bool = False) -> float | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}.")
    if value < minimum or (exclusive and value == minimum):
        op = ">" if exclusive else ">="
        raise ConfigError(f"{key} must be {op} {minimum}, got {value}.")
    return float(value)


def _gpu_requested(cfg: DictConfig) -> bool:
    accelerator = str(_get(cfg, "trainer.accelerator") or "auto")
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def _preset_sets(cfg: DictConfig, *, precision: bool = True) -> str:
    """``hardware=8gb (a GPU memory preset) sets trainer.precision=16-mixed and optim=adamw8bit ...: ``
    when a GPU memory preset chose the settings a message is about, else ``""``."""
    preset = _get(cfg, "hardware_preset")
    if not preset:
        return ""
    optimizer = str(_get(cfg, "optim.optimizer._target_") or "")
    what = [f"trainer.precision={_get(cfg, 'trainer.precision')}"] if precision else []
    if optimizer.startswith("bitsandbytes."):
        what.append("optim=adamw8bit (8-bit AdamW from bitsandbytes, CUDA only)")
    return f"hardware={preset.get('name')} (a GPU memory preset) sets {' and '.join(what)}: "


def check_device(cfg: DictConfig) -> None:
    """Settings that need hardware or an optional package; checked once the model is known to
    exist, before it loads."""
    import torch

    accelerator = str(_get(cfg, "trainer.accelerator") or "auto")
    preset = _preset_sets(cfg)
    cpu_fix = (f" Fix: drop hardware={_get(cfg, 'hardware_preset.name')} on a machine without a GPU (the presets are "
               "for GPUs), or add trainer=cpu trainer.precision=32 optim=adamw." if preset else "")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{preset}trainer.accelerator={accelerator} (trainer=gpu, which the GPU presets such as experiment=kolors_lora "
            "use) but this machine has no CUDA GPU."
            + (cpu_fix or " Fix: run it on a GPU machine, or add trainer=cpu trainer.precision=32 to train on the CPU "
               "(very slow at full size).")
        )
    if str(_get(cfg, "trainer.precision")) == "16-mixed" and not _gpu_requested(cfg):
        raise ConfigError(
            f"{preset}trainer.precision=16-mixed needs a CUDA GPU and none is in use."
            + (cpu_fix or " Fix: trainer.precision=32 (or bf16-mixed) on the CPU, e.g. with trainer=cpu.")
        )
    check_optimizer_importable(cfg)


#: pip commands of the optimizers' packages beyond the base install (prodigyopt is an extra of pyproject.toml).
OPTIMIZER_PACKAGES = {**OPTIONAL_OPTIMIZERS, "bitsandbytes": "pip install bitsandbytes"}


def check_optimizer_importable(cfg: DictConfig) -> None:
    """``optim.optimizer._target_`` imports: a missing package (bitsandbytes for optim=adamw8bit and
    hardware=8gb/12gb) is named with its pip command here, not by Hydra after the model loaded."""
    import importlib

    target = str(_get(cfg, "optim.optimizer._target_") or "")
    module, _, name = target.rpartition(".")
    if not module:
        raise ConfigError(f"optim.optimizer._target_={target!r} is not an importable class path such as "
                          "torch.optim.AdamW. Fix: pick an optimizer preset (optim=adamw|adamw8bit|prodigy|adafactor).")
    package = module.split(".")[0]
    preset = _preset_sets(cfg, precision=False) if package == "bitsandbytes" else ""
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        install = OPTIMIZER_PACKAGES.get(package, f"install the package that provides {module}")
        raise ConfigError(
            f"{preset}optim.optimizer._target_={target} needs the package {package}, which is not installed or does "
            f"not import ({first_line(err)}). Fix: {install}, or pick another optimizer (e.g. optim=adamw)."
        ) from None
    if not hasattr(found, name):
        raise ConfigError(f"optim.optimizer._target_={target}: {module} has no {name}. Fix: check the spelling, "
                          "or pick an optimizer preset (optim=adamw|adamw8bit|prodigy|adafactor).")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid training setting."""
    from sdtune.training.embeddings import check_config as _check_embedding

    complete_optional_mappings(cfg)
    for check in (_check_known_keys, _check_model, _check_lora, _check_data, _check_trainer, _check_train,
                  _check_data_methods, _check_eval):
        check(cfg)
    _check_embedding(cfg)


#: Sections whose settings sdtune reads itself, so a key it does not know is a typo, not a setting
#: (trainer.*, optim.optimizer.*, callbacks and loggers go to the classes they build and stay open).
#: Each maps to where its keys are defined: a config group folder, or the root config.
CLOSED_SECTIONS = {"model": "model", "lora": "lora", "data": "data", "train": None, "speed": None, "resume": None,
                   "eval": None, "embedding": "embedding"}


@functools.cache
def schema_keys(section: str) -> frozenset[str]:
    """Every key ``section`` has in sdtune's own config files (all of its group's options)."""
    group = CLOSED_SECTIONS[section]
    files = sorted((CONF_DIR / group).glob("*.yaml")) if group else [CONF_DIR / "config.yaml"]
    keys: set[str] = set()
    for path in files:
        data = _yaml_file(path)
        data = data if group else data.get(section) or {}
        keys.update(k for k in data if k != "defaults")
    return frozenset(keys)


@functools.cache
def _yaml_file(path: Path) -> dict:
    """A config file as plain data, parsed once per process (libyaml when present: ~10x faster,
    and every run validates against some 20 files before its first step)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}


#: What lora.text_encoder takes (sdtune.training.text_encoders).
TEXT_ENCODER_KEYS = ("rank", "alpha", "targets", "lr")
#: Mappings that default to null (off) but whose keys are documented one by one: each key is a plain
#: dotted override (``lora.text_encoder.rank=4``, ``embedding.tokens=[olq]``), and setting one turns
#: the mapping on (:func:`normalize_overrides`). The embedding group's full mapping is conf/embedding/ti.yaml.
OPTIONAL_MAPPINGS = ("lora.text_encoder", "embedding")


def nested_keys(path: str) -> frozenset[str] | None:
    """The keys of the nested mapping ``path`` (``train.ema``, ``lora.text_encoder``) that sdtune
    reads itself; None where ``path`` is not one of them (its keys are then not checked)."""
    if path == "lora.text_encoder":
        return frozenset(TEXT_ENCODER_KEYS)
    if path == "train.ema":
        return frozenset(_yaml_file(CONF_DIR / "config.yaml")["train"]["ema"])
    return None


def unknown_key_error(parent: str, key: str, known) -> ConfigError:
    """Our "did you mean" message for ``parent.key``, which is not a setting."""
    import difflib

    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    hint = f"Did you mean {parent}.{close[0]}? " if close else f"Known keys: {', '.join(sorted(known))}. "
    return ConfigError(
        f"{parent}.{key} is not a setting of sdtune and would be ignored. {hint}"
        f"Fix: {parent}.{close[0] if close else '<key>'}=<value> (without +), or remove {parent}.{key}."
    )


def check_override_key(key: str) -> None:
    """Refuse a dotted override ``key`` that names no setting of sdtune's own sections (before Hydra
    composes anything, so its "Key ... is not in struct" never reaches the user)."""
    parts = key.split(".")
    if parts[0] not in CLOSED_SECTIONS or len(parts) < 2:
        return
    if parts[1] not in schema_keys(parts[0]):
        raise unknown_key_error(parts[0], parts[1], schema_keys(parts[0]))
    for depth in range(2, len(parts)):
        parent = ".".join(parts[:depth])
        known = nested_keys(parent)
        if known is not None and parts[depth] not in known:
            raise unknown_key_error(parent, parts[depth], known)


def normalize_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides as Hydra should get them.

    * A key under one of :data:`OPTIONAL_MAPPINGS` (null by default) is passed as ``++key=value``,
      which creates the mapping: ``lora.text_encoder.rank=4`` turns text-encoder LoRA on, and
      ``embedding.tokens=[olq]`` without ``embedding=`` trains embeddings as ``embedding=ti`` does
      (:func:`complete_optional_mappings` fills in the other keys).
    * A key sdtune does not know in its own sections gets our "did you mean" :class:`ConfigError`.
    Group choices (``embedding=ti``), deletions (``~key``) and Hydra's own keys pass unchanged.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+")
        if arg.startswith(("-", "~")) or not sep or "." not in bare or "/" in bare or "@" in bare:
            out.append(arg)
            continue
        if key == bare:  # +key / ++key add keys: validate() names an unknown one
            check_override_key(bare)
            if any(bare.startswith(m + ".") for m in OPTIONAL_MAPPINGS):
                arg = f"++{bare}={value}"
        out.append(arg)
    return out


def complete_optional_mappings(cfg: DictConfig) -> None:
    """Fill in the keys a mapping of :data:`OPTIONAL_MAPPINGS` that was switched on by one of its keys
    left out: ``embedding`` takes conf/embedding/ti.yaml's values (textual inversion unless
    ``embedding.with_lora=true``); ``lora.text_encoder``'s alpha, targets and lr default to null."""
    from omegaconf import open_dict

    te = _get(cfg, "lora.text_encoder")
    if isinstance(te, DictConfig):
        with open_dict(te):
            for key in TEXT_ENCODER_KEYS:
                if key != "rank" and key not in te:
                    te[key] = None
    emb = cfg.get("embedding")
    if isinstance(emb, DictConfig):
        defaults = _yaml_file(CONF_DIR / "embedding" / "ti.yaml")
        with open_dict(emb):
            for key, value in defaults.items():
                if key not in emb:
                    emb[key] = value


def _check_known_keys(cfg: DictConfig) -> None:
    """A key sdtune does not know under one of its own sections (``+lora.rnak=8``, a typo in a
    config file) would be silently ignored; refuse it, with the closest known key."""
    for section in CLOSED_SECTIONS:
        node = cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        known = schema_keys(section)
        for key in node:
            if key not in known:
                raise unknown_key_error(section, key, known)
    for parent in ("lora.text_encoder", "train.ema"):
        node, known = _get(cfg, parent), nested_keys(parent)
        for key in node if isinstance(node, DictConfig) else ():
            if key not in known:
                raise unknown_key_error(parent, key, known)


def _check_model(cfg: DictConfig) -> None:
    from sdtune.families import FAMILIES

    family = _get(cfg, "model.family")
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is not one of {sorted(FAMILIES)}.")
    preset = _get(cfg, "hardware_preset")
    if preset and family not in preset.get("families", []):
        raise ConfigError(
            f"hardware={preset.name} does not fit a {family} LoRA (it covers {list(preset.families)}; Kolors' text "
            "encoder alone needs about 12.5 GB). Fix: hardware=16gb or more, or another model."
        )
    if not isinstance(_get(cfg, "model.allow_pickle") or False, bool):
        raise ConfigError(f"model.allow_pickle must be true or false, got {_get(cfg, 'model.allow_pickle')!r}.")
    if not _get(cfg, "model.path"):
        raise ConfigError("model.path is not set. Fix: model.path=<diffusers folder or hub id>.")

    _number(cfg, "model.guidance", minimum=0, exclusive=True, optional=True)


def _check_lora(cfg: DictConfig) -> None:
    rank = _int(cfg, "lora.rank", minimum=1, hint=" Fix: e.g. lora.rank=16.")
    if rank > MAX_RANK:
        raise ConfigError(
            f"lora.rank={rank} is larger than any layer it could adapt (the widest SD1.5/SDXL/Kolors attention "
            f"layer has 1280 features; ranks above {MAX_RANK} only waste memory). Fix: e.g. lora.rank=16 (4-128 is usual)."
        )
    _number(cfg, "lora.alpha", minimum=0, exclusive=True, optional=True)
    dropout = _number(cfg, "lora.dropout", minimum=0)
    if dropout is not None and dropout >= 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout}.")
    if _get(cfg, "lora.init") not in LORA_INITS:
        raise ConfigError(f"lora.init must be one of {list(LORA_INITS)}, got {_get(cfg, 'lora.init')!r}.")
    targets = _get(cfg, "lora.targets")
    if targets is not None and (
        not OmegaConf.is_list(targets) or not targets or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(f"lora.targets must be a non-empty list of module names like [to_q,to_k], got {targets!r}.")
    from sdtune.lora.adapters import check_config  # DoRA / LoHa / LoKr combinations

    check_config(OmegaConf.to_container(cfg.lora, resolve=True), _get(cfg, "callbacks.lora_export.format"))
    _check_text_encoder_lora(cfg)


def _check_text_encoder_lora(cfg: DictConfig) -> None:
    te = _get(cfg, "lora.text_encoder")
    if te is None:
        return
    example = " Fix: e.g. lora.text_encoder.rank=4 (and .alpha, .targets, .lr), or lora.text_encoder=null (off)."
    if not isinstance(te, DictConfig):
        raise ConfigError(f"lora.text_encoder must be a mapping with rank (and alpha, targets, lr) or null, got {te!r}.{example}")
    unknown = sorted(set(te.keys()) - set(TEXT_ENCODER_KEYS))
    if unknown:
        raise ConfigError(f"lora.text_encoder.{unknown[0]} is not a setting (it takes {', '.join(TEXT_ENCODER_KEYS)}).{example}")
    kind = str(_get(cfg, "lora.type") or "lora")
    if kind != "lora":
        raise ConfigError(
            f"lora.text_encoder trains plain LoRA layers in the text encoders and is not combined with lora.type={kind} "
            f"on the UNet. Fix: lora.type=lora, or lora.text_encoder=null (no text-encoder LoRA)."
        )
    if _get(cfg, "lora.use_dora"):
        raise ConfigError(
            "lora.text_encoder trains plain LoRA layers in the text encoders and is not combined with "
            "lora.use_dora=true (DoRA) on the UNet. Fix: lora.use_dora=false, or lora.text_encoder=null "
            "(no text-encoder LoRA)."
        )
    if "rank" not in te:
        raise ConfigError(f"lora.text_encoder has no rank.{example}")
    rank = _int(cfg, "lora.text_encoder.rank", minimum=1, hint=example)
    if rank > MAX_RANK:
        raise ConfigError(f"lora.text_encoder.rank={rank} is larger than any text-encoder layer needs (max {MAX_RANK}).{example}")
    _number(cfg, "lora.text_encoder.alpha", minimum=0, exclusive=True, optional=True)
    _number(cfg, "lora.text_encoder.lr", minimum=0, exclusive=True, optional=True)
    targets = te.get("targets")
    if targets is not None and (not OmegaConf.is_list(targets) or not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"lora.text_encoder.targets must be null (the family's default) or a non-empty list of module "
                          f"names like [q_proj,v_proj], got {targets!r}.")


def _check_data(cfg: DictConfig) -> None:
    if _get(cfg, "data.root") in (None, ""):
        raise ConfigError(
            "data.root is not set. Fix: data.root=<folder with images and metadata.csv>, "
            "or try experiment=quickstart."
        )
    res = _int(cfg, "data.resolution", minimum=8)
    if res % 8:
        lower, upper = res - res % 8, res - res % 8 + 8
        raise ConfigError(
            f"data.resolution={res} is not divisible by 8 (the VAE downsamples by 8). Fix: use {lower} or {upper}."
        )
    if _get(cfg, "data.bad_images") not in ("error", "skip"):
        raise ConfigError(f"data.bad_images must be error or skip, got {_get(cfg, 'data.bad_images')!r}.")
    if not isinstance(_get(cfg, "data.allow_outside_root") or False, bool):
        raise ConfigError(f"data.allow_outside_root must be true or false, got {_get(cfg, 'data.allow_outside_root')!r}.")
    _int(cfg, "data.batch_size", minimum=1)
    if _get(cfg, "data.num_workers") != "auto":
        _int(cfg, "data.num_workers", minimum=0, hint=" Fix: e.g. data.num_workers=4, or auto (4 at most on a GPU, 0 on the CPU).")
    if _get(cfg, "data.pin_memory") not in ("auto", True, False):
        raise ConfigError(f"data.pin_memory must be true, false or auto (true on a CUDA GPU), got {_get(cfg, 'data.pin_memory')!r}.")
    dropout = _number(cfg, "data.caption_dropout", minimum=0)
    if dropout >= 1:
        raise ConfigError(f"data.caption_dropout must be in [0, 1), got {dropout}.")
    _int(cfg, "data.keep_tags", minimum=0)
    step = _int(cfg, "data.bucket_step", minimum=8)
    if step % 8:
        raise ConfigError(f"data.bucket_step={step} must be a multiple of 8 (the VAE downsamples by 8).")
    repeats = _get(cfg, "data.repeats") or {}
    for folder, n in dict(repeats).items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"data.repeats.{folder} must be an integer >= 1, got {n!r}.")
    from sdtune.data.cache_memory import check_config as check_cache_memory

    check_cache_memory({"cache_memory": _get(cfg, "data.cache_memory") or "auto",
                        "cache_budget_gb": _get(cfg, "data.cache_budget_gb")})
    if _get(cfg, "data.cache_latents"):
        from sdtune.data.latents import check_cacheable

        check_cacheable(bool(_get(cfg, "data.center_crop")))


def _check_trainer(cfg: DictConfig) -> None:
    precision = str(_get(cfg, "trainer.precision"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported; use one of {list(PRECISIONS)}.")

    _int(cfg, "trainer.accumulate_grad_batches", minimum=1)
    _int(cfg, "trainer.nonfinite_check_every", minimum=1,
         hint=" Fix: e.g. trainer.nonfinite_check_every=10 (steps between reads of the NaN/Inf record).")
    _check_run_length(cfg)
    seed = _get(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer from 0 to 2**32-1 (4294967295), got {seed!r}. Fix: e.g. seed=42.")
    _check_scheduler(cfg)


def _check_train(cfg: DictConfig) -> None:
    if _get(cfg, "train.prediction_type") not in PREDICTION_TYPES:
        raise ConfigError(
            f"train.prediction_type must be epsilon, v_prediction or null (use the model's), "
            f"got {_get(cfg, 'train.prediction_type')!r}."
        )
    _number(cfg, "train.snr_gamma", minimum=0, exclusive=True, optional=True)
    _number(cfg, "train.noise_offset", minimum=0)
    _check_ema(cfg)
    if _get(cfg, "lora.text_encoder") is not None and _get(cfg, "lora.text_encoder.lr") is not None:
        # optim.optimizer.lr=0 then freezes the UNet LoRA: only the text encoders learn
        _number(cfg, "optim.optimizer.lr", minimum=0)
    else:
        _number(cfg, "optim.optimizer.lr", minimum=0, exclusive=True)
    if _get(cfg, "callbacks.model_checkpoint.keep_last") is not None:
        _int(cfg, "callbacks.model_checkpoint.keep_last", minimum=1, hint=" Fix: e.g. keep_last=3, or null to keep all.")
    metric = _get(cfg, "optimized_metric")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ConfigError(f"optimized_metric must be a logged metric name such as val/loss, or null; got {metric!r}.")
    if metric == "val/loss" and not _get(cfg, "data.val_images"):
        raise ConfigError(
            "optimized_metric=val/loss, but data.val_images=0 logs no validation loss. Fix: data.val_images=4 "
            "(a fixed validation loss on 4 training images), or optimize another metric."
        )


def _check_eval(cfg: DictConfig) -> None:
    """``eval:`` (:mod:`sdtune.evaluation.config`): reference images exist and open, and an
    ``optimized_metric=eval/...`` is one this evaluation logs."""
    from sdtune.evaluation.config import check_optimized_metric, parse_eval

    node = _get(cfg, "eval")
    spec = parse_eval(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)
    if spec and (spec.clip_model or spec.dino_model):  # the loading gate, before any model loads
        from sdtune.families.source import check_weights

        check_weights(spec.clip_model, key="eval.clip_model", allow_pickle=_get(cfg, "model.allow_pickle") is True)
        check_weights(spec.dino_model, key="eval.dino_model", allow_pickle=_get(cfg, "model.allow_pickle") is True)
    metric = _get(cfg, "optimized_metric")
    if isinstance(metric, str):
        check_optimized_metric(metric, spec)


def _check_data_methods(cfg: DictConfig) -> None:
    """train.masked_loss and DreamBooth prior preservation (data.class_root / data.class_prompt)."""
    if not isinstance(_get(cfg, "train.masked_loss") or False, bool):
        raise ConfigError(f"train.masked_loss must be true or false, got {_get(cfg, 'train.masked_loss')!r}.")
    _number(cfg, "train.prior_loss_weight", minimum=0)
    class_root, prompt = _get(cfg, "data.class_root"), _get(cfg, "data.class_prompt")
    if class_root and prompt:
        raise ConfigError(
            f"data.class_root={class_root!r} and data.class_prompt={prompt!r} are both set. Fix: give the class "
            "images (data.class_root) or a prompt to render them from (data.class_prompt), not both."
        )
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ConfigError(f"data.class_prompt must be a non-empty prompt such as 'a photo of a dog', got {prompt!r}.")
    if prompt:
        _int(cfg, "data.num_class_images", minimum=1, hint=" Fix: e.g. data.num_class_images=100.")
        _int(cfg, "data.class_sample_steps", minimum=1, hint=" Fix: e.g. data.class_sample_steps=30.")
    if (class_root or prompt) and _get(cfg, "data.cache_latents") and _get(cfg, "data.bucketing"):
        raise ConfigError(
            "prior preservation with data.cache_latents=true and data.bucketing=true is not supported: class "
            "images are cropped to each instance batch's bucket, which one cached crop cannot serve. Fix: turn "
            "one of data.cache_latents or data.bucketing off."
        )


def _check_run_length(cfg: DictConfig) -> None:
    """``trainer.max_steps`` / ``max_epochs``: each a positive integer or -1 (no limit), not both -1."""
    limits = {}
    for key in ("trainer.max_steps", "trainer.max_epochs"):
        value = _get(cfg, key)
        if value is None:
            value = -1
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(
                f"{key} must be a positive integer, or -1 for no limit, got {value!r}. "
                "Fix: e.g. trainer.max_steps=1000 (or trainer.max_steps=-1 trainer.max_epochs=10)."
            )
        limits[key] = value
    if all(v == -1 for v in limits.values()):
        raise ConfigError(
            "trainer.max_steps=-1 and trainer.max_epochs=-1: the run would never end. "
            "Fix: set one of them, e.g. trainer.max_steps=1000 or trainer.max_epochs=10."
        )


def _check_scheduler(cfg: DictConfig) -> None:
    """Scheduler keys diffusers' ``get_scheduler`` really uses; anything else would be ignored."""
    from diffusers.optimization import SchedulerType

    sched = _get(cfg, "optim.scheduler")
    if not isinstance(sched, DictConfig):
        raise ConfigError(f"optim.scheduler must be a mapping with a name, got {sched!r}.")
    unknown = sorted(set(sched.keys()) - SCHEDULER_KEYS)
    if unknown:
        raise ConfigError(
            f"optim.scheduler.{unknown[0]} is not a setting of diffusers' get_scheduler and would be ignored "
            f"(it takes {', '.join(sorted(SCHEDULER_KEYS))}; a floor for cosine is eta_min). "
            f"Fix: remove optim.scheduler.{unknown[0]} (~optim.scheduler.{unknown[0]} on the command line)."
        )
    names = [t.value for t in SchedulerType]
    if sched.get("name") not in names:
        raise ConfigError(f"optim.scheduler.name={sched.get('name')!r} is not one of {names}.")
    _int(cfg, "optim.scheduler.warmup_steps", minimum=0)
    _check_optim_extras(cfg)


def _check_optim_extras(cfg: DictConfig) -> None:
    """``optim.scheduler.eta_min``, ``optim.lora_plus_ratio`` and an optimizer's optional package."""
    from sdtune.training.optimization import FLOOR_SCHEDULES

    lr = _number(cfg, "optim.optimizer.lr", minimum=0)  # > 0 unless the text encoders train alone (_check_train)
    eta_min = _number(cfg, "optim.scheduler.eta_min", minimum=0, optional=True)
    name = _get(cfg, "optim.scheduler.name")
    if eta_min is not None and name not in FLOOR_SCHEDULES:
        raise ConfigError(
            f"optim.scheduler.eta_min={eta_min} is a floor for the cosine schedules only; {name} cannot honour it. "
            f"Fix: optim.scheduler.name=cosine (or cosine_with_restarts), or optim.scheduler.eta_min=null."
        )
    if eta_min is not None and eta_min >= lr:
        raise ConfigError(
            f"optim.scheduler.eta_min={eta_min} must be below optim.optimizer.lr={lr} (it is the lowest lr the "
            f"schedule decays to). Fix: e.g. optim.scheduler.eta_min={lr / 10:g}."
        )
    ratio = _get(cfg, "optim.lora_plus_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not math.isfinite(ratio) or ratio <= 0):
        raise ConfigError(
            f"optim.lora_plus_ratio must be a number > 0 (the LoRA B matrices learn at lr * ratio) or null (off), "
            f"got {ratio!r}. Fix: e.g. optim.lora_plus_ratio=16 (the LoRA+ paper's choice)."
        )
    _check_one_lr_optimizer(cfg)
    target = str(_get(cfg, "optim.optimizer._target_") or "")
    package = target.split(".")[0]
    if package in OPTIONAL_OPTIMIZERS:
        import importlib

        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError(
                f"optim.optimizer._target_={target} needs the package {package}, which is not installed. "
                f"Fix: {OPTIONAL_OPTIMIZERS[package]}, or pick another optimizer (e.g. optim=adamw)."
            ) from None


def _check_one_lr_optimizer(cfg: DictConfig) -> None:
    """Prodigy (``optim=prodigy``) takes one lr for all parameter groups (0 freezes one): prodigyopt
    raises a RuntimeError at the first step otherwise. LoRA+, the text encoders' own ``lr`` and the
    embeddings' ``lr`` each make a group at another lr."""
    target = str(_get(cfg, "optim.optimizer._target_") or "")
    if not target.endswith(".Prodigy"):
        return
    lr = _get(cfg, "optim.optimizer.lr")
    embedding = cfg.get("embedding")
    with_lora = not isinstance(embedding, DictConfig) or embedding.get("with_lora") is not False
    ratio = _get(cfg, "optim.lora_plus_ratio")
    preset = f"optim.optimizer._target_={target} (optim=prodigy) uses one learning rate for every parameter group"
    if with_lora and ratio is not None and ratio != 1 and lr:
        raise ConfigError(
            f"{preset}, but optim.lora_plus_ratio={ratio} trains the LoRA B matrices at optim.optimizer.lr * {ratio}; "
            "prodigyopt would stop at the first step. Fix: optim.lora_plus_ratio=null (Prodigy sets its own step "
            "size), or another optimizer for LoRA+ (e.g. optim=adamw)."
        )
    groups = {"optim.optimizer.lr": lr} if with_lora else {}
    te_lr = _get(cfg, "lora.text_encoder.lr") if isinstance(_get(cfg, "lora.text_encoder"), DictConfig) else None
    if te_lr is not None:
        groups["lora.text_encoder.lr"] = te_lr
    if isinstance(embedding, DictConfig) and embedding.get("lr") is not None:
        groups["embedding.lr"] = embedding.get("lr")
    used = [(key, value) for key, value in groups.items() if value != 0]  # lr 0: a frozen group, which Prodigy allows
    if len({value for _, value in used}) > 1:
        (first, a), (second, b) = used[0], next(item for item in used[1:] if item[1] != used[0][1])
        raise ConfigError(
            f"{preset}, but {second}={b} differs from {first}={a}; prodigyopt would stop at the first step. "
            f"Fix: {second}={a} (with Prodigy an lr multiplies the step size it estimates), or another "
            "optimizer for different learning rates (e.g. optim=adamw)."
        )


def _check_ema(cfg: DictConfig) -> None:
    """``train.ema``: a decay in (0, 1); ``use_for_export`` only with the EMA on."""
    ema = _get(cfg, "train.ema")
    if ema is None:
        return
    for key in ("enabled", "use_for_export"):
        if not isinstance(ema.get(key), bool):
            raise ConfigError(f"train.ema.{key} must be true or false, got {ema.get(key)!r}.")
    decay = _number(cfg, "train.ema.decay", minimum=0, exclusive=True)
    if decay >= 1:
        raise ConfigError(f"train.ema.decay must be in (0, 1), got {decay}. Fix: e.g. train.ema.decay=0.999.")
    if ema.use_for_export and not ema.enabled:
        raise ConfigError(
            "train.ema.use_for_export=true, but train.ema.enabled=false keeps no EMA weights to export. "
            "Fix: add train.ema.enabled=true, or drop use_for_export."
        )


def check_against_base(cfg: Any, source: str, captions: list[str]) -> None:
    """Settings checked against the base model's own configs and tokenizers, before its weights load:
    ``lora.targets`` and ``lora.rank`` against the UNet's layers and ``lora.text_encoder.targets``
    against the text encoders' (all built on the meta device), ``embedding.tokens`` and
    ``embedding.num_vectors`` against the tokenizers and the captions. Only a diffusers folder has
    the configs; for other sources the same checks run once the model has loaded."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.families import get_family
    from sdtune.families.arch import architecture
    from sdtune.lora.layers import check_rank_fits, check_targets, spec_from_config
    from sdtune.training.embeddings import check_base
    from sdtune.training.text_encoders import check_targets_in_configs

    family = get_family(cfg["model"]["family"])
    try:
        arch = architecture(family, source)
    except (OSError, ValueError, KeyError):  # no diffusers folder (a hub id, a single file): checked after loading
        return
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(arch["unet"])
    except Exception as err:  # a config diffusers cannot build (another class, say): the loader names it with its fix
        logging.getLogger(__name__).debug("settings checked after loading: the UNet config does not build (%s)", err)
        return
    spec = spec_from_config(cfg["lora"], family.default_lora_targets)
    check_targets(unet, spec.targets)
    check_rank_fits(unet, spec)
    check_targets_in_configs(cfg, family, arch)
    check_base(cfg, source, captions)


def expand_home(argv: list[str]) -> list[str]:
    """``key=~/x`` -> ``key=/home/me/x`` in command-line overrides.

    The shell does not expand ``~`` after ``key=`` (a dotted key is no shell variable), and Hydra's
    override grammar refuses a bare ``~`` in a value, so users would get a lexer error for the
    most ordinary way to name a folder in their home.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("-", "~")) and (value == "~" or value.startswith("~/")):
            path = os.path.expanduser(value)
            safe = all(c.isalnum() or c in "/._-" for c in path)
            arg = f"{key}={path}" if safe else key + "='" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(arg)
    return out
