"""LoRA layers on the UNet, through peft.

peft does the injection and the maths (``W x + (alpha / r) · B A x``; DoRA, LoHa and LoKr through
:mod:`sdtune.lora.adapters`); this module only turns our config into a peft config and names the
trainable tensors consistently between the live model, Lightning checkpoints and exported files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdtune.config.values import Settings
from sdtune.families import FAMILIES, ModelFamily
from sdtune.lora.adapters import ADAPTER_TYPES, check_adapter_config, is_adapter_key, strip_adapter_name
from sdtune.lora.adapters import peft_config as adapter_config
from sdtune.utils.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name inside the training UNet
# pissa/olora also rewrite the base weights, which a plain LoRA file cannot carry: not offered.
LORA_INITS = ("gaussian", True, False)
#: The largest rank offered: the widest attention layer of any supported family has 1280 features.
MAX_RANK = 1024


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA is, independent of its weights: written to every file and checkpoint."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    type: str = "lora"  # lora | loha | lokr (lora.type)
    use_dora: bool = False  # weight-decomposed LoRA (lora.use_dora)

    @property
    def kind(self) -> str:
        """'lora', 'dora', 'loha' or 'lokr': what a file of this spec holds."""
        return "dora" if self.use_dora else self.type

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_from_config(lora_cfg: Mapping[str, Any], default_targets: tuple[str, ...]) -> LoraSpec:
    targets = lora_cfg.get("targets") or default_targets
    alpha = lora_cfg.get("alpha")
    return LoraSpec(
        rank=int(lora_cfg["rank"]),
        alpha=float(lora_cfg["rank"] if alpha is None else alpha),
        targets=tuple(targets),
        type=str(lora_cfg.get("type") or "lora"),
        use_dora=bool(lora_cfg.get("use_dora", False)),
    )


def check_config(cfg: DictConfig) -> None:
    """The ``lora:`` section (rank, alpha, dropout, init, targets, adapter kind), before anything
    loads; :func:`check_base` checks rank and targets against the base's layers later."""
    s = Settings(cfg)
    rank = s.integer("lora.rank", ge=1, fix="e.g. lora.rank=16.")
    if rank > MAX_RANK:
        raise ConfigError(
            f"lora.rank={rank} is larger than any layer it could adapt (the widest attention layer of the supported "
            f"families has 1280 features; ranks above {MAX_RANK} only waste memory). Fix: e.g. lora.rank=16 (4-128 "
            "is usual)."
        )
    s.number("lora.alpha", gt=0, optional=True)
    s.number("lora.dropout", ge=0, lt=1)
    s.choice("lora.init", LORA_INITS)
    targets = s.get("lora.targets")
    if targets is not None and (
        not OmegaConf.is_list(targets) or not targets or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(f"lora.targets must be a non-empty list of module names like [to_q,to_k], got {targets!r}.")
    export_format = s.get("callbacks.lora_export.format")
    family = FAMILIES.get(s.get("model.family"))
    if export_format is None and s.get("callbacks.lora_export") is not None and family is not None:
        export_format = family.default_export_format  # null: the family's layout
    lora_cfg = OmegaConf.to_container(cfg.lora, resolve=True)
    if family is not None:
        check_fused_layout(lora_cfg, family(), export_format)
    check_adapter_config(lora_cfg, export_format)


def check_fused_layout(lora_cfg: Mapping[str, Any], family: ModelFamily, export_format: str | None) -> None:
    """Refuse LoHa/LoKr, and DoRA in the kohya layout, on targets that the family's kohya layout fuses
    into one weight (the flow transformers' q/k/v) or stores with swapped halves: only a plain LoRA
    can be written that way (:mod:`sdtune.lora.fused`), and the file is written after training."""
    kind = str(lora_cfg.get("type") or "lora")
    kind = "dora" if kind == "lora" and lora_cfg.get("use_dora") is True else kind
    if kind not in ("dora", "loha", "lokr") or (kind == "dora" and export_format != "kohya"):
        return  # DoRA in the diffusers layout keeps every module apart
    targets = tuple(lora_cfg.get("targets") or family.default_lora_targets)
    joined = [(m, km) for m, km in family.kohya_modules(None).items() if km.fused or km.swap_halves]

    def reached(target: str) -> list:
        return [km for m, km in joined if m == target or m.endswith("." + target)]

    hit = [t for t in targets if reached(t)]
    if not hit:
        return
    km = reached(hit[0])[0]
    what = f"fuses {list(km.parts)} into one weight" if km.fused else "stores with its output halves swapped"
    where = f"the kohya layout of model.family={family.name} {what} ({km.name}), which lora.targets {hit} reach"
    if kind == "dora":
        raise ConfigError(
            f"lora.use_dora=true with callbacks.lora_export.format=kohya: {where}, and a DoRA scale is a norm of the "
            "whole fused weight, so the file could not hold it. Fix: callbacks.lora_export.format=diffusers (its layout "
            "keeps every module apart, and diffusers' load_lora_weights reads DoRA), or lora.use_dora=false."
        )
    apart = [t for t in targets if t not in hit]
    keep = f", or lora.targets=[{','.join(apart)}] (modules the kohya layout keeps apart)" if apart else ""
    raise ConfigError(
        f"lora.type={kind}: {where}, and {kind} factors cannot be stacked into one weight (the diffusers layout holds "
        f"LoRA and DoRA only). Fix: lora.type=lora (or DoRA: lora.use_dora=true callbacks.lora_export.format=diffusers)"
        f"{keep}."
    )


def check_base(cfg: Mapping[str, Any], unet: torch.nn.Module, default_targets: tuple[str, ...]) -> None:
    """``lora.targets`` and ``lora.rank`` against ``unet``'s layers (a meta-device UNet will do)."""
    spec = spec_from_config(cfg["lora"], default_targets)
    check_targets(unet, spec.targets)
    check_rank_fits(unet, spec)
def text_encoder_spec(cfg: Mapping[str, Any], family: ModelFamily) -> LoraSpec | None:
    """The text-encoder LoRA of run config ``cfg`` (``lora.text_encoder``), None when it is off; its
    targets default to the family's (written into every LoRA header, so kept beside the UNet's spec)."""
    te = (cfg.get("lora") or {}).get("text_encoder")
    if not te:
        return None
    return spec_from_config(te, family.default_text_encoder_lora_targets)


def peft_config(spec: LoraSpec, *, dropout: float = 0.0, init: str | bool = "gaussian"):
    if spec.type not in ADAPTER_TYPES:
        raise ConfigError(f"lora.type must be one of {list(ADAPTER_TYPES)}, got {spec.type!r}.")
    return adapter_config(spec.rank, spec.alpha, spec.targets, kind=spec.type, use_dora=spec.use_dora,
                          dropout=dropout, init=init)


def inject(
    unet: torch.nn.Module,
    spec: LoraSpec,
    *,
    dropout: float = 0.0,
    init: str | bool = "gaussian",
    adapter_name: str = ADAPTER,
) -> None:
    """Add trainable LoRA layers to ``unet`` in place (diffusers' peft integration).

    Every target must name at least one linear or conv layer: peft would silently skip a target that
    matches nothing (when another one matches) and so train less than the config says.
    """
    check_targets(unet, spec.targets)
    unet.add_adapter(peft_config(spec, dropout=dropout, init=init), adapter_name=adapter_name)


def check_targets(unet: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Refuse ``lora.targets`` entries that match no adaptable UNet layer, as peft matches names."""
    # Once an adapter is in, a target is a peft wrapper around ``<name>.base_layer``.
    layers = {name.replace(".base_layer", ""): m for name, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not is_adapter_key(name)}
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if unmatched:
        names = sorted({n.rsplit(".", 2)[-1] if n.endswith(".0") else n.rsplit(".", 1)[-1] for n in layers})
        hint = ", ".join(n for n in names if not n.isdigit())[:300]
        raise ConfigError(
            f"lora.targets: {unmatched} match no linear or conv layer of this UNet. Fix: use layer names such as "
            f"[to_q,to_k,to_v,to_out.0] (attention), [proj_in,proj_out,ff.net.2], or full module paths; names here: {hint}."
        )


def check_rank_fits(unet: torch.nn.Module, spec: LoraSpec) -> None:
    """``lora.rank`` against the widths of the layers ``spec.targets`` selects (a meta-device UNet will
    do): larger than every one of them is refused (it only wastes memory: a layer's update has at most
    min(out, in x kernel) directions), larger than some of them is a warning."""
    widths = []
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in spec.targets):
            widths.append(min(m.weight.shape[0], m.weight[0].numel()))  # a conv update spans in x kernel
    if not widths or spec.rank <= min(widths):
        return
    kind = "lora.type=" + spec.type if spec.type != "lora" else "LoRA"
    if spec.rank > max(widths):
        raise ConfigError(
            f"lora.rank={spec.rank} is larger than any layer it could adapt: the widest layer lora.targets selects "
            f"in this UNet has {max(widths)} features (a {kind} update of a layer has at most that many directions; "
            f"a larger rank only wastes memory). Fix: lora.rank={min(16, max(widths))} (at most {max(widths)} here)."
        )
    narrow = sum(w < spec.rank for w in widths)
    log.warning("lora.rank=%d is larger than %d of the %d layers lora.targets selects (the narrowest has %d "
                "features): those layers cannot use the extra rank", spec.rank, narrow, len(widths), min(widths))


def is_lora_key(key: str) -> bool:
    """A trainable adapter tensor: LoRA's A/B, DoRA's magnitude, LoHa's hada_*, LoKr's lokr_*."""
    return is_adapter_key(key)


def module_key_to_peft(key: str, prefix: str = "unet.") -> str:
    """``unet.<m>.lora_A.default.weight`` (a module's state dict) -> ``<m>.lora_A.weight`` (peft's);
    likewise ``.hada_w1_a.default`` -> ``.hada_w1_a`` and DoRA's magnitude -> ``.lora_magnitude_vector``."""
    if key.startswith(prefix):
        key = key[len(prefix):]
    return strip_adapter_name(key, ADAPTER)


def lora_tensors(module_state: Mapping[str, torch.Tensor], prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """peft-named LoRA tensors from a (LightningModule) state dict, contiguous and on the CPU.

    Used both for the live model at the end of ``fit`` and for a checkpoint's ``state_dict``, so the
    two exports agree key for key and value for value.
    """
    return {
        module_key_to_peft(k, prefix): v.detach().to("cpu", copy=True).contiguous()
        for k, v in module_state.items()
        if k.startswith(prefix) and is_lora_key(k)
    }


def named_trainable_lora_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(module path, parameter) of every trainable LoRA tensor, in ``named_parameters`` order."""
    return [(n, p) for n, p in module.named_parameters() if is_lora_key(n) and p.requires_grad]


def trainable_lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for _, p in named_trainable_lora_parameters(module)]


def live_lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained LoRA of a live ``unet`` as peft-named CPU tensors: peft's own adapter state dict
    (a checkpoint's tensors are renamed to the same keys by :func:`lora_tensors`)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

