"""LoRA tensor names in every format we read or write, as explicit rule tables.

In memory LoRAs are always peft-named: ``<module>.lora_A.weight`` (down) and ``.lora_B.weight``
(up), where ``<module>`` is a diffusers UNet module path such as
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.

On disk:

* **diffusers** (what diffusers' training scripts write and ``load_lora_weights`` reads):
  ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``; alpha in the header.
* **kohya** (A1111, ComfyUI, Forge, kohya sd-scripts): ``lora_unet_<name>.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha`` per module. ``<name>`` is the module path with ``.``
  replaced by ``_``. For families with ``kohya_sgm_names`` (SDXL) it is the original SGM path
  (``input_blocks.4.1...``), as kohya sd-scripts writes it. Otherwise (SD1.x, Kolors) it is
  diffusers' own path: kohya's SD1.x convention, and for Kolors the one name form that both
  diffusers' KolorsPipeline and ComfyUI read (ComfyUI's key map accepts diffusers paths and
  original paths for every UNet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sdtune.families import ModelFamily, as_family
from sdtune.families.ldm_format import unet_block_prefixes
from sdtune.lora.adapters import DORA_SCALE, LYCORIS_SUFFIXES, MAGNITUDE
from sdtune.utils.errors import LoraFileError

DIFFUSERS_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"

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

#: The standard SDXL UNet layout, used when the base model's own config is not at hand.
STANDARD_XL_UNET = {
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def _swap_suffix(key: str, rules: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(stem, new suffix) for ``key`` under ``rules``."""
    for old, new in rules:
        if key.endswith(old):
            return key[: -len(old)], new
    raise LoraFileError(f"tensor {key!r} is not a LoRA down/up weight; cannot rename it")


# -- diffusers ---------------------------------------------------------------------------------
def peft_to_diffusers(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        stem, suffix = _swap_suffix(k, DIFFUSERS_SUFFIXES)
        out[DIFFUSERS_PREFIX + stem + suffix] = v
    return out


def diffusers_to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reverse = tuple((new, old) for old, new in DIFFUSERS_SUFFIXES)
    out = {}
    for k, v in tensors.items():
        if k.startswith(("text_encoder.", "text_encoder_2.")):
            continue  # a text encoder's: diffusers_text_encoders
        if not k.startswith(DIFFUSERS_PREFIX):
            raise LoraFileError(
                f"tensor {k!r} is not a UNet LoRA tensor (expected the prefix {DIFFUSERS_PREFIX!r}); "
                "sdtune reads UNet LoRAs in diffusers or kohya format"
            )
        stem, suffix = _swap_suffix(k[len(DIFFUSERS_PREFIX):], reverse)
        out[stem + suffix] = v
    return out


# -- kohya -------------------------------------------------------------------------------------
def kohya_module_name(module: str, family: str | ModelFamily, unet_config: Mapping[str, Any] | None = None) -> str:
    """``lora_unet_...`` name of a diffusers UNet module path, as A1111/ComfyUI expect it."""
    path = module
    if as_family(family).kohya_sgm_names:
        for src, dst, _inner in unet_block_prefixes(unet_config or STANDARD_XL_UNET):
            if module.startswith(src):
                path = dst + module[len(src):]
                break
    return KOHYA_PREFIX + path.replace(".", "_")


def peft_to_kohya(
    tensors: Mapping[str, torch.Tensor], alpha: float, family: str | ModelFamily, unet_config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    family = as_family(family)
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        stem, suffix = _swap_suffix(k, KOHYA_SUFFIXES)
        name = kohya_module_name(stem, family, unet_config)
        out[name + suffix] = v
        out[name + KOHYA_ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)  # the true trained alpha
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
            if v.numel() != 1:
                raise LoraFileError(f"tensor {key!r} should be one scalar alpha but has shape {list(v.shape)}")
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


def kohya_to_peft(
    tensors: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    family: str | ModelFamily,
    unet_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """peft tensors and per-module alphas of a kohya file's UNet layers, resolved against ``module_names``.

    ``_`` in a kohya name is ambiguous (``transformer_blocks`` vs a path separator), so names are
    matched by computing the kohya name of every module the UNet actually has. Text-encoder layers
    (``lora_te*``) are left to :func:`kohya_text_encoder_tensors`.
    """
    family = as_family(family)
    lookup = {kohya_module_name(m, family, unet_config): m for m in module_names}
    out, alphas, unknown = _resolve_kohya(((k, k, v) for k, v in tensors.items() if not k.startswith("lora_te")), lookup)
    if unknown:
        raise LoraFileError(
            f"{len(unknown)} kohya tensor(s) match no module of this {family.name} UNet, e.g. {sorted(unknown)[:3]}"
        )
    return out, alphas


# -- layouts other tools write ----------------------------------------------------------------
#: Where a tensor of a peft-named file goes, by prefix (diffusers' ``save_lora_weights`` writes
#: ``unet.``/``text_encoder.``/``text_encoder_2.``; peft's ``save_pretrained`` writes
#: ``base_model.model.``; a bare ``<module>.lora_A.weight`` is a UNet's own peft state).
#: A component is "unet" or the index of a text encoder.
PEFT_PREFIXES: tuple[tuple[str, str | int], ...] = (
    ("unet.", "unet"), ("text_encoder_2.", 1), ("text_encoder.", 0), ("base_model.model.", "unet"), ("", "unet"),
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
    unet_keys = [k for k in keys if not k.startswith(("text_encoder.", "text_encoder_2."))]
    te_ok = all(k.endswith(tuple(s for _, s in DIFFUSERS_TE_SUFFIXES)) for k in keys if k not in unet_keys)
    if unet_keys and te_ok and all(k.startswith(DIFFUSERS_PREFIX) and k.endswith(tuple(s for _, s in DIFFUSERS_SUFFIXES))
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
        "unet./text_encoder.<module>.lora_A.weight) and peft files (<module>.lora_A.weight)"
    )


def peft_components(tensors: Mapping[str, torch.Tensor]) -> dict[str | int, dict[str, torch.Tensor]]:
    """A 'peft' file's tensors per component, with the component prefix taken off."""
    out: dict[str | int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        prefix, component = next((p, c) for p, c in PEFT_PREFIXES if k.startswith(p))
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
    """peft-named text-encoder tensors per encoder index of a diffusers-layout file (UNet keys skipped)."""
    reverse = tuple((new, old) for old, new in DIFFUSERS_TE_SUFFIXES)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(DIFFUSERS_PREFIX):
            continue
        index = next((i for i in (1, 0) if k.startswith(te_diffusers_prefix(i))), None)
        if index is None:
            raise LoraFileError(f"tensor {k!r} belongs to neither the UNet nor a text encoder (unet., text_encoder., text_encoder_2.)")
        stem, suffix = _swap_suffix(k[len(te_diffusers_prefix(index)):], reverse)
        out.setdefault(index, {})[stem + suffix] = v
    return out
