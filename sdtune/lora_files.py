"""LoRA ``.safetensors`` files: key naming rules, header metadata, safe reading and writing.

In memory we always hold peft-named tensors (``<module>.lora_A.weight``). On disk the default
"diffusers" layout is what diffusers' own training scripts write and ``load_lora_weights`` reads:
``unet.<module>.lora.down.weight`` / ``.lora.up.weight``. The true alpha travels in the header
under diffusers' ``lora_adapter_metadata`` key, so a LoRA trained with alpha != rank loads with the
right scale; our own ``sdtune.*`` keys and the common kohya ``ss_*`` keys sit beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LoraFileError
from .io import atomic_path
from .lora import LoraSpec

COMPONENT_PREFIX = "unet."

#: peft tensor-name suffix -> diffusers-file suffix. Applied after the component prefix.
DIFFUSERS_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora.down.weight"),
    (".lora_B.weight", ".lora.up.weight"),
)

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def _swap_suffix(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        if key.endswith(old):
            return key[: -len(old)] + new
    raise LoraFileError(f"tensor {key!r} is not a LoRA down/up weight; cannot rename it")


def peft_to_diffusers(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {COMPONENT_PREFIX + _swap_suffix(k, DIFFUSERS_SUFFIXES): v for k, v in tensors.items()}


def diffusers_to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reverse = tuple((new, old) for old, new in DIFFUSERS_SUFFIXES)
    out = {}
    for k, v in tensors.items():
        if not k.startswith(COMPONENT_PREFIX):
            raise LoraFileError(
                f"tensor {k!r} is not a UNet LoRA tensor (expected the prefix {COMPONENT_PREFIX!r}); "
                "sdtune reads LoRA files it wrote itself or diffusers-format UNet LoRAs"
            )
        out[_swap_suffix(k[len(COMPONENT_PREFIX):], reverse)] = v
    return out


@dataclass
class LoraFile:
    """A LoRA read back from disk: peft-named tensors plus what the header says about them."""

    tensors: dict[str, torch.Tensor]
    spec: LoraSpec
    family: str | None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any] | None:
        raw = self.metadata.get("sdtune.config")
        return json.loads(raw) if raw else None


def build_metadata(
    spec: LoraSpec,
    *,
    family: str,
    base_model: str,
    base_model_version: str,
    resolution: int,
    config: Mapping[str, Any] | None = None,
    output_name: str = "lora",
    num_train_images: int | None = None,
    steps: int | None = None,
) -> dict[str, str]:
    """Header metadata (all values are strings, as safetensors requires)."""
    meta = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(
            {
                f"{COMPONENT_PREFIX}r": spec.rank,
                f"{COMPONENT_PREFIX}lora_alpha": spec.alpha,
                f"{COMPONENT_PREFIX}target_modules": list(spec.targets),
            },
            sort_keys=True,
        ),
        "sdtune.format": "diffusers",
        "sdtune.family": family,
        "sdtune.base_model": base_model,
        "sdtune.rank": str(spec.rank),
        "sdtune.alpha": repr(float(spec.alpha)),
        "sdtune.targets": json.dumps(list(spec.targets)),
        "sdtune.resolution": str(resolution),
        # The kohya/A1111 subset that model sites and WebUIs display.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": repr(float(spec.alpha)),
        "ss_base_model_version": base_model_version,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_output_name": output_name,
    }
    if num_train_images is not None:
        meta["ss_num_train_images"] = str(num_train_images)
    if steps is not None:
        meta["ss_steps"] = str(steps)
    if config is not None:
        meta["sdtune.config"] = json.dumps(config, sort_keys=True, default=str)
    return meta


def save_lora(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write peft-named ``tensors`` as a diffusers-format LoRA file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    on_disk = {k: v.detach().to("cpu").contiguous() for k, v in peft_to_diffusers(tensors).items()}
    with atomic_path(path) as tmp:
        save_file(on_disk, str(tmp), metadata=dict(metadata))
    return path


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file through safetensors only (no pickle), with clear errors for bad files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            raw = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError and plain OSErrors
        raise LoraFileError(
            f"{str(path)!r} is not a readable .safetensors file ({err}). It may be truncated or in "
            "another format; re-export it with `python -m sdtune.export CHECKPOINT --out FILE`."
        ) from err
    tensors = diffusers_to_peft(raw)
    return LoraFile(tensors=tensors, spec=_spec_from(metadata, tensors, path), family=metadata.get("sdtune.family"), metadata=metadata)


def _spec_from(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor], path: Path) -> LoraSpec:
    if "sdtune.rank" in metadata:
        return LoraSpec(
            rank=int(metadata["sdtune.rank"]),
            alpha=float(metadata["sdtune.alpha"]),
            targets=tuple(json.loads(metadata["sdtune.targets"])),
        )
    if DIFFUSERS_METADATA_KEY in metadata:
        m = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        return LoraSpec(
            rank=int(m[f"{COMPONENT_PREFIX}r"]),
            alpha=float(m[f"{COMPONENT_PREFIX}lora_alpha"]),
            targets=tuple(m[f"{COMPONENT_PREFIX}target_modules"]),
        )
    downs = [v for k, v in tensors.items() if k.endswith(".lora_A.weight")]
    if not downs:
        raise LoraFileError(f"{str(path)!r} holds no LoRA down weights")
    rank = int(downs[0].shape[0])  # no header: diffusers' own convention is alpha = rank
    return LoraSpec(rank=rank, alpha=float(rank), targets=())


def check_family(lora: LoraFile, family: str, path: str | os.PathLike) -> None:
    """Refuse a LoRA trained for another model family, by its header rather than by shape luck."""
    if lora.family is not None and lora.family != family:
        raise LoraFileError(
            f"{str(path)!r} is a {lora.family} LoRA but the base model is {family}. "
            f"Fix: load it onto a {lora.family} base model (model={lora.family} or a matching model.path)."
        )


def apply_lora(unet: torch.nn.Module, lora: LoraFile, *, family: str, path: str | os.PathLike, adapter_name: str) -> None:
    """Add ``lora`` to ``unet`` as peft adapter ``adapter_name``, refusing anything that does not fit.

    The family is checked from the header first, so an SD1.5 LoRA on SDXL is named as such rather
    than surfacing as a tensor shape error. Missing or extra keys are listed, never ignored.
    """
    from peft.utils import set_peft_model_state_dict

    from .lora import inject

    check_family(lora, family, path)
    inject(unet, lora.spec, adapter_name=adapter_name)
    try:
        result = set_peft_model_state_dict(unet, lora.tensors, adapter_name=adapter_name)
    except RuntimeError as err:  # size mismatch
        unet.delete_adapters(adapter_name)
        first = str(err).strip().splitlines()
        raise LoraFileError(
            f"{str(path)!r} does not fit this {family} UNet: {first[-1] if first else err}. "
            "Was it trained on a different base model?"
        ) from None
    unexpected = sorted(k for k in result.unexpected_keys if ".lora_" in k)
    missing = sorted(k for k in result.missing_keys if ".lora_" in k and f".{adapter_name}." in k)
    if unexpected or missing:
        unet.delete_adapters(adapter_name)
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) match no module of this UNet, e.g. {unexpected[:3]}")
        if missing:
            parts.append(f"{len(missing)} LoRA layer(s) of its targets are absent from the file, e.g. {missing[:3]}")
        raise LoraFileError(f"{str(path)!r} does not match this {family} UNet: " + "; ".join(parts) + ".")
