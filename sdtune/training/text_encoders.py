"""Text encoders that train: LoRA layers on every text encoder (``lora.text_encoder``).

Off by default. When on, each text encoder the family adapts (SD1.5's CLIP, SDXL's two CLIPs, Kolors'
ChatGLM, SD3.5's CLIP-L and CLIP-G: :meth:`~sdtune.families.base.ModelFamily.text_encoders_with_lora`;
a T5 never, for the family's ``frozen_text_encoder_reason``) gets peft LoRA layers on
``lora.text_encoder.targets`` (the family's default when null), and the encoders change the training
run in four places, all kept here:

* they stay on the device and run with gradients in every step, so the text-embedding cache
  (``train.cache_text_embeddings``) cannot apply: :func:`text_cache_blocker` says why, once;
* the adapted ones become submodules of the LightningModule (:func:`attach_text_encoders`): Lightning moves
  them, DDP reduces their gradients, and checkpoints keep their LoRA tensors (``keep_lora_only``
  drops every frozen weight) and restore them on resume;
* their LoRA parameters are their own optimizer param group, at ``lora.text_encoder.lr``
  (null: the UNet's), :func:`text_encoder_param_group`;
* their LoRA tensors go into the LoRA file beside the UNet's (:func:`text_encoder_state`), named
  as files name them (:mod:`sdtune.lora.keys`: CLIP layers under ``text_model.``).

Textual inversion (``embedding``) also trains inside the encoders (new rows of their token
embeddings), so it shares the first point: :func:`encoders_train` is the one question the rest of
sdtune asks, and :func:`text_grad` turns gradients through the encoders on when it says yes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdtune.config import schema
from sdtune.config.values import Settings
from sdtune.families import ModelFamily, ModelParts, get_family
from sdtune.families.arch import architecture
from sdtune.lora.checks import TEXT_ENCODER_KEYS
from sdtune.lora.keys import diffusers_text_encoders, kohya_text_encoder_tensors, te_file_module
from sdtune.lora.layers import (
    ADAPTER,
    MAX_RANK,
    LoraSpec,
    is_lora_key,
    lora_tensors,
    peft_config,
    text_encoder_spec,
    trainable_lora_parameters,
)
from sdtune.utils.errors import ConfigError, LoraFileError

#: The LightningModule attribute that holds the text encoders while they train.
ATTRIBUTE = "text_encoders"


def encoders_train(cfg: Mapping[str, Any]) -> bool:
    """Whether anything in the text encoders trains in this run (their outputs then change every
    step): text-encoder LoRA (``lora.text_encoder``) or new token embeddings (``embedding``)."""
    return bool((cfg.get("lora") or {}).get("text_encoder")) or bool(cfg.get("embedding"))


def check_config(cfg: DictConfig) -> None:
    """``lora.text_encoder`` (null: off): a mapping with a rank, and alpha, targets, lr; plain LoRA on
    the UNet beside it. Its targets are checked against the encoders by :func:`check_targets_in_configs`."""
    s = Settings(cfg)
    te = s.get("lora.text_encoder")
    if te is None:
        return
    example = "e.g. lora.text_encoder.rank=4 (and .alpha, .targets, .lr), or lora.text_encoder=null (off)."
    if not isinstance(te, DictConfig):
        raise ConfigError(f"lora.text_encoder must be a mapping with rank (and alpha, targets, lr) or null, got {te!r}. "
                          f"Fix: {example}")
    unknown = sorted(set(te.keys()) - set(schema.TEXT_ENCODER_KEYS))
    if unknown:
        raise ConfigError(f"lora.text_encoder.{unknown[0]} is not a setting (it takes {', '.join(schema.TEXT_ENCODER_KEYS)}). "
                          f"Fix: {example}")
    kind = str(s.get("lora.type") or "lora")
    if kind != "lora":
        raise ConfigError(
            f"lora.text_encoder trains plain LoRA layers in the text encoders and is not combined with lora.type={kind} "
            f"on the UNet. Fix: lora.type=lora, or lora.text_encoder=null (no text-encoder LoRA)."
        )
    if s.get("lora.use_dora"):
        raise ConfigError(
            "lora.text_encoder trains plain LoRA layers in the text encoders and is not combined with "
            "lora.use_dora=true (DoRA) on the UNet. Fix: lora.use_dora=false, or lora.text_encoder=null "
            "(no text-encoder LoRA)."
        )
    if "rank" not in te:
        raise ConfigError(f"lora.text_encoder has no rank. Fix: {example}")
    rank = s.integer("lora.text_encoder.rank", ge=1, fix=example)
    if rank > MAX_RANK:
        raise ConfigError(f"lora.text_encoder.rank={rank} is larger than any text-encoder layer needs (max {MAX_RANK}). "
                          f"Fix: {example}")
    s.number("lora.text_encoder.alpha", gt=0, optional=True)
    s.number("lora.text_encoder.lr", gt=0, optional=True)
    targets = te.get("targets")
    if targets is not None and (not OmegaConf.is_list(targets) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"lora.text_encoder.targets must be null (the family's default) or a non-empty list of module "
                          f"names like [q_proj,v_proj], got {targets!r}.")


def text_cache_blocker(cfg: Mapping[str, Any]) -> str | None:
    """Why the text-embedding cache cannot be used in this run (one log line), or None."""
    if not encoders_train(cfg):
        return None
    what = "lora.text_encoder trains the text encoders" if (cfg.get("lora") or {}).get("text_encoder") else \
        "embedding trains new token embeddings in the text encoders"
    return (f"text-embedding cache off: {what}, so a caption's embedding changes every step; the encoders stay "
            "on the device and run in each step")


@contextlib.contextmanager
def text_grad(cfg: Mapping[str, Any]) -> Iterator[None]:
    """Gradients through the text encoders only when they train (and grad mode is on, i.e. not in validation)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and encoders_train(cfg)):
        yield


