"""Turn a training checkpoint, or a LoRA file, into a LoRA file in either format.

    python -m sdtune.export RUN/checkpoints/last.ckpt --out my_lora.safetensors
    python -m sdtune.export RUN/lora.safetensors --format kohya --out my_lora_webui.safetensors

No base weights are loaded. A checkpoint holds the LoRA tensors and the run's resolved config,
which is all a LoRA file needs; the same :func:`run_header` and tensor naming are used when a
run writes its own ``lora.safetensors``, so both files are identical. The layout defaults to the
family's (``default_export_format``). kohya names of SDXL and the flow transformers need the
denoiser's block layout, read from the base model's denoiser ``config.json`` when it is reachable
and otherwise taken as the family's standard layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdtune.families import FAMILIES, get_family
from sdtune.families.arch import architecture
from sdtune.lora.adapters import NAMES, base_weights_from, dora_as_lora, kind_of, module_of
from sdtune.lora.checks import TEXT_ENCODER_KEYS, check_finite, check_tensors_match, first_line
from sdtune.lora.files import FORMATS, LoraHeader, default_format, read_lora, run_header, save_lora
from sdtune.lora.header import kohya_parts_header
from sdtune.lora.keys import kohya_parts_of
from sdtune.lora.layers import lora_tensors, spec_from_config
from sdtune.training.checkpointing import CHECKPOINT_FIX, load_checkpoint
from sdtune.training.ema import checkpoint_export_tensors, with_ema_facts
from sdtune.training.text_encoders import (
    check_text_encoder_tensors,
    checkpoint_text_encoder_state,
    file_text_encoder_tensors,
)
from sdtune.utils.errors import LoraFileError, SdtuneError


def denoiser_config_for(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The base denoiser's config.json (no weights), or None when it cannot be read offline."""
    if not cfg:
        return None
    import diffusers

    try:
        family = get_family(cfg["model"]["family"])
        cls = getattr(diffusers, family.denoiser_class)
        return dict(cls.load_config(str(cfg["model"]["path"]), subfolder=family.denoiser_subfolder, local_files_only=True))
    except Exception:
        return None


def denoiser_module_names(config: Mapping[str, Any], family: str) -> list[str]:
    """Module paths of ``family``'s denoiser built from ``config`` on the meta device (no memory, no weights)."""
    import diffusers

    with torch.device("meta"):
        denoiser = getattr(diffusers, get_family(family).denoiser_class).from_config(config)
    return [n for n, _ in denoiser.named_modules()]


