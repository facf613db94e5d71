"""LoRA tensor names in every format we read or write, as explicit rule tables.

In memory LoRAs are always peft-named: ``<module>.lora_A.weight`` (down) and ``.lora_B.weight``
(up), where ``<module>`` is a diffusers denoiser module path such as
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or ``transformer_blocks.0.attn.to_q``.

On disk:

* **diffusers** (what diffusers' training scripts write and ``load_lora_weights`` reads):
  ``<denoiser>.<module>.lora.down.weight`` / ``.lora.up.weight``, ``<denoiser>`` being the
  family's denoiser subfolder (``unet``, ``transformer``); alpha in the header.
* **kohya** (A1111, ComfyUI, Forge, kohya sd-scripts): ``lora_unet_<name>.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha`` per module. ``<name>`` is the module's path in the
  family's original layout (:meth:`~sdtune.families.base.ModelFamily.kohya_modules`) with ``.``
  replaced by ``_``: for SDXL the original SGM path (``input_blocks.4.1...``), as kohya sd-scripts
  writes it; for SD1.x and Kolors diffusers' own path (kohya's SD1.x convention, and for Kolors
  the one name form that both diffusers' KolorsPipeline and ComfyUI read); for the flow
  transformers BFL's and MMDiT's paths, where several diffusers modules fuse into one
  (:mod:`sdtune.lora.fused`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from sdtune.families import FAMILIES, ModelFamily, as_family
from sdtune.families.kohya import STANDARD_XL_UNET, KohyaModule
from sdtune.lora import fused
from sdtune.lora.adapters import DORA_SCALE, LYCORIS_SUFFIXES, MAGNITUDE
from sdtune.utils.errors import LoraFileError

DIFFUSERS_PREFIX = "unet."  # the UNet families' denoiser prefix (denoiser_prefix(family) in general)
KOHYA_PREFIX = "lora_unet_"  # every family's, the flow transformers' included (kohya's and ComfyUI's rule)
TE_DIFFUSERS_PREFIXES = ("text_encoder.", "text_encoder_2.")

#: peft suffix -> diffusers-file suffix
DIFFUSERS_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora.down.weight"),
    (".lora_B.weight", ".lora.up.weight"),
)
#: peft suffix -> kohya suffix; LoHa/LoKr tensors keep their names (LyCORIS's, which ComfyUI and
#: A1111 read), and a DoRA layer's ``.dora_scale`` (see :mod:`sdtune.lora.adapters`) keeps its own.
KOHYA_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_up.weight"),
    (DORA_SCALE, DORA_SCALE),
    *((s, s) for s in LYCORIS_SUFFIXES),
)
KOHYA_ALPHA = ".alpha"
__all__ = ["STANDARD_XL_UNET"]  # re-exported: its home is sdtune.families.kohya


def _swap_suffix(key: str, rules: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(stem, new suffix) for ``key`` under ``rules``."""
    for old, new in rules:
        if key.endswith(old):
            return key[: -len(old)], new
    raise LoraFileError(f"tensor {key!r} is not a LoRA down/up weight; cannot rename it")


def denoiser_prefix(family: str | ModelFamily) -> str:
    """The denoiser's key prefix in diffusers' layout: its subfolder (``unet.``, ``transformer.``)."""
    return as_family(family).denoiser_subfolder + "."


def denoiser_prefixes() -> tuple[str, ...]:
    """Every registered family's denoiser prefix (``unet.`` always), for files whose family is unknown."""
    return tuple(sorted({DIFFUSERS_PREFIX, *(cls.denoiser_subfolder + "." for cls in FAMILIES.values())}))


def denoiser_word(family: str | ModelFamily) -> str:
    """How messages name the family's denoiser: "UNet", or its subfolder ("transformer")."""
    sub = as_family(family).denoiser_subfolder
    return "UNet" if sub == "unet" else sub