def text_encoder_lr(cfg: Mapping[str, Any]) -> float:
    """``lora.text_encoder.lr``, or the UNet's ``optim.optimizer.lr`` when null."""
    lr = cfg["lora"]["text_encoder"].get("lr")
    return float(cfg["optim"]["optimizer"]["lr"] if lr is None else lr)


def _unmatched(encoder: torch.nn.Module, targets: Iterable[str]) -> tuple[list[str], list[str]]:
    """(targets that match no linear layer of ``encoder``, the encoder's linear layer names)."""
    names = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)], names


def check_text_encoder_targets(encoder: torch.nn.Module, targets: Iterable[str], index: int, family: ModelFamily,
                               frozen: Mapping[int, torch.nn.Module] | None = None) -> None:
    """Refuse targets that match no linear layer of ``encoder`` (peft would skip them silently);
    ``frozen``: the family's encoders that take no LoRA, named when the targets are theirs."""
    unmatched, names = _unmatched(encoder, targets)
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        theirs = [f"text encoder {i + 1} ({type(m).__name__})" for i, m in (frozen or {}).items()
                  if len(_unmatched(m, unmatched)[0]) < len(unmatched)]
        why = (f" They name layers of {', '.join(theirs)}, which this family does not adapt: "
               f"{family.frozen_text_encoder_reason}." if theirs else "")
        raise ConfigError(
            f"lora.text_encoder.targets: {unmatched} match no linear layer of the {family.name} text encoder {index + 1} "
            f"({type(encoder).__name__}).{why} Fix: use names such as {list(family.default_text_encoder_lora_targets)} "
            f"(null: that default); its layers: {', '.join(leaves)[:300]}."
        )


def check_targets_in_configs(cfg: Mapping[str, Any], family: ModelFamily, arch: Mapping[str, Any]) -> None:
    """:func:`check_text_encoder_targets` before the weights load: on text encoders built on the meta
    device from the base's configs (``arch``, :func:`sdtune.families.arch.architecture`)."""
    spec = text_encoder_spec(cfg, family)
    if spec is None:
        return
    with torch.device("meta"):
        _, encoders = family.random_text_parts(arch, meta=True)
    adapted = family.text_encoders_with_lora()
    frozen = {i: m for i, m in enumerate(encoders) if i not in adapted}
    for index in adapted:
        check_text_encoder_targets(encoders[index], spec.targets, index, family, frozen)


def inject_text_encoders(parts: ModelParts, spec: LoraSpec, family: ModelFamily, *, dropout: float = 0.0,
                         init: str | bool = "gaussian", gradient_checkpointing: bool = False) -> None:
    """Add trainable LoRA layers (fp32) to the text encoders of ``parts`` that ``family`` adapts, in
    train mode; the others (a T5) stay frozen and in eval mode."""
    from peft import inject_adapter_in_model

    adapted = family.text_encoders_with_lora()
    frozen = {i: m for i, m in enumerate(parts.text_encoders) if i not in adapted}
    for index in adapted:
        encoder = parts.text_encoders[index]
        check_text_encoder_targets(encoder, spec.targets, index, family, frozen)
        # peft's own injection works on any module; transformers' ``add_adapter`` wraps the same call
        # behind a peft version check that newer transformers releases tighten past released peft.
        inject_adapter_in_model(peft_config(spec, dropout=dropout, init=init), encoder, adapter_name=ADAPTER)
        for param in trainable_lora_parameters(encoder):
            param.data = param.data.float()  # LoRA weights train in fp32, as the UNet's
        if gradient_checkpointing and getattr(encoder, "supports_gradient_checkpointing", False):
            enable = getattr(encoder, "activation_checkpointing_enable", None)  # transformers >= 5; older: gradient_...
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()  # LoRA dropout acts in train mode only