def export_checkpoint(ckpt_path: str | Path, out: str | Path, *, format: str | None = None,
                      dora_as_lora_rank: int | None = None) -> Path:
    """Write the LoRA of a training checkpoint as a LoRA file (``format`` None: the family's
    layout), refusing NaN/Inf weights and tensors that contradict the run config stored beside
    them (the header is written from that config).

    ``dora_as_lora_rank``: write a DoRA run as a plain LoRA of that rank approximating its whole
    weight change (:func:`sdtune.lora.adapters.dora_as_lora`), which A1111 and kohya sd-scripts apply
    as ComfyUI does; the header's ``sdtune.dora_as_lora`` records the rank and the error."""
    ckpt = load_checkpoint(ckpt_path)
    try:
        cfg = ckpt["hyper_parameters"]["cfg"]
        family = get_family(cfg["model"]["family"])
        spec = spec_from_config(cfg["lora"], family.default_lora_targets)
        tensors = lora_tensors(ckpt["state_dict"], prefix=family.denoiser_subfolder + ".")  # the module's attribute
        config = denoiser_config_for(cfg)
        header = run_header(
            cfg,
            spec,
            steps=int(ckpt.get("global_step", 0)),
            num_train_images=ckpt["sdtune"].get("num_train_images"),
            output_name=Path(out).stem,
            denoiser_config=config,
        )
        tensors, header = checkpoint_export_tensors(ckpt, cfg, tensors, str(ckpt_path)), with_ema_facts(header, cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LoraFileError(
            f"{str(ckpt_path)!r} is not a complete sdtune checkpoint: its run config or state_dict is missing or "
            f"malformed ({first_line(err)}). {CHECKPOINT_FIX}"
        ) from None
    if not tensors:
        raise LoraFileError(f"{str(ckpt_path)!r} holds no LoRA tensors")
    check_finite(tensors, str(ckpt_path), fix=(
        "the training diverged before this checkpoint was saved. Export an earlier checkpoint from the run's "
        "checkpoints/ folder, or retrain with a lower optim.optimizer.lr."
    ))
    check_tensors_match(spec, tensors, str(ckpt_path), origin="run config stored in it (lora.rank/alpha/targets)",
                        fix=f"The checkpoint was edited or mixes two runs. {CHECKPOINT_FIX}")
    text_encoders = checkpoint_text_encoder_state(ckpt["state_dict"], family)
    if header.text_encoder is not None and not text_encoders:
        raise LoraFileError(f"{str(ckpt_path)!r}: its run config sets lora.text_encoder but it holds no text-encoder LoRA "
                            f"tensors. {CHECKPOINT_FIX}")
    format = format or family.default_export_format
    if dora_as_lora_rank is not None:
        tensors, header = _dora_as_lora(tensors, header, cfg, dora_as_lora_rank, str(ckpt_path))
    weights = (base_weights_from(cfg["model"]["path"], tensors, origin=f"from the run config stored in {ckpt_path}")
               if format == "kohya" else None)  # DoRA's dora_scale
    return save_lora(out, tensors, header, format=format, denoiser_config=config, text_encoders=text_encoders,
                     base_weights=weights)


def _dora_as_lora(tensors, header: LoraHeader, cfg, out_rank: int, source: str):
    """(plain LoRA tensors, header) of a DoRA checkpoint's ``tensors`` at rank ``out_rank``."""
    spec = header.spec
    if not spec.use_dora:
        raise LoraFileError(f"--dora-as-lora converts a DoRA run, and {source!r} holds a {NAMES[spec.kind]} "
                            "(lora.use_dora=false). Fix: drop --dora-as-lora.")
    weights = base_weights_from(cfg["model"]["path"], tensors, origin=f"from the run config stored in {source}")
    if weights is None:
        raise LoraFileError(f"--dora-as-lora needs the base model's weights (the DoRA's magnitude is relative to them), and "
                            f"model.path={cfg['model']['path']!r} from {source!r} cannot be loaded. Fix: make that path "
                            "reachable when exporting.")
    plain, error = dora_as_lora(tensors, spec.rank, float(spec.alpha), weights, out_rank)
    record = {"rank": out_rank, "worst_relative_error": round(error, 6), "trained": {"rank": spec.rank, "alpha": spec.alpha}}
    spec = replace(spec, rank=out_rank, alpha=float(out_rank), use_dora=False)
    return plain, replace(header, spec=spec, carried={**header.carried, "sdtune.dora_as_lora": json.dumps(record)})


def export_lora(lora_path: str | Path, out: str | Path, *, format: str | None = None, family: str | None = None) -> Path:
    """Re-write a LoRA file in ``format`` (diffusers <-> kohya; None: the family's layout), keeping its header.

    ``family`` names the model family of a file whose header does not record it (a LoRA from
    another trainer); kohya names differ per family, so it is never guessed.
    """
    lora = read_lora(lora_path)
    if lora.family is not None and family is not None and get_family(family).name != lora.family:
        raise LoraFileError(f"{str(lora_path)!r} records family {lora.family}, not --family {family}. "
                            "Fix: drop --family (the header's is used).")
    family = lora.family or (get_family(family).name if family else None)
    if family is None:
        raise LoraFileError(
            f"{str(lora_path)!r} does not record which model family it was trained for (no sdtune.family in its "
            f"header), and kohya names differ per family. Fix: pass --family ({'|'.join(sorted(FAMILIES))})."
        )
    _check_convertible(lora, str(lora_path))
    format = format or default_format(family)
    # The base model's own denoiser config when its header names a reachable one, else the family's
    # standard full-size layout (what every public checkpoint of the family shares).
    config = denoiser_config_for(lora.config) or _standard_denoiser_config(family)
    if lora.format != "kohya":
        tensors = lora.tensors
    else:
        tensors = lora.peft_tensors(denoiser_module_names(config, family), config, family=family)
        if lora.spec.targets:  # kohya names are resolved only now: check the header targets against them
            check_tensors_match(lora.spec, tensors, str(lora_path), origin="header (sdtune.*)")
    spec = lora.spec if lora.spec.targets else replace(lora.spec, targets=_targets_of(tensors))
    header = LoraHeader(spec, family, output_name=Path(out).stem, carried=lora.metadata, text_encoder=lora.text_encoder)
    text_encoders = file_text_encoder_tensors(lora, family) if lora.text_encoder is not None else None
    return save_lora(out, tensors, header, format=format, denoiser_config=config, text_encoders=text_encoders)


def _standard_denoiser_config(family: str) -> dict[str, Any]:
    return architecture(family)[get_family(family).denoiser_subfolder]


def _check_convertible(lora, source: str) -> None:
    """Refuse what a conversion would lose: text-encoder layers of other tools' files (sdtune's own,
    whose header records the text-encoder rank and alpha, convert), per-module alphas, and the
    adapter variants (their kohya maths is tied to the base weights or to ComfyUI's scale rules)."""
    kind = kind_of(lora.raw)
    if kind != "lora":
        raise LoraFileError(
            f"{source!r} is a {NAMES[kind]} file; sdtune.export converts plain LoRA files only. Fix: export it from its training "
            "checkpoint (`python -m sdtune.export RUN/checkpoints/last.ckpt --format kohya|diffusers --out FILE`), or use "
            "it as it is (generate and merge apply it)."
        )
    te = sorted(k for k in lora.raw if k.startswith(TEXT_ENCODER_KEYS))
    if te and lora.text_encoder is None:
        raise LoraFileError(
            f"{source!r} holds {len(te)} text-encoder tensor(s) (e.g. {te[0]!r}), which sdtune.export would drop: it "
            "converts UNet LoRAs and the text-encoder layers of sdtune's own files only. Fix: use the file as it is "
            "(generate and merge apply its text-encoder layers)."
        )
    if te:
        check_text_encoder_tensors(lora, source)
    parts = kohya_parts_header(lora.metadata, source) if lora.format == "kohya" else {}  # fused: k x alpha
    alphas = {float(v) / kohya_parts_of(k, parts) for k, v in lora.raw.items()
              if k.endswith(".alpha") and v.numel() == 1 and not k.startswith(TEXT_ENCODER_KEYS)}
    if len(alphas) > 1:
        raise LoraFileError(
            f"{source!r} has a different alpha per module ({sorted(alphas)[:4]}), and the written file would hold one. "
            "Fix: use the file as it is (generate and merge apply each module's alpha)."
        )


def _default_layout(path: Path, family: str | None) -> str:
    """The layout a LoRA file of ``path``'s family (its header's, else ``family``) is written in by
    default: its name goes into the default output name, before anything is read in full."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            family = (fh.metadata() or {}).get("sdtune.family") or family
    except Exception:  # a checkpoint, or not readable (the export itself then says why)
        pass
    return default_format(family if family in FAMILIES else None)


def _targets_of(tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    return tuple(sorted({module_of(k) for k in tensors}))


def _unwritable(out: Path) -> str | None:
    """Why the LoRA file ``out`` cannot be written (the rest of the sentence), or None.

    Checked before any work so that a bad ``--out`` costs nothing and leaves nothing behind.
    """
    if out.is_dir():
        return (f"is an existing folder; --out names the .safetensors file to write. "
                f"Fix: e.g. --out {str(out / 'lora.safetensors')!r}.")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # the folders that would be created
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be written: {str(parent)!r} is a file, not a folder. Fix: choose an --out in a folder."
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be written: the folder {str(parent)!r} is not writable by you. Fix: choose an --out in a folder you can write to."
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.export", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("source", help="a .ckpt written by `python -m sdtune`, or a LoRA .safetensors")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="kohya (loads in ComfyUI, A1111/Forge, kohya sd-scripts and, for SD1.5/SDXL/Kolors, "
                             "diffusers) or diffusers (diffusers' own layout); default: the model family's layout")
    parser.add_argument("--out", help="output .safetensors (default: beside the source, suffixed with the format)")
    parser.add_argument("--dora-as-lora", type=int, metavar="RANK",
                        help="write a DoRA run as a plain LoRA of this rank (the SVD of its whole weight change), which "
                             "A1111 and kohya sd-scripts apply as ComfyUI does; the error is printed and kept in the header")
    parser.add_argument("--family", choices=sorted(FAMILIES),
                        help="model family of a LoRA file whose header does not record it (one from another trainer)")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not source.name:  # "." or "/": name the default output after the folder, not after nothing
        source = source.resolve()
    if args.out:
        out = Path(args.out)
    elif source.name:
        plain = args.format is None and source.suffix == ".ckpt"
        fmt = args.format or _default_layout(source, args.family)
        out = source.with_name(f"{source.stem}{'' if plain else '_' + fmt}.safetensors")
    else:  # the root folder: refused below as a folder, before anything is written
        out = Path(f"lora_{args.format or 'export'}.safetensors")
    if out.resolve() == source.resolve():
        print(f"error: --out {out} would overwrite the source; choose another name", file=sys.stderr)
        return 2
    if args.dora_as_lora is not None and args.dora_as_lora < 1:
        print(f"error: --dora-as-lora must be a rank of at least 1, got {args.dora_as_lora}. Fix: e.g. --dora-as-lora 32 "
              "(higher is closer to the DoRA; each layer's full rank is exact)", file=sys.stderr)
        return 2
    problem = _unwritable(out)
    if problem:
        print(f"error: --out {str(out)!r} {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        if source.suffix == ".safetensors":
            if args.dora_as_lora is not None:
                raise LoraFileError(f"--dora-as-lora needs the training checkpoint, not the LoRA file {str(source)!r}. "
                                    "Fix: python -m sdtune.export RUN/checkpoints/last.ckpt --dora-as-lora RANK.")
            export_lora(source, out, format=args.format, family=args.family)
        else:
            export_checkpoint(source, out, format=args.format, dora_as_lora_rank=args.dora_as_lora)
    except SdtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled up, a permission changed mid-way, ...
        print(f"error: could not write --out {str(out)!r}: {err.strerror or first_line(err)}. "
              "Fix: free space or choose an --out in a folder you can write to.", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format or _default_layout(out, None)}) in {time.perf_counter() - start:.2f}s")
    if args.dora_as_lora is not None:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as fh:
            record = json.loads(fh.metadata()["sdtune.dora_as_lora"])
        print(f"the DoRA is written as a plain rank-{record['rank']} LoRA (every tool applies it alike); the worst layer's "
              f"weight change is off by {100 * record['worst_relative_error']:.2f}% (relative Frobenius error; a higher "
              "--dora-as-lora lowers it, 0 at each layer's full rank)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