def file_denoiser_prefix(keys: Iterable[str]) -> str:
    """The denoiser prefix a diffusers/peft file's keys use (``unet.`` when none does)."""
    keys = [k for k in keys if not k.startswith(TE_DIFFUSERS_PREFIXES)]
    return next((p for p in denoiser_prefixes() if keys and all(k.startswith(p) for k in keys)), DIFFUSERS_PREFIX)


# -- diffusers ---------------------------------------------------------------------------------
def peft_to_diffusers(tensors: Mapping[str, torch.Tensor], prefix: str = DIFFUSERS_PREFIX) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        stem, suffix = _swap_suffix(k, DIFFUSERS_SUFFIXES)
        out[prefix + stem + suffix] = v
    return out


def diffusers_to_peft(tensors: Mapping[str, torch.Tensor], prefix: str | None = None) -> dict[str, torch.Tensor]:
    """peft tensors of a diffusers-layout file's denoiser (``prefix``: the file's own when None)."""
    prefix = prefix or file_denoiser_prefix(tensors)
    reverse = tuple((new, old) for old, new in DIFFUSERS_SUFFIXES)
    out = {}
    for k, v in tensors.items():
        if k.startswith(TE_DIFFUSERS_PREFIXES):
            continue  # a text encoder's: diffusers_text_encoders
        if not k.startswith(prefix):
            raise LoraFileError(
                f"tensor {k!r} is not a denoiser LoRA tensor (expected the prefix {prefix!r}); "
                "sdtune reads denoiser LoRAs in diffusers or kohya format"
            )
        stem, suffix = _swap_suffix(k[len(prefix):], reverse)
        out[stem + suffix] = v
    return out


# -- kohya -------------------------------------------------------------------------------------
def kohya_stem(module: KohyaModule) -> str:
    return KOHYA_PREFIX + module.name.replace(".", "_")


def _kohya_module(table: Mapping[str, KohyaModule], module: str, family: ModelFamily) -> KohyaModule:
    found = table.get(module)
    if found is None:
        raise LoraFileError(f"{family.name} has no kohya name for the module {module!r} (its kohya table covers the "
                            "original model's modules). Fix: write the diffusers layout (--format diffusers).")
    return found


def kohya_module_name(module: str, family: str | ModelFamily, denoiser_config: Mapping[str, Any] | None = None) -> str:
    """``lora_unet_...`` name of a diffusers denoiser module path, as A1111/ComfyUI expect it
    (a module the original model fuses gives the fused module's name)."""
    family = as_family(family)
    return kohya_stem(_kohya_module(family.kohya_modules(denoiser_config), module, family))


