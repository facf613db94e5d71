"""Turn a training checkpoint into a LoRA ``.safetensors`` file, without loading the base model.

    python -m sdtune.export RUN/checkpoints/last.ckpt --out my_lora.safetensors

The checkpoint holds the LoRA tensors and the run's resolved config, which is all a LoRA file
needs; the same :func:`run_metadata` and tensor naming are used when a run writes its own
``lora.safetensors``, so both files are identical.
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
from .lora_files import build_metadata, save_lora


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


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
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
    return save_lora(out, tensors, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by `python -m sdtune`")
    parser.add_argument("--out", help="output .safetensors (default: beside the checkpoint)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".safetensors")
    start = time.perf_counter()
    try:
        export_checkpoint(args.checkpoint, out)
    except SdtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
