"""LoRA ``.safetensors`` files: header metadata, safe reading and writing (applying them to a
model is :mod:`sdtune.lora.apply`).

Name rules for each on-disk format live in :mod:`sdtune.lora.keys`. Files carry the true alpha:
diffusers files under diffusers' ``lora_adapter_metadata`` header key, kohya files as a scalar
``.alpha`` per module (diffusers' own kohya converter writes alpha = rank; we do not). Beside it
sit our ``sdtune.*`` keys and the common kohya ``ss_*`` keys.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtune.families import FAMILIES, ModelFamily, get_family
from sdtune.lora.adapters import DORA_READERS, NAMES, dora_note, to_kohya_maths
from sdtune.lora.checks import (
    NONFINITE_FIX,
    check_finite,
    first_line,
    nonfinite_tensors,
    not_safetensors,
)
from sdtune.lora.header import (
    ALPHA_IN_TENSORS,
    COMPONENT_PREFIX,
    DIFFUSERS_METADATA_KEY,
    KOHYA_PARTS,
    kohya_parts_header,
    run_config,
    spec_from_header,
    text_encoder_spec_from_header,
)
from sdtune.lora.keys import (
    DENOISER,
    denoiser_prefix,
    denoiser_prefixes,
    detect_format,
    diffusers_to_peft,
    kohya_fused_parts,
    kohya_to_peft,
    peft_components,
    peft_to_diffusers,
    peft_to_kohya,
    te_diffusers_prefix,
    text_encoders_to_diffusers,
    text_encoders_to_kohya,
)
from sdtune.lora.layers import LoraSpec, text_encoder_spec
from sdtune.utils.errors import LoraFileError
from sdtune.utils.io import atomic_path

log = logging.getLogger(__name__)
FORMATS = ("diffusers", "kohya")  # what we write; we also read "peft" (diffusers' current save_lora_weights, peft)
# What runs and export write unless told otherwise, per family (ModelFamily.default_export_format):
# for the UNet families the kohya layout, which loads as it is in ComfyUI, A1111/Forge, kohya
# sd-scripts and diffusers (their diffusers layout loads in diffusers only).
DEFAULT_FORMAT = "kohya"


def default_format(family: str | ModelFamily | None) -> str:
    """The layout a run or export of ``family`` writes when no format is named."""
    return DEFAULT_FORMAT if family is None else (family if isinstance(family, ModelFamily) else get_family(family)
                                                   ).default_export_format


def alpha_in_tensors(family: str, spec: LoraSpec, format: str) -> bool:
    """Whether a ``format`` file of ``family`` holds ``spec``'s alpha/rank in its lora_B tensors."""
    return format in ("diffusers", "peft") and get_family(family).bake_diffusers_alpha and spec.alpha != spec.rank


@dataclass
class LoraFile:
    """A LoRA read back from disk, in the names it was stored with, plus what its header says."""

    raw: dict[str, torch.Tensor]
    format: str
    spec: LoraSpec
    family: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # where it was read from, for error messages
    spec_declared: bool = False  # rank and alpha come from a header, not from the tensors
    text_encoder: LoraSpec | None = None  # sdtune's text-encoder LoRA header (sdtune.text_encoder), if any

    @property
    def alpha_in_tensors(self) -> bool:
        """The file's lora_B tensors hold alpha/rank (its diffusers header says alpha = rank)."""
        return self.metadata.get(ALPHA_IN_TENSORS) == "true"

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """peft-named denoiser tensors as trained (alpha/rank taken back out of lora_B where the file
        holds it there); kohya names need the denoiser to resolve (see :meth:`peft_tensors`)."""
        if self.format == "diffusers":
            tensors = diffusers_to_peft(self.raw)
        elif self.format == "peft":
            tensors = peft_components(self.raw).get(DENOISER, {})
        else:
            raise LoraFileError("kohya tensor names are resolved against a denoiser; use peft_tensors(module_names, ...)")
        if self.alpha_in_tensors:
            scale = self.spec.rank / self.spec.alpha
            tensors = {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in tensors.items()}
        return tensors

    def peft_tensors(self, module_names, denoiser_config=None, family: str | None = None) -> dict[str, torch.Tensor]:
        """peft names; a kohya file's names resolve against ``module_names`` of a ``family`` denoiser
        (its header's family, else the one it is being loaded into)."""
        if self.format != "kohya":
            return self.tensors
        family = self.family or family
        if family is None:
            raise LoraFileError(
                f"{self.path or 'this LoRA'!r} is a kohya file that does not record its model family (no sdtune.family "
                f"in its header), and kohya names differ per family. Fix: name the family (export: --family "
                f"{'|'.join(sorted(FAMILIES))})."
            )
        return kohya_to_peft(self.raw, module_names, family, denoiser_config, self.spec.targets)[0]

    @property
    def config(self) -> dict[str, Any] | None:
        """The training run's resolved config from the ``sdtune.config`` header, or None."""
        return run_config(self.metadata, self.path or "<LoRA>")