def attach_text_encoders(module: torch.nn.Module, parts: ModelParts, family: ModelFamily) -> None:
    """Make the adapted text encoders submodules of ``module`` (device placement, DDP, checkpoints),
    under their encoder index (``text_encoders.<index>.``). A frozen one (a T5) stays out: Lightning's
    ``train()`` would switch its dropout on, and :func:`sdtune.training.fit_caches.prepare_fit` places it like the others."""
    setattr(module, ATTRIBUTE, torch.nn.ModuleDict({str(i): parts.text_encoders[i] for i in family.text_encoders_with_lora()}))


def text_encoder_param_group(cfg: Mapping[str, Any], parts: ModelParts, family: ModelFamily) -> dict[str, Any]:
    """The optimizer param group of the text encoders' LoRA parameters, at their own lr (the UNet's
    groups come first, see :func:`sdtune.training.optimization.build_optimization`)."""
    te_params = [p for i in family.text_encoders_with_lora() for p in trainable_lora_parameters(parts.text_encoders[i])]
    return {"params": te_params, "lr": text_encoder_lr(cfg), "name": "text_encoder"}


def text_encoder_state(parts: ModelParts, family: ModelFamily) -> dict[int, dict[str, torch.Tensor]]:
    """The trained text-encoder LoRA of live ``parts`` as peft-named CPU tensors per encoder index,
    module paths as LoRA files name them."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for index in family.text_encoders_with_lora():
        state = get_peft_model_state_dict(parts.text_encoders[index], adapter_name=ADAPTER)
        kind = family.text_encoder_kinds[index]
        out[index] = {te_file_module(k, kind): v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    return out


def checkpoint_text_encoder_state(state_dict: Mapping[str, torch.Tensor], family: ModelFamily) -> dict[int, dict[str, torch.Tensor]]:
    """The same from a checkpoint's ``state_dict`` (keys ``text_encoders.<index>.<module>.lora_A.default.weight``)."""
    out = {}
    for index, kind in enumerate(family.text_encoder_kinds):
        tensors = lora_tensors(state_dict, prefix=f"{ATTRIBUTE}.{index}.")
        if tensors:
            out[index] = {te_file_module(k, kind): v for k, v in tensors.items()}
    return out


def has_text_encoder_tensors(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(ATTRIBUTE + ".") and is_lora_key(k) for k in state_dict)


def spec_dict(spec: LoraSpec | None) -> dict[str, Any] | None:
    """``spec`` as the plain dict checkpoints and headers record (None: no text-encoder LoRA)."""
    return None if spec is None else {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}


# -- re-exporting sdtune's own files (sdtune.export) ---------------------------------------------
def text_encoder_module_names(family: ModelFamily, config_folder: str | None = None) -> dict[int, list[str]]:
    """Module paths of the family's text encoders, built on the meta device from the base model's
    configs (``config_folder``) when readable, else the family's full-size ones (no weights loaded)."""
    try:
        arch = architecture(family, config_folder) if config_folder else architecture(family)
    except Exception:  # the base is not reachable offline: its published architecture names the same layers
        arch = architecture(family)
    with torch.device("meta"):
        _, encoders = family.random_text_parts(arch, meta=True)
    return {i: [n for n, _ in encoder.named_modules()] for i, encoder in enumerate(encoders)}


def file_text_encoder_tensors(lora, family_name: str) -> dict[int, dict[str, torch.Tensor]]:
    """peft-named text-encoder tensors (file module paths) per encoder index of an sdtune LoRA file."""
    family = get_family(family_name)
    if lora.format == "diffusers":
        return diffusers_text_encoders(lora.raw)
    config = (lora.config or {}).get("model", {}).get("path")
    found = kohya_text_encoder_tensors(lora.raw, text_encoder_module_names(family, config))
    return {i: {te_file_module(k, family.text_encoder_kinds[i]): v for k, v in tensors.items()} for i, (tensors, _) in found.items()}


def check_text_encoder_tensors(lora, source: str) -> None:
    """The text-encoder tensors of an sdtune file must agree with its ``sdtune.text_encoder`` header
    (rank, and alpha for kohya files): a converted file would otherwise carry the wrong scale."""
    spec = lora.text_encoder
    for key, value in sorted(lora.raw.items()):
        if not key.startswith(TEXT_ENCODER_KEYS):
            continue
        if key.endswith(".alpha"):
            bad = not math.isclose(float(value), spec.alpha, rel_tol=1e-6)
        else:
            bad = value.ndim != 2 or spec.rank not in (value.shape[0] if "down" in key or "lora_A" in key else value.shape[1],)
        if bad:
            raise LoraFileError(f"{source!r}: tensor {key!r} contradicts the header's sdtune.text_encoder (rank {spec.rank}, "
                                f"alpha {spec.alpha}). The file was edited or mixes two LoRAs; re-export it from its checkpoint.")
