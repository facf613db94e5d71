"""``python -m sdtune.merge``: fuse weighted LoRAs into the base model and save it.

    python -m sdtune.merge 'loras=[outputs/runs/<run>/lora.safetensors@0.8]' out=merged/my_model

Writes ``<out>/``, a diffusers folder (the denoiser's LoRA fused with ``fuse_lora``: a UNet or a
transformer), and for SD1.5 and SDXL also ``<out>.safetensors``, a single file in the original
layout that A1111 and ComfyUI load (``single_file``: null writes it where the family has one). Both are written to temporary names and
renamed into place; an existing ``<out>`` is replaced only if an earlier merge wrote it.

The folder's text encoders are stored in the key layout every transformers version reads: a
``CLIPTextModel`` under ``text_model.`` (transformers 4.x's layout, which kohya sd-scripts pins;
transformers 5 maps it onto its flattened class when loading), although transformers 5 saves a
model it did not load from such a file without that prefix. SDXL's ``CLIPTextModelWithProjection``
and Kolors' ChatGLM have one layout in both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.config.values import choice
from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.families.ldm_format import pipeline_to_original
from sdtune.inference.loading import apply_loras, base_model_config, check_families, parse_loras, read_loras
from sdtune.lora.apply import fuse
from sdtune.lora.checks import nonfinite_tensors
from sdtune.utils.console import tidy_console
from sdtune.utils.errors import ConfigError, LoraFileError, exit_on_user_error
from sdtune.utils.io import atomic_path

register_resolvers()
log = logging.getLogger(__name__)
MARKER = "sdtune_merge.json"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: transformers classes whose 4.x state dict nests every weight under a prefix that transformers 5
#: flattens away (conversion_mapping.py: ``"CLIPTextModel": [PrefixChange(prefix_to_remove="text_model")]``)
LEGACY_PREFIXES = {"CLIPTextModel": "text_model."}


def single_file_path(out: Path) -> Path:
    """``<out>.safetensors`` beside the folder (``with_suffix`` would eat a dotted name like v1.5)."""
    return out.with_name(out.name + ".safetensors")


def single_file_target(wanted, family, out: Path) -> Path | None:
    """Where the single file goes: ``single_file`` null writes one where the family has a single-file
    layout (SD1.5, SDXL), true demands one (refused, before loading, for a family without), false none."""
    if wanted is not None and not isinstance(wanted, bool):
        raise ConfigError(f"single_file must be true, false or null, got {wanted!r}. Fix: single_file=false (folder only).")
    if not family.single_file_text_encoders:
        if wanted:
            raise ConfigError(
                f"single_file=true: sdtune writes no single-file checkpoint for model.family={family.name} (it has no "
                f"writer for the original layout of its {family.denoiser_class} and text encoders). Fix: single_file=null "
                "or false: the merged model is the diffusers folder out=..., which diffusers' from_pretrained (and "
                "sdtune's model.path) load.")
        return None
    return None if wanted is False else single_file_path(out)


def _written_by_merge(single: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(single), "pt") as fh:
            return "sdtune.merge" in (fh.metadata() or {})
    except Exception:
        return False


def _check_target(out: Path, single: Path | None) -> None:
    if out.suffix == ".safetensors":
        raise ConfigError(f"out={str(out)!r} names a file; out is a folder (the single file is written beside it).")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ConfigError(f"out={str(out)!r} exists and was not written by sdtune.merge; choose a new folder.")
    if single is not None and single.exists() and not _written_by_merge(single):
        raise ConfigError(f"{str(single)!r} exists and was not written by sdtune.merge; choose another out.")


def merge(cfg: DictConfig) -> tuple[Path, Path | None]:
    tidy_console()
    refs = parse_loras(cfg.loras)
    if not refs:
        raise ConfigError("loras is empty: name at least one LoRA to merge, e.g. 'loras=[my_lora.safetensors@0.8]'.")
    choice("save_dtype", cfg.save_dtype, SAVE_DTYPES)
    out = Path(cfg.out).expanduser()
    loras = read_loras(refs)  # every file vetted (readable, finite, consistent) before the base model loads
    model_cfg = base_model_config(cfg.get("model"), refs, loras)
    check_families(refs, loras, model_cfg)  # from the headers just read: mixed families fail before any load
    if model_cfg.get("quantize"):
        raise ConfigError(f"model.quantize={model_cfg['quantize']}: merge fuses the LoRA into the base's full-precision "
                          "weights and saves them, which a quantized base does not hold. Fix: model.quantize=null "
                          "(the LoRA of a quantized run merges into the unquantized base like any other).")
    single = single_file_target(cfg.get("single_file"), get_family(model_cfg["family"]), out)
    _check_target(out, single)  # before loading anything
    family, parts = build_parts(model_cfg, dtype=torch.float32)  # fuse in fp32, cast when saving
    fuse(parts, apply_loras(parts, family, refs, loras))  # UNet and, where a LoRA has layers for them, text encoders
    dtype = SAVE_DTYPES[cfg.save_dtype]
    for module in (parts.denoiser, *parts.frozen_modules()):
        module.to(dtype)
    _check_merged_finite(parts, family, cfg.save_dtype, refs)  # before anything is written

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        family.build_pipeline(parts).save_pretrained(tmp)
        legacy_text_encoder_layout(tmp)
        source_scheduler = Path(parts.source) / "scheduler"
        if source_scheduler.is_dir():  # keep the base model's own scheduler, not our sampling one
            shutil.rmtree(tmp / "scheduler")
            shutil.copytree(source_scheduler, tmp / "scheduler")
            index = json.loads((tmp / "model_index.json").read_text())
            source_index = json.loads((Path(parts.source) / "model_index.json").read_text())
            index["scheduler"] = source_index.get("scheduler", index["scheduler"])
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        record = {"base_model": model_cfg, "loras": [{"path": r.path, "weight": r.weight} for r in refs], "save_dtype": cfg.save_dtype}
        (tmp / MARKER).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is meant to be shared
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if single is not None:
        from safetensors.torch import save_file

        state = pipeline_to_original(family, parts.denoiser, parts.vae, parts.text_encoders)
        with atomic_path(single) as tmp_file:
            save_file(state, str(tmp_file), metadata={"sdtune.merge": json.dumps(record, default=str)})
    log.info("merged %d LoRA(s) into %s%s", len(refs), out, f" and {single}" if single else "")
    return out, single


def legacy_text_encoder_layout(folder: Path) -> list[str]:
    """Rewrite ``folder``'s text encoders whose class :data:`LEGACY_PREFIXES` names in the key layout
    transformers 4.x reads (``text_model.`` on every key; 4.x would load a flattened file with
    random weights and a mere warning); transformers 5 reads both. Returns the components rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((folder / "model_index.json").read_text())
    done = []
    for component, entry in sorted(index.items()):
        prefix = LEGACY_PREFIXES.get(entry[1]) if isinstance(entry, list) and len(entry) == 2 else None
        if prefix is None or not (folder / component).is_dir():
            continue
        for file in sorted((folder / component).glob("*.safetensors")):
            with safe_open(str(file), "pt") as fh:
                metadata = fh.metadata()
                state = {k if k.startswith(prefix) else prefix + k: fh.get_tensor(k) for k in fh.keys()}
            save_file(state, str(file), metadata=metadata)
        for shards in (folder / component).glob("*.safetensors.index.json"):  # a sharded save's key -> file map
            shard_index = json.loads(shards.read_text())
            shard_index["weight_map"] = {k if k.startswith(prefix) else prefix + k: v
                                         for k, v in shard_index["weight_map"].items()}
            shards.write_text(json.dumps(shard_index, indent=2, sort_keys=True) + "\n")
        done.append(component)
    return done


def _check_merged_finite(parts, family, save_dtype: str, refs) -> None:
    """Refuse to save a merged model with NaN/Inf weights (e.g. a fused delta beyond fp16's 65504).

    The LoRAs themselves were checked on reading; what remains is overflow when fusing large
    weights or casting to ``save_dtype``, and a base model that was already broken.
    """
    for label, module in ((family.denoiser_subfolder, parts.denoiser), *((type(m).__name__, m) for m in parts.frozen_modules())):
        bad = nonfinite_tensors(module.state_dict())
        if bad:
            names, count = bad
            raise LoraFileError(
                f"the merged model would hold non-finite values: {label} has {len(names)} tensor(s) with {count} "
                f"value(s) NaN/Inf after fusing {[r.path for r in refs]} and casting to save_dtype={save_dtype}, "
                f"e.g. {', '.join(names[:3])}. Nothing was written. Fix: save_dtype=bf16 or fp32 (fp16 overflows "
                "above 65504), or lower the LoRA weights (path@0.5)."
            )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="merge")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        merge(cfg)


if __name__ == "__main__":
    main()