# Keys sdtune manages; a re-export carries every other key of the source file over unchanged.
# sdtune.rank/alpha: written by sdtune before the header was built from one LoraSpec; dropped on re-export.
MANAGED_KEYS = frozenset({
    "format", DIFFUSERS_METADATA_KEY, "sdtune.format", "sdtune.family", "sdtune.targets", "sdtune.rank", "sdtune.alpha",
    "sdtune.text_encoder",
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name", "sdtune.adapter", "ss_network_args",
    "sdtune.dora_readers", ALPHA_IN_TENSORS, "modelspec.architecture", KOHYA_PARTS,
})


@dataclass(frozen=True)
class LoraHeader:
    """What a LoRA file's header records, built from the spec itself (never from header strings).

    Each fact has one machine-read place per format: a diffusers file keeps rank, alpha and targets
    in diffusers' ``lora_adapter_metadata`` (what ``load_lora_weights`` reads); a kohya file keeps
    rank and alpha in its tensors (what ComfyUI and A1111 read) and the targets in
    ``sdtune.targets``. ``ss_network_dim``/``ss_network_alpha`` repeat them for display, as kohya
    files always do (A1111's and model sites' LoRA info panels show them).
    """

    spec: LoraSpec
    family: str
    base_model: str | None = None
    base_model_version: str | None = None
    architecture: str | None = None  # modelspec.architecture (kohya's sai_model_spec string), when known
    resolution: int | None = None
    config: Mapping[str, Any] | None = None
    output_name: str = "lora"
    num_train_images: int | None = None
    steps: int | None = None
    carried: Mapping[str, str] = field(default_factory=dict)  # a source file's other keys, kept on re-export
    text_encoder: LoraSpec | None = None  # the text encoders' LoRA (lora.text_encoder), when the file has one

    def metadata(self, format: str, kohya_parts: Mapping[str, int] | None = None) -> dict[str, str]:
        """The header as safetensors stores it (every value a string) for a ``format`` file
        (``kohya_parts``: its fused kohya modules, :func:`sdtune.lora.keys.kohya_fused_parts`)."""
        spec = self.spec
        meta = {k: v for k, v in self.carried.items() if k not in MANAGED_KEYS}
        lycoris = spec.kind in ("loha", "lokr")
        meta.update({"format": "pt", "sdtune.format": format, "sdtune.family": self.family, "sdtune.adapter": spec.kind,
                     "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora", "ss_network_dim": str(spec.rank),
                     "ss_network_alpha": repr(float(spec.alpha)), "ss_output_name": self.output_name})
        te = self.text_encoder
        if te is not None:
            meta["sdtune.text_encoder"] = json.dumps({"rank": te.rank, "alpha": te.alpha, "targets": list(te.targets)})
        if spec.kind != "lora":  # how LyCORIS records its algorithm (shown by A1111's and model sites' info panels)
            meta["ss_network_args"] = json.dumps({"algo": spec.kind} if lycoris else {"dora_wd": True, "wd_on_out": True})
        if spec.use_dora:  # which tools apply this file exactly, as a plain LoRA, or wrongly (A1111 shows the header)
            layout = "diffusers" if format in ("diffusers", "peft") else "kohya"
            meta["sdtune.dora_readers"] = json.dumps({k: list(v) for k, v in DORA_READERS[layout].items()})
        if format in ("diffusers", "peft"):
            prefix, baked = denoiser_prefix(self.family), alpha_in_tensors(self.family, spec, format)
            adapters = {f"{prefix}r": spec.rank, f"{prefix}lora_alpha": spec.rank if baked else spec.alpha,
                        f"{prefix}target_modules": list(spec.targets)}
            if baked:  # lora_B holds alpha/rank; the true alpha for sdtune and re-export
                meta.update({"sdtune.alpha": repr(float(spec.alpha)), ALPHA_IN_TENSORS: "true"})
            if spec.use_dora:
                adapters[f"{prefix}use_dora"] = True
            family = get_family(self.family)  # the encoders that take LoRA layers (never a T5)
            for index in family.text_encoders_with_lora() if te is not None else ():
                prefix = te_diffusers_prefix(index)  # what load_lora_weights reads per text encoder
                adapters.update({f"{prefix}r": te.rank, f"{prefix}lora_alpha": te.alpha, f"{prefix}target_modules": list(te.targets)})
            meta[DIFFUSERS_METADATA_KEY] = json.dumps(adapters, sort_keys=True)
        elif spec.targets:  # diffusers refuses a kohya file that carries peft adapter metadata
            meta["sdtune.targets"] = json.dumps(list(spec.targets))
        if kohya_parts:
            meta[KOHYA_PARTS] = json.dumps(dict(kohya_parts), sort_keys=True)
        optional = {"sdtune.base_model": self.base_model, "ss_base_model_version": self.base_model_version,
                    "modelspec.architecture": self.architecture,
                    "sdtune.resolution": self.resolution, "ss_num_train_images": self.num_train_images, "ss_steps": self.steps}
        meta.update({k: str(v) for k, v in optional.items() if v is not None})
        if self.resolution is not None:
            meta["ss_resolution"] = f"({self.resolution}, {self.resolution})"
        if self.config is not None:
            meta["sdtune.config"] = json.dumps(self.config, sort_keys=True, default=str)
        return meta


