"""Turn a training checkpoint, or a LoRA file, into a LoRA file in either format.

    python -m sdtune.export RUN/checkpoints/last.ckpt --out my_lora.safetensors
    python -m sdtune.export RUN/lora.safetensors --format kohya --out my_lora_webui.safetensors

No base weights are loaded. A checkpoint holds the LoRA tensors and the run's resolved config,
which is all a LoRA file needs; the same :func:`run_metadata` and tensor naming are used when a
run writes its own ``lora.safetensors``, so both files are identical. SDXL/Kolors kohya names need
the UNet's block layout, read from the base model's ``unet/config.json`` when it is reachable and
otherwise taken as the standard XL layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import LoraFileError, SdtuneError
from .families import get_family
from .lora import LoraSpec, lora_tensors, spec_from_config
from .lora_files import FORMATS, build_metadata, read_lora, save_lora


def run_metadata(cfg: Mapping[str, Any], spec: LoraSpec, *, steps: int | None, num_train_images: int | None, output_name: str) -> dict[str, str]:
    family = get_family(cfg["model"]["family"])
    return build_metadata(
        spec,
        family=family.name,
        base_model=str(cfg["model"]["path"]),
        base_model_version=family.base_model_version,
        resolution=int(cfg["data"]["resolution"]),
        config=cfg,
        output_name=output_name,
        num_train_images=num_train_images,
        steps=steps,
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` (no arbitrary pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LoraFileError(
            f"{str(path)!r} is not a readable sdtune checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "It may be truncated; use another checkpoint from the run's checkpoints/ folder."
        ) from err
    if not isinstance(ckpt, dict) or "sdtune" not in ckpt or "hyper_parameters" not in ckpt:
        raise LoraFileError(f"{str(path)!r} is not an sdtune training checkpoint (no 'sdtune' section).")
    return ckpt


def unet_config_for(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The base UNet's config.json (no weights), or None when it cannot be read offline."""
    if not cfg:
        return None
    from diffusers import UNet2DConditionModel

    try:
        return dict(UNet2DConditionModel.load_config(str(cfg["model"]["path"]), subfolder="unet", local_files_only=True))
    except Exception:
        return None


def unet_module_names(config: Mapping[str, Any]) -> list[str]:
    """Module paths of a UNet built from ``config`` on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [n for n, _ in unet.named_modules()]


def export_checkpoint(ckpt_path: str | Path, out: str | Path, *, format: str = "diffusers") -> Path:
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["hyper_parameters"]["cfg"]
    family = get_family(cfg["model"]["family"])
    spec = spec_from_config(cfg["lora"], family.default_lora_targets)
    tensors = lora_tensors(ckpt["state_dict"])
    if not tensors:
        raise LoraFileError(f"{str(ckpt_path)!r} holds no LoRA tensors")
    meta = run_metadata(
        cfg,
        spec,
        steps=int(ckpt.get("global_step", 0)),
        num_train_images=ckpt["sdtune"].get("num_train_images"),
        output_name=Path(out).stem,
    )
    config = unet_config_for(cfg) if format == "kohya" else None
    return save_lora(out, tensors, meta, format=format, unet_config=config)


def export_lora(lora_path: str | Path, out: str | Path, *, format: str) -> Path:
    """Re-write a LoRA file in ``format`` (diffusers <-> kohya), keeping its header."""
    lora = read_lora(lora_path)
    config = unet_config_for(lora.config)
    if lora.format == "diffusers":
        tensors = lora.tensors
    elif config is None:
        raise LoraFileError(
            f"{str(lora_path)!r} is a kohya file; resolving its names needs the base model's UNet config, "
            "which is not reachable offline. Export from the training checkpoint instead."
        )
    else:
        tensors = lora.peft_tensors(unet_module_names(config), config)
    meta = dict(lora.metadata)
    meta["ss_output_name"] = Path(out).stem
    meta.setdefault("sdtune.alpha", repr(float(lora.spec.alpha)))
    meta.setdefault("sdtune.family", lora.family or "sd15")
    if format == "diffusers" and "lora_adapter_metadata" not in meta:
        from .lora_files import DIFFUSERS_METADATA_KEY

        meta[DIFFUSERS_METADATA_KEY] = build_metadata(
            lora.spec if lora.spec.targets else LoraSpec(lora.spec.rank, lora.spec.alpha, _targets_of(tensors)),
            family=meta["sdtune.family"], base_model="", base_model_version="", resolution=0,
        )[DIFFUSERS_METADATA_KEY]
    return save_lora(out, tensors, meta, format=format, unet_config=config)


def _targets_of(tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    return tuple(sorted({k.rsplit(".lora_", 1)[0] for k in tensors}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a .ckpt written by `python -m sdtune`, or a LoRA .safetensors")
    parser.add_argument("--format", choices=FORMATS, default="diffusers",
                        help="diffusers (load_lora_weights) or kohya (A1111, ComfyUI, Forge)")
    parser.add_argument("--out", help="output .safetensors (default: beside the source, suffixed with the format)")
    args = parser.parse_args(argv)
    source = Path(args.source)
    default = source.with_name(f"{source.stem}{'' if args.format == 'diffusers' and source.suffix == '.ckpt' else '_' + args.format}.safetensors")
    out = Path(args.out) if args.out else default
    if out.resolve() == source.resolve():
        print(f"error: --out {out} would overwrite the source; choose another name", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        if source.suffix == ".safetensors":
            export_lora(source, out, format=args.format)
        else:
            export_checkpoint(source, out, format=args.format)
    except SdtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}) in {time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
