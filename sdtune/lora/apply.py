"""Put LoRA files onto a loaded base model, denoiser and text encoders, mix several, and fuse them.

What ``generate`` and ``merge`` do with LoRAs, for files of any layout :mod:`sdtune.lora.keys`
reads: ours, diffusers' (old and current ``save_lora_weights``), peft's and kohya's, including
kohya's text-encoder layers (``lora_te*``) and per-module ranks and alphas. Each file becomes one
peft adapter per model it touches; the adapters are mixed with diffusers' own helpers
(``set_adapters`` on the denoiser (UNet or transformer), ``set_adapters_for_text_encoder`` on the text encoders), as
diffusers' pipelines and A1111's ``<lora:name:0.7>`` do. A key that matches nothing is an error
that names it, never a silent skip.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from sdtune.families import ModelFamily, ModelParts, as_family
from sdtune.lora.adapters import is_adapter_key, kind_of, load_plan, module_of
from sdtune.lora.files import LoraFile, check_family
from sdtune.lora.header import DIFFUSERS_METADATA_KEY, denoiser_header_prefix
from sdtune.lora.keys import (
    DENOISER,
    PEFT_PREFIXES,
    denoiser_word,
    diffusers_text_encoders,
    diffusers_to_peft,
    kohya_text_encoder_tensors,
    kohya_to_peft,
    peft_components,
    te_live_module,
)
from sdtune.utils.errors import LoraFileError

Component = str | int  # DENOISER ("denoiser"), or the index of a text encoder
Weights = tuple[dict[str, torch.Tensor], dict[str, float]]  # peft tensors, alpha per module
# diffusers' header prefixes per text encoder (its save_lora_weights key prefixes), for a peft-layout file's alphas
_HEADER_PREFIX = {c: p for p, c in PEFT_PREFIXES if p.startswith("text_encoder")}


def _model(parts: ModelParts, component: Component) -> torch.nn.Module:
    return parts.denoiser if component == DENOISER else parts.text_encoders[component]


def _where(component: Component, family: ModelFamily) -> str:
    return denoiser_word(family) if component == DENOISER else f"text encoder {component + 1}"


def _names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()]


def _header_alphas(lora: LoraFile, component: Component, modules: Sequence[str]) -> dict[str, float]:
    """Alphas a peft/diffusers file declares for ``component`` (``lora_alpha``, and ``alpha_pattern``
    keys matched as peft matches them); modules it says nothing about keep alpha = rank, diffusers'
    convention without a header."""
    from peft.utils.other import get_pattern_key

    meta = json.loads(lora.metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
    prefix = denoiser_header_prefix(meta) if component == DENOISER else _HEADER_PREFIX.get(component, "")
    alpha, pattern = meta.get(f"{prefix}lora_alpha"), meta.get(f"{prefix}alpha_pattern") or {}
    if component == DENOISER and lora.spec_declared:  # a file holding alpha/rank in lora_B applies at alpha = rank
        alpha = lora.spec.rank if lora.alpha_in_tensors else lora.spec.alpha
    out = {}
    for m in modules:
        key = get_pattern_key(pattern.keys(), m) if pattern else None
        if key in pattern:
            out[m] = float(pattern[key])
        elif alpha is not None:
            out[m] = float(alpha)
    return out


def components(lora: LoraFile, parts: ModelParts, family: ModelFamily) -> dict[Component, Weights]:
    """The file's peft tensors and per-module alphas for each model they belong to."""
    if lora.format == "kohya":
        tensors, alphas = kohya_to_peft(lora.raw, _names(parts.denoiser), lora.family or family.name, parts.denoiser.config,
                                        lora.spec.targets)
        out: dict[Component, Weights] = {DENOISER: (tensors, alphas)} if tensors else {}
        out.update(kohya_text_encoder_tensors(lora.raw, {i: _names(te) for i, te in enumerate(parts.text_encoders)}))
        return out
    if lora.format == "diffusers":
        split = {DENOISER: diffusers_to_peft(lora.raw), **diffusers_text_encoders(lora.raw)}
    else:
        split = peft_components(lora.raw)
    out = {}
    for component, tensors in split.items():
        if component != DENOISER and component >= len(parts.text_encoders):
            raise LoraFileError(f"it has layers for text encoder {component + 1} but a {family.name} model has "
                                f"{len(parts.text_encoders)}")
        if component != DENOISER:  # files name CLIP layers under text_model.; a flattened CLIPTextModel does not
            encoder = parts.text_encoders[component]
            tensors = {te_live_module(k, encoder): v for k, v in tensors.items()}
        modules = sorted({module_of(k) for k in tensors})
        out[component] = (tensors, _header_alphas(lora, component, modules))
    return out


def lora_config(tensors: Mapping[str, torch.Tensor], alphas: Mapping[str, float]):
    """A peft LoraConfig for exactly these layers: the commonest rank and alpha, the rest as patterns."""
    import re

    from peft import LoraConfig

    ranks = {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    alpha_of = {m: float(alphas.get(m, r)) for m, r in ranks.items()}  # no alpha: alpha = rank (scale 1)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alpha_of.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(ranks), init_lora_weights=False,
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(m): a for m, a in alpha_of.items() if a != alpha},
    )