def run_header(cfg: Mapping[str, Any], spec: LoraSpec, *, steps: int | None, num_train_images: int | None,
               output_name: str, denoiser_config: Mapping[str, Any] | None = None) -> LoraHeader:
    """The header of a LoRA trained with run config ``cfg`` on a denoiser of ``denoiser_config``
    (None: not at hand; the family's version and architecture strings may depend on it)."""
    family = get_family(cfg["model"]["family"])
    return LoraHeader(spec, family.name, base_model=str(cfg["model"]["path"]),
                      base_model_version=family.lora_base_model_version(denoiser_config),
                      architecture=family.lora_architecture(denoiser_config), resolution=int(cfg["data"]["resolution"]), config=cfg, output_name=output_name,
                      num_train_images=num_train_images, steps=steps, text_encoder=text_encoder_spec(cfg, family))


def save_lora(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    header: LoraHeader,
    *,
    format: str,
    denoiser_config: Mapping[str, Any] | None = None,
    text_encoders: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write peft-named ``tensors`` in ``format`` with ``header``, atomically. kohya names follow
    the family's table for a denoiser of ``denoiser_config`` (its standard layout when None).
    ``text_encoders``: peft-named text-encoder tensors per encoder index (``header.text_encoder``'s).

    Families with :attr:`~sdtune.families.base.ModelFamily.bake_diffusers_alpha` fold alpha/rank into
    the diffusers layout's lora_B when alpha != rank (:func:`alpha_in_tensors`).

    DoRA: ``format="diffusers"`` writes diffusers' peft layout (``unet.<m>.lora_magnitude_vector``,
    what ``load_lora_weights`` reads); kohya's ``dora_scale`` is relative to the frozen weights, so
    ``base_weights`` (module path -> weight) must be given. LoHa/LoKr: kohya only."""
    from safetensors.torch import save_file

    path = Path(path)
    text_encoders = {i: t for i, t in (text_encoders or {}).items() if t}
    if text_encoders and header.text_encoder is None:
        raise LoraFileError(f"refusing to write {str(path)!r}: text-encoder tensors without their rank and alpha (header.text_encoder)")
    bad = nonfinite_tensors({**tensors, **{f"text_encoder{i}.{k}": v for i, t in text_encoders.items() for k, v in t.items()}})
    if bad:  # a NaN LoRA renders black images everywhere it is loaded: never write one
        names, count = bad
        raise LoraFileError(
            f"refusing to write {str(path)!r}: the LoRA holds non-finite values: {len(names)} tensor(s), "
            f"{count} value(s) NaN/Inf, e.g. {', '.join(names[:3])}. Nothing was written. Fix: {NONFINITE_FIX}"
        )
    spec = header.spec
    if format == "diffusers" and spec.kind in ("loha", "lokr"):
        raise LoraFileError(
            f"cannot write {str(path)!r} in the diffusers layout: it is a {NAMES[spec.kind]} "
            "(lora.type), which diffusers' load_lora_weights cannot load. Nothing was written. Fix: write the kohya "
            "layout (--format kohya, callbacks.lora_export.format=kohya), which ComfyUI, Forge and A1111 load."
        )
    prefix = denoiser_prefix(header.family)
    if alpha_in_tensors(header.family, spec, format):
        scale = float(spec.alpha) / spec.rank
        tensors = {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in tensors.items()}
    if format == "diffusers" and spec.use_dora:
        on_disk, format = {prefix + k: v for k, v in tensors.items()}, "peft"
    elif format == "diffusers":
        on_disk = {**peft_to_diffusers(tensors, prefix), **text_encoders_to_diffusers(text_encoders)}
    elif format == "kohya":
        tensors = to_kohya_maths(tensors, spec.rank, float(spec.alpha), base_weights) if spec.kind != "lora" else tensors
        count = len(get_family(header.family).text_encoder_kinds)
        on_disk = {**peft_to_kohya(tensors, float(spec.alpha), header.family, denoiser_config),
                   **(text_encoders_to_kohya(text_encoders, float(header.text_encoder.alpha), count) if text_encoders else {})}
    else:
        raise LoraFileError(f"unknown LoRA format {format!r}; choose one of {list(FORMATS)}")
    on_disk = {k: v.detach().to("cpu").contiguous() for k, v in on_disk.items()}
    fused = kohya_fused_parts(tensors, header.family, denoiser_config) if format == "kohya" else None
    with atomic_path(path) as tmp:
        save_file(on_disk, str(tmp), metadata=header.metadata(format, fused))
    if spec.use_dora:
        log.warning("%s: %s", path.name, dora_note(format))
    return path


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file through safetensors only (no pickle), with clear errors for bad files.

    Everything a LoRA's consumers rely on is checked here, once, so that ``generate``, ``merge``
    and ``export`` all refuse the same files with the same message: the file must be a readable
    .safetensors file of finite values, its header values must parse, and the header must agree
    with the tensors (rank, alpha, targets, format).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise LoraFileError(
            f"LoRA file {str(path)!r} is a folder, not a file. Fix: name the .safetensors file itself "
            "(a training run writes <run folder>/lora.safetensors)."
        )
    if not path.is_file():
        raise LoraFileError(f"LoRA file {str(path)!r} does not exist")
    what = not_safetensors(path)
    if what:
        raise LoraFileError(
            f"{str(path)!r} is not a readable .safetensors file: it is {what}. sdtune reads LoRAs only as "
            ".safetensors. Fix: pass the LoRA's .safetensors file; for an sdtune training checkpoint run "
            "`python -m sdtune.export CHECKPOINT --out FILE.safetensors`."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            raw = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError and plain OSErrors
        raise LoraFileError(
            f"{str(path)!r} is not a readable .safetensors file ({first_line(err)}). It may be truncated or in "
            "another format; re-export it with `python -m sdtune.export CHECKPOINT --out FILE`."
        ) from err
    try:
        fmt = detect_format(raw)
    except LoraFileError as err:
        raise LoraFileError(f"{str(path)!r}: {err}") from None
    check_finite(raw, str(path))
    if fmt == "peft" and DIFFUSERS_METADATA_KEY not in metadata:
        metadata.update(peft_adapter_config(path))
    run_config(metadata, str(path))  # refuse a garbled run config now, not halfway through a command
    parts = kohya_parts_header(metadata, path) if fmt == "kohya" else {}
    spec = spec_from_header(metadata, raw, fmt, path, kohya_parts=parts)
    adapter = json.loads(metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
    declared = "sdtune.alpha" in metadata or any(f"{p}lora_alpha" in adapter for p in denoiser_prefixes())
    return LoraFile(raw=raw, format=fmt, spec=spec, family=metadata.get("sdtune.family"), metadata=metadata, path=str(path),
                    text_encoder=text_encoder_spec_from_header(metadata, path),
                    spec_declared=declared)


def peft_adapter_config(path: Path) -> dict[str, str]:
    """peft's ``save_pretrained`` keeps rank and alpha in ``adapter_config.json`` beside the weights,
    not in them: read it as the diffusers header entry it corresponds to (empty when absent)."""
    config_path = path.parent / "adapter_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise LoraFileError(f"{str(config_path)!r} beside {str(path)!r} is not a readable peft adapter config ({err}). "
                            "Fix: restore it, or remove it to load the LoRA with alpha = rank.") from None
    keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
    if not isinstance(config, dict) or not {"r", "lora_alpha"} <= config.keys():
        raise LoraFileError(f"{str(config_path)!r} has no 'r' and 'lora_alpha'; it is not a peft LoRA adapter config.")
    return {DIFFUSERS_METADATA_KEY: json.dumps({f"{COMPONENT_PREFIX}{k}": config[k] for k in keys if config.get(k) is not None})}


def check_family(lora: LoraFile, family: str, path: str | os.PathLike) -> None:
    """Refuse a LoRA trained for another model family, by its header rather than by shape luck."""
    if lora.family is not None and lora.family != family:
        raise LoraFileError(
            f"{str(path)!r} is a {lora.family} LoRA but the base model is {family}. "
            f"Fix: load it onto a {lora.family} base model (model={lora.family} or a matching model.path)."
        )
