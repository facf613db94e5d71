"""The class images of DreamBooth prior preservation: a folder the user gives, or rendered once.

``data.class_root`` is a folder in any layout ``data.root`` accepts (metadata.csv/jsonl, or a
kohya folder with sidecar captions). Otherwise ``data.class_prompt`` + ``data.num_class_images``
renders that many images with the base model and its family's pipeline, at seeds 0..N-1, as
diffusers' ``train_dreambooth_lora.py`` does before training. They go to
``${paths.cache_dir}/class_images/<hash>/`` (``images/*.png`` + ``metadata.csv``, captioned with
the class prompt), where the hash covers the model, the prompt and every render setting: a later
run with the same settings reuses them and renders nothing, and the user's data folder is never
written to. ``metadata.csv`` is written last, so a folder without it is unfinished; its images
(each fixed by its seed) are kept and only the missing ones are rendered.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdtune.data.records import Record, load_records
from sdtune.families import get_family
from sdtune.families.builder import build_parts, model_source
from sdtune.inference.sampling import render
from sdtune.training.checkpointing import data_manifest
from sdtune.training.trainable import weight_dtype
from sdtune.utils.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)
RENDER_BATCH = 4


def prior_enabled(data_cfg: Mapping[str, Any]) -> bool:
    return bool(data_cfg.get("class_root") or data_cfg.get("class_prompt"))


def render_settings(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Everything a rendered class image depends on (the cache folder's hash covers all of it)."""
    model, data = cfg["model"], cfg["data"]
    return {
        "model": source, "revision": model.get("revision"), "vae": model.get("vae_path"), "family": model["family"],
        "dtype": str(weight_dtype(cfg["trainer"])), "prompt": str(data["class_prompt"]),
        "negative_prompt": data.get("class_negative_prompt"), "steps": int(data["class_sample_steps"]),
        "guidance": float(get_family(model["family"]).guidance(model)), "size": int(data["resolution"]),
    }


def class_image_folder(cfg: Mapping[str, Any], source: str) -> Path:
    digest = hashlib.sha256(json.dumps(render_settings(cfg, source), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg["paths"]["cache_dir"]) / "class_images" / digest


def class_records(cfg: Mapping[str, Any]) -> tuple[list[Record] | None, Path | None]:
    """(the class images' records, their folder), rendering them first if need be; (None, None)
    without prior preservation."""
    data = cfg["data"]
    if not prior_enabled(data):
        return None, None
    if data.get("class_root"):
        root, key = data["class_root"], "data.class_root"
    else:
        root, key = ensure_class_images(cfg, model_source(cfg["model"])), "the class image cache"
    records = load_records(root, verify=bool(data.get("verify_images", True)), bad_images=data.get("bad_images", "error"),
                           caption_extension=data.get("caption_extension"), key=key)
    log.info("prior preservation: %d class image(s) from %s, prior_loss_weight %s", len(records), root,
             cfg["train"].get("prior_loss_weight", 1.0))
    return records, Path(root)


def ensure_class_images(cfg: Mapping[str, Any], source: str) -> Path:
    """The folder of ``data.num_class_images`` class images for ``cfg``, rendered where missing."""
    folder = class_image_folder(cfg, source)
    count = int(cfg["data"]["num_class_images"])
    names = [f"images/{i:05d}.png" for i in range(count)]
    if (folder / "metadata.csv").is_file() and all((folder / n).is_file() for n in names):
        log.info("prior preservation: reusing %d class image(s) in %s", count, folder)
        return folder
    missing = [i for i, n in enumerate(names) if not (folder / n).is_file()]
    _render(cfg, source, folder, missing, names)
    buf = io.StringIO()
    prompt = str(cfg["data"]["class_prompt"])
    csv.writer(buf, lineterminator="\n").writerows([("file_name", "text"), *((n, prompt) for n in names)])
    write_text_atomic(folder / "metadata.csv", buf.getvalue())
    write_text_atomic(folder / "settings.json", json.dumps(render_settings(cfg, source), indent=1, sort_keys=True))
    return folder


def _render(cfg: Mapping[str, Any], source: str, folder: Path, indices: Sequence[int], names: Sequence[str]) -> None:
    """Render class images ``indices`` (seed = index) with the base model, a progress bar, atomically."""
    import torch
    from tqdm.auto import tqdm

    settings = render_settings(cfg, source)
    accelerator = str(cfg["trainer"].get("accelerator", "auto"))
    device = torch.device("cuda" if torch.cuda.is_available() and accelerator != "cpu" else "cpu")
    dtype = getattr(torch, settings["dtype"].removeprefix("torch."))
    family, parts = build_parts(cfg["model"], dtype=dtype, source=source)
    pipe = family.build_pipeline(parts).to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info("prior preservation: rendering %d class image(s) of %r into %s", len(indices), settings["prompt"], folder)
    with tqdm(total=len(indices), desc="class images", unit="img") as bar:
        for start in range(0, len(indices), RENDER_BATCH):
            chunk = list(indices[start : start + RENDER_BATCH])
            images = render(pipe, [settings["prompt"]] * len(chunk), chunk, steps=settings["steps"], size=settings["size"],
                            call_kwargs=family.pipeline_call_kwargs(settings["guidance"], None, parts),
                            negative_prompt=settings["negative_prompt"], batch_size=RENDER_BATCH)
            for i, image in zip(chunk, images):
                with atomic_path(folder / names[i]) as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(chunk))
    del pipe, parts
    if device.type != "cpu":
        from diffusers.training_utils import free_memory

        free_memory()


def class_manifest(records: Sequence[Record] | None, root: str | os.PathLike | None) -> dict[str, str]:
    """Manifest entries (see :func:`sdtune.training.checkpointing.data_manifest`) for the class images, under
    ``class/``, so a resume notices class images added, removed or replaced."""
    if not records:
        return {}
    return {f"class/{k}": v for k, v in data_manifest(records, root).items()}