def _absent_layers(denoiser: torch.nn.Module, targets: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Denoiser layers a header's targets name (by peft's rule) that the file has no weights for."""
    have = {module_of(k) for k in tensors}
    want = {n for n, m in denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in targets)}
    return sorted(want - have)


def _load_into(model: torch.nn.Module, component: Component, weights: Weights, adapter_name: str,
               where: str = "UNet") -> list[str]:
    """Add one adapter to ``model``; what did not fit (the adapter is removed again then)."""
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    tensors, alphas = weights
    try:  # DoRA, LoHa, LoKr: the peft config and tensors that reproduce ComfyUI's maths on this model
        config, tensors = load_plan(tensors, alphas, model) if kind_of(tensors) != "lora" else (lora_config(tensors, alphas), tensors)
    except (KeyError, RuntimeError) as err:  # a layer lacks one of its tensors, or shapes disagree
        return [f"its adapter layers are incomplete or do not fit ({err})"]
    try:
        if component == DENOISER:
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as err:  # peft: none of the file's layers exists in this model
        return [str(err).strip().splitlines()[0]]
    try:
        result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    except RuntimeError as err:  # size mismatch
        _remove(model, adapter_name)
        lines = str(err).strip().splitlines()
        return [lines[-1] if lines else str(err)]
    unexpected = sorted(k for k in result.unexpected_keys if is_adapter_key(k))
    missing = sorted(k for k in result.missing_keys if is_adapter_key(k)
                     and (k.endswith(f".{adapter_name}") or f".{adapter_name}." in k))
    if unexpected or missing:
        _remove(model, adapter_name)
    where = where if component == DENOISER else "text encoder"
    return [f"{len(unexpected)} tensor(s) match no module of this {where}, e.g. {unexpected[:3]}"] * bool(unexpected) + \
        [f"{len(missing)} LoRA layer(s) lack a tensor, e.g. {missing[:3]}"] * bool(missing)


def apply_lora(parts: ModelParts, lora: LoraFile, *, family: str | ModelFamily, path: str | os.PathLike,
               adapter_name: str) -> list[Component]:
    """Add ``lora`` to the denoiser and text encoders it has layers for, as adapter ``adapter_name``;
    the components it landed on. The family is checked from the header first, so an SD1.5 LoRA
    on SDXL is named as such rather than surfacing as a tensor shape error."""
    family = as_family(family)
    check_family(lora, family.name, path)
    try:
        found = components(lora, parts, family)
    except LoraFileError as err:
        raise LoraFileError(f"{str(path)!r} does not match this {family.name} model: {err}") from None
    if DENOISER in found and lora.spec.targets:  # a header that names its targets promises all of those layers
        absent = _absent_layers(parts.denoiser, lora.spec.targets, found[DENOISER][0])
        if absent:
            raise LoraFileError(f"{str(path)!r} does not match this {family.name} {denoiser_word(family)}: {len(absent)} LoRA layer(s) "
                                f"of its targets are absent from the file, e.g. {absent[:3]}. The file is incomplete.")
    loaded: list[Component] = []
    for component, weights in found.items():
        problems = _load_into(_model(parts, component), component, weights, adapter_name, denoiser_word(family))
        if problems:
            for done in loaded:  # all or nothing: no half-applied LoRA stays behind
                _remove(_model(parts, done), adapter_name)
            raise LoraFileError(f"{str(path)!r} does not match this {family.name} {_where(component, family)}: " + "; ".join(problems)
                                + ". Was it trained on a different base model?")
        loaded.append(component)
    return loaded


def _remove(model: torch.nn.Module, adapter_name: str) -> None:
    from diffusers.utils.peft_utils import delete_adapter_layers

    delete_adapter_layers(model, adapter_name)


def activate(parts: ModelParts, adapters: Mapping[Component, Sequence[str]], weights: Mapping[str, float]) -> None:
    """Make exactly ``adapters`` active on each model, each at its weight."""
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    for component, names in adapters.items():
        if component == DENOISER:
            parts.denoiser.set_adapters(list(names), weights=[weights[n] for n in names])
        else:
            set_adapters_for_text_encoder(list(names), parts.text_encoders[component], [weights[n] for n in names])


def set_enabled(parts: ModelParts, adapters: Mapping[Component, Sequence[str]], enabled: bool) -> None:
    """Switch every LoRA on or off (the same seeds render the base and the LoRA)."""
    from diffusers.loaders.lora_base import disable_lora_for_text_encoder, enable_lora_for_text_encoder

    for component in adapters:
        if component == DENOISER:
            parts.denoiser.enable_adapters() if enabled else parts.denoiser.disable_adapters()
        else:
            (enable_lora_for_text_encoder if enabled else disable_lora_for_text_encoder)(parts.text_encoders[component])


def fuse(parts: ModelParts, adapters: Mapping[Component, Sequence[str]]) -> None:
    """Add the active adapters into the base weights and remove the LoRA layers (merge)."""
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for component, names in adapters.items():
        if component == DENOISER:
            parts.denoiser.fuse_lora(lora_scale=1.0, adapter_names=list(names))
            parts.denoiser.unload_lora()
        else:
            encoder = parts.text_encoders[component]
            fuse_text_encoder_lora(encoder, adapter_names=list(names))
            recurse_remove_peft_layers(encoder)
            if getattr(encoder, "peft_config", None) is not None:
                del encoder.peft_config