def peft_to_kohya(
    tensors: Mapping[str, torch.Tensor], alpha: float, family: str | ModelFamily,
    denoiser_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """kohya tensors of peft-named denoiser ``tensors`` trained at ``alpha``, named and fused by the
    family's :meth:`~sdtune.families.base.ModelFamily.kohya_modules` (:mod:`sdtune.lora.fused`)."""
    family = as_family(family)
    table = family.kohya_modules(denoiser_config)
    out: dict[str, torch.Tensor] = {}
    groups: dict[KohyaModule, dict[str, dict[str, torch.Tensor]]] = {}
    for k, v in tensors.items():
        stem, suffix = _swap_suffix(k, KOHYA_SUFFIXES)
        km = _kohya_module(table, stem, family)
        if (km.fused or km.swap_halves) and suffix not in (fused.DOWN, fused.UP):
            raise fused.refuse_variant(km, k)
        if km.fused:
            groups.setdefault(km, {}).setdefault(stem, {})[suffix] = v
            continue
        name = kohya_stem(km)
        out[name + suffix] = fused.swap_halves(v) if km.swap_halves and suffix == fused.UP else v
        out[name + KOHYA_ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)  # the true trained alpha
    for km, members in groups.items():
        incomplete = sorted(m for m, t in members.items() if len(t) != 2)
        if incomplete:
            raise LoraFileError(f"LoRA layer(s) {incomplete} lack a down or an up weight; cannot fuse {km.name}")
        parts = {m: (t[fused.DOWN], t[fused.UP]) for m, t in members.items()}
        name = kohya_stem(km)
        out[name + fused.DOWN], out[name + fused.UP] = fused.fuse(km, parts, name)
        out[name + KOHYA_ALPHA] = torch.tensor(float(alpha) * len(km.parts), dtype=torch.float32)
    return out


def _resolve_kohya(
    entries: Iterable[tuple[str, str, torch.Tensor]], lookup: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
    """peft tensors, per-module alphas and the unmatched file keys of kohya ``entries``
    ``(file key, name to look up, tensor)``, resolved through ``lookup`` (kohya name -> module)."""
    reverse = tuple((new, old) for old, new in KOHYA_SUFFIXES)
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, name, v in entries:
        if name.endswith(KOHYA_ALPHA):
            _check_alpha(key, v)
            module = lookup.get(name[: -len(KOHYA_ALPHA)])
            if module is not None:
                alphas[module] = float(v)
            continue
        stem, suffix = _swap_suffix(name, reverse)
        if stem not in lookup:
            unknown.append(key)
            continue
        out[lookup[stem] + suffix] = v
    return out, alphas, unknown


def _check_alpha(key: str, v: torch.Tensor) -> None:
    if v.numel() != 1:
        raise LoraFileError(f"tensor {key!r} should be one scalar alpha but has shape {list(v.shape)}")


def kohya_to_peft(
    tensors: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    family: str | ModelFamily,
    denoiser_config: Mapping[str, Any] | None = None,
    targets: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """peft tensors and per-module alphas of a kohya file's denoiser layers, resolved against ``module_names``.

    ``_`` in a kohya name is ambiguous (``transformer_blocks`` vs a path separator), so names are
    matched by computing the kohya name of every module the denoiser actually has. Fused modules
    split into their parts (:func:`sdtune.lora.fused.split`; an untrained part is dropped unless
    ``targets`` names it). Text-encoder layers (``lora_te*``) are left to :func:`kohya_text_encoder_tensors`.
    """
    family = as_family(family)
    table = family.kohya_modules(denoiser_config)
    lookup: dict[str, KohyaModule] = {}
    for m in module_names:
        km = table.get(m)
        if km is not None:
            lookup.setdefault(kohya_stem(km), km)
    reverse = tuple((new, old) for old, new in KOHYA_SUFFIXES)
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown, stems = [], {}
    for key, v in tensors.items():
        if key.startswith("lora_te"):
            continue
        if key.endswith(KOHYA_ALPHA):
            _check_alpha(key, v)
            continue
        stem, suffix = _swap_suffix(key, reverse)
        km = lookup.get(stem)
        if km is None:
            unknown.append(key)
        elif km.fused or km.swap_halves:
            if suffix not in (".lora_A.weight", ".lora_B.weight"):
                raise fused.refuse_variant(km, key)
            stems.setdefault(stem, {})[suffix] = v
        else:
            out[km.parts[0] + suffix] = v
            if (stem + KOHYA_ALPHA) in tensors:
                alphas[km.parts[0]] = float(tensors[stem + KOHYA_ALPHA])
    if unknown:
        raise LoraFileError(
            f"{len(unknown)} kohya tensor(s) match no module of this {family.name} {denoiser_word(family)}, "
            f"e.g. {sorted(unknown)[:3]}"
        )
    for stem, halves in stems.items():
        km = lookup[stem]
        if len(halves) != 2:
            raise LoraFileError(f"kohya module {stem} has a down or an up weight but not both; the LoRA is incomplete")
        alpha = float(tensors[stem + KOHYA_ALPHA]) if stem + KOHYA_ALPHA in tensors else None
        down, up = halves[".lora_A.weight"], halves[".lora_B.weight"]
        if not km.fused:  # swapped halves only
            parts = {km.parts[0]: (down, fused.swap_halves(up), alpha)}
        else:
            parts = fused.split(km, down, up, alpha, stem, keep=lambda m: any(m == t or m.endswith("." + t) for t in targets))
        for module, (a, b, part_alpha) in parts.items():
            out[module + ".lora_A.weight"], out[module + ".lora_B.weight"] = a.contiguous(), b.contiguous()
            if part_alpha is not None:
                alphas[module] = part_alpha
    return out, alphas


def kohya_fused_parts(tensors: Iterable[str], family: str | ModelFamily,
                      denoiser_config: Mapping[str, Any] | None = None) -> dict[str, int]:
    """How many diffusers modules each fused kohya module of a file of peft ``tensors`` stacks, keyed
    by its ``lora_unet_`` name with block numbers as ``#`` (:func:`block_pattern`): the header records
    it (``sdtune.kohya_parts``) so that rank and alpha are read per part without the base model."""
    family = as_family(family)
    table = family.kohya_modules(denoiser_config)
    out: dict[str, int] = {}
    for key in tensors:
        km = table.get(module_of_key(key))
        if km is not None and km.fused:
            out[block_pattern(kohya_stem(km))] = len(km.parts)
    return out


def module_of_key(key: str) -> str:
    """The module path of a peft tensor name (``<module>.lora_A.weight`` -> ``<module>``)."""
    return _swap_suffix(key, KOHYA_SUFFIXES)[0]


def block_pattern(stem: str) -> str:
    return re.sub(r"_\d+_", "_#_", stem)


def kohya_parts_of(key: str, kohya_parts: Mapping[str, int]) -> int:
    """How many diffusers modules the kohya module of tensor ``key`` stacks (1: not fused)."""
    if not kohya_parts or not key.startswith(KOHYA_PREFIX):
        return 1
    return kohya_parts.get(block_pattern(key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]), 1)


# -- layouts other tools write ----------------------------------------------------------------
#: The component a file's denoiser layers belong to (the others are text-encoder indices).
DENOISER = "denoiser"
#: Where a tensor of a peft-named file goes, by prefix (diffusers' ``save_lora_weights`` writes
#: ``unet.``/``transformer.``, ``text_encoder.``/``text_encoder_2.``; peft's ``save_pretrained`` writes
#: ``base_model.model.``; a bare ``<module>.lora_A.weight`` is a denoiser's own peft state); the
#: denoiser prefixes of :func:`denoiser_prefixes` come first.
PEFT_PREFIXES: tuple[tuple[str, str | int], ...] = (
    ("text_encoder_2.", 1), ("text_encoder.", 0), ("base_model.model.", DENOISER), ("", DENOISER),
)
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", MAGNITUDE)  # MAGNITUDE: DoRA (diffusers loads it)
#: kohya text-encoder prefixes: SD1.x has one encoder (lora_te_), SDXL two (lora_te1_ CLIP-L, lora_te2_ bigG)
KOHYA_TE_PREFIXES: tuple[tuple[str, int], ...] = (("lora_te1_", 0), ("lora_te2_", 1), ("lora_te_", 0))
#: Markers of layouts that are not plain LoRA, named so a refusal says what the file is.
#: (DoRA, LoHa and LoKr in kohya layout are read: :mod:`sdtune.lora.adapters`; their Tucker forms are not.)
OTHER_LAYOUTS: tuple[tuple[str, str], ...] = (
    (".hada_t1", "LyCORIS LoHa with Tucker decomposition (hada_t1)"), (".lokr_t2", "LyCORIS LoKr with Tucker decomposition (lokr_t2)"),
    (".lora_mid.weight", "LyCORIS LoCon with Tucker decomposition (lora_mid)"),
    (".a1.weight", "LyCORIS GLoRA"), (".oft_blocks", "OFT"),
    (".diff", "a full weight difference (LyCORIS diff)"), (".lora_linear_layer", "diffusers' retired attention-processor LoRA"),
)


def detect_format(keys: Iterable[str]) -> str:
    """'diffusers', 'peft' or 'kohya' from the tensor names; anything else is refused by name.

    'diffusers' is the layout sdtune and diffusers' training scripts wrote (``unet.<m>.lora.down.weight``);
    'peft' covers diffusers' current ``save_lora_weights`` (``unet.<m>.lora_A.weight``, with text
    encoders as ``text_encoder.``/``text_encoder_2.``) and peft's own files.
    """
    keys = list(keys)
    for marker, name in OTHER_LAYOUTS:  # a marker is a name part, so ".diff" does not hit "diffusion_model"
        # a text encoder's .lora_linear_layer. is diffusers' plain-LoRA text-encoder layout (DIFFUSERS_TE_SUFFIXES)
        hits = sorted(k for k in keys if (k.endswith(marker) or marker + "." in k or marker + "_" in k)
                      and not (marker == ".lora_linear_layer" and k.startswith(("text_encoder.", "text_encoder_2."))
                               and k.endswith(tuple(s for _, s in DIFFUSERS_TE_SUFFIXES))))
        if hits:
            raise LoraFileError(
                f"this is a {name} file (tensor names like {hits[:2]}); sdtune applies LoRA, DoRA, LoHa and LoKr "
                "(without Tucker factors) only. Use it in ComfyUI or A1111, which read it, or retrain it with sdtune."
            )
    unet_keys = [k for k in keys if not k.startswith(TE_DIFFUSERS_PREFIXES)]
    te_ok = all(k.endswith(tuple(s for _, s in DIFFUSERS_TE_SUFFIXES)) for k in keys if k not in unet_keys)
    prefix = file_denoiser_prefix(unet_keys)
    if unet_keys and te_ok and all(k.startswith(prefix) and k.endswith(tuple(s for _, s in DIFFUSERS_SUFFIXES))
                                   for k in unet_keys):
        return "diffusers"  # text encoders as diffusers' training scripts wrote them: .lora_linear_layer.down.weight
    if keys and all(k.endswith(PEFT_SUFFIXES) for k in keys):
        return "peft"
    if any(k.endswith(DORA_SCALE) for k in keys) and not any(k.startswith(KOHYA_PREFIX) for k in keys):
        raise LoraFileError(f"this is a DoRA file in a layout sdtune does not read (tensor names like {sorted(keys)[:2]}); "
                            "sdtune reads DoRA as kohya files (lora_unet_<module>.dora_scale) and peft/diffusers files "
                            "(<module>.lora_magnitude_vector). Use it in ComfyUI or A1111.")
    if keys and any(k.startswith(KOHYA_PREFIX) for k in keys) and all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    sample = sorted(keys)[:3]
    raise LoraFileError(
        f"unrecognised LoRA layout (tensor names like {sample}); sdtune reads kohya files "
        "(lora_unet_<module>.lora_down.weight, lora_te*_), diffusers files (unet.<module>.lora.down.weight or "
        "unet./transformer./text_encoder.<module>.lora_A.weight) and peft files (<module>.lora_A.weight)"
    )


def peft_components(tensors: Mapping[str, torch.Tensor]) -> dict[str | int, dict[str, torch.Tensor]]:
    """A 'peft' file's tensors per component, with the component prefix taken off."""
    prefixes = (*((p, DENOISER) for p in denoiser_prefixes()), *PEFT_PREFIXES)
    out: dict[str | int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        prefix, component = next((p, c) for p, c in prefixes if k.startswith(p))
        out.setdefault(component, {})[k[len(prefix):]] = v
    return out


def kohya_text_encoder_tensors(
    tensors: Mapping[str, torch.Tensor], module_names: Mapping[int, Iterable[str]]
) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """peft tensors and alphas of a kohya file's ``lora_te*`` layers, per text encoder index,
    resolved against each encoder's module names (``.`` -> ``_``, as kohya names them)."""
    groups: dict[int | None, list[tuple[str, str, torch.Tensor]]] = {}
    for k, v in tensors.items():
        if k.startswith("lora_te"):
            prefix, index = next(((p, i) for p, i in KOHYA_TE_PREFIXES if k.startswith(p)), ("", None))
            groups.setdefault(index, []).append((k, k[len(prefix):], v))
    out, unknown = {}, []
    for index, entries in groups.items():
        names = module_names.get(index, []) if index is not None else []
        names = list(names)  # kohya names CLIP layers under text_model_, also when transformers flattens it away
        lookup = {**{(CLIP_ROOT + m).replace(".", "_"): m for m in names}, **{m.replace(".", "_"): m for m in names}}
        layers, alphas, missed = _resolve_kohya(entries, lookup)
        unknown += missed
        if layers:
            out[index] = (layers, alphas)
    if unknown:
        raise LoraFileError(
            f"{len(unknown)} text-encoder tensor(s) match no layer of this model's text encoder(s), e.g. {sorted(unknown)[:3]}"
        )
    return out


# -- text encoders (sdtune.training.text_encoders) ------------------------------------------------------
#: peft suffix -> diffusers' text-encoder file suffix: ``text_encoder.<m>.lora_linear_layer.down.weight``
#: is what ``load_lora_weights`` (and ComfyUI's ``transformers_lora`` rule) reads for a text encoder;
#: the UNet's ``.lora.down.weight`` form is refused there ("Could not automatically infer state dict type").
DIFFUSERS_TE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.weight", ".lora_linear_layer.up.weight"),
)
#: transformers 5 flattens CLIPTextModel (``encoder.layers...``); files name CLIP layers as
#: ``text_model.encoder.layers...`` (kohya's lora_te_text_model_..., diffusers' text_encoder.text_model....).
CLIP_ROOT = "text_model."


def te_diffusers_prefix(index: int) -> str:
    """``text_encoder.`` for the first encoder, ``text_encoder_2.`` for SDXL's second (diffusers' names)."""
    return "text_encoder." if index == 0 else f"text_encoder_{index + 1}."


def te_kohya_prefix(index: int, count: int) -> str:
    """kohya's prefix: ``lora_te_`` with one encoder (SD1.x, Kolors), ``lora_te1_``/``lora_te2_`` with two (SDXL)."""
    return "lora_te_" if count == 1 else f"lora_te{index + 1}_"


def te_file_module(module: str, kind: str) -> str:
    """The on-disk path of a live text-encoder module: CLIP layers always under ``text_model.``."""
    return CLIP_ROOT + module if kind == "clip" and not module.startswith(CLIP_ROOT) else module


def te_live_module(module: str, encoder: torch.nn.Module) -> str:
    """An on-disk text-encoder module path as ``encoder`` names it (flattened CLIP: no ``text_model.``)."""
    return module[len(CLIP_ROOT):] if module.startswith(CLIP_ROOT) and not hasattr(encoder, "text_model") else module


def text_encoders_to_diffusers(encoders: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """peft-named text-encoder tensors (file module paths), per encoder index, in diffusers' layout."""
    out = {}
    for index, tensors in encoders.items():
        for k, v in tensors.items():
            stem, suffix = _swap_suffix(k, DIFFUSERS_TE_SUFFIXES)
            out[te_diffusers_prefix(index) + stem + suffix] = v
    return out


def text_encoders_to_kohya(encoders: Mapping[int, Mapping[str, torch.Tensor]], alpha: float, count: int) -> dict[str, torch.Tensor]:
    """The same in kohya's layout, with one ``.alpha`` scalar per module (the text-encoder alpha)."""
    out = {}
    for index, tensors in encoders.items():
        for k, v in tensors.items():
            stem, suffix = _swap_suffix(k, KOHYA_SUFFIXES)
            name = te_kohya_prefix(index, count) + stem.replace(".", "_")
            out[name + suffix] = v
            out[name + KOHYA_ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def diffusers_text_encoders(tensors: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """peft-named text-encoder tensors per encoder index of a diffusers-layout file (denoiser keys skipped)."""
    reverse = tuple((new, old) for old, new in DIFFUSERS_TE_SUFFIXES)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if not k.startswith(TE_DIFFUSERS_PREFIXES):
            continue  # the denoiser's (diffusers_to_peft)
        index = 1 if k.startswith(te_diffusers_prefix(1)) else 0
        stem, suffix = _swap_suffix(k[len(te_diffusers_prefix(index)):], reverse)
        out.setdefault(index, {})[stem + suffix] = v
    return out
