"""Config helpers: OmegaConf resolvers and early validation of leaf settings.

``validate`` runs before any data or model is touched, so a typo costs a second, not a model
download. Each message names the key, the value it got and what would be accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true")
PREDICTION_TYPES = (None, "epsilon", "v_prediction")
# pissa/olora also rewrite the base weights, which a plain LoRA file cannot carry: not offered.
LORA_INITS = ("gaussian", True, False)


def register_resolvers() -> None:
    """``${sdtune_root:}``: the repository root, so configs can find bundled data and caches."""
    if not OmegaConf.has_resolver("sdtune_root"):
        OmegaConf.register_new_resolver("sdtune_root", lambda: str(ROOT))


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


def check_device(cfg: DictConfig) -> None:
    """Precision settings that need hardware; checked once the model is known to exist."""
    if str(_get(cfg, "trainer.precision")) == "16-mixed" and not _gpu_requested(cfg):
        raise ConfigError(
            "trainer.precision=16-mixed needs a CUDA GPU and none is in use. Fix: trainer.precision=32 "
            "(or bf16-mixed) on the CPU, e.g. with trainer=cpu."
        )


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid training setting."""
    from .families import FAMILIES

    family = _get(cfg, "model.family")
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is not one of {sorted(FAMILIES)}.")
    if not _get(cfg, "model.path"):
        raise ConfigError("model.path is not set. Fix: model.path=<diffusers folder or hub id>.")

    _int(cfg, "lora.rank", minimum=1, hint=" Fix: e.g. lora.rank=16.")
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
    _int(cfg, "data.batch_size", minimum=1)
    _int(cfg, "data.num_workers", minimum=0)
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
    if _get(cfg, "data.cache_latents") and not _get(cfg, "data.center_crop"):
        raise ConfigError(
            "data.cache_latents=true needs data.center_crop=true: a cached latent is one fixed crop. "
            "Fix: set data.center_crop=true, or turn the latent cache off."
        )

    precision = str(_get(cfg, "trainer.precision"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported; use one of {list(PRECISIONS)}.")

    _int(cfg, "trainer.accumulate_grad_batches", minimum=1)

    if _get(cfg, "train.prediction_type") not in PREDICTION_TYPES:
        raise ConfigError(
            f"train.prediction_type must be epsilon, v_prediction or null (use the model's), "
            f"got {_get(cfg, 'train.prediction_type')!r}."
        )
    _number(cfg, "train.snr_gamma", minimum=0, exclusive=True, optional=True)
    _number(cfg, "train.noise_offset", minimum=0)
    _number(cfg, "optim.optimizer.lr", minimum=0, exclusive=True)
