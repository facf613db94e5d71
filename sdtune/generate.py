"""``python -m sdtune.generate``: images from a base model with any number of weighted LoRAs.

    python -m sdtune.generate 'loras=[outputs/runs/<run>/lora.safetensors]' prompt="a red circle"
    python -m sdtune.generate 'loras=[{path: style.safetensors, weight: 0.7}, {path: subject.safetensors, weight: 0.3}]' \\
        prompt="..." num_images=4 compare=true

Writes every image and one grid PNG into the run folder. With ``compare=true`` the same seeds are
rendered with the LoRAs off and on, one row each. ``init_image=`` (img2img) and ``controlnet.path=``
(ControlNet) take pictures as input: see :mod:`sdtune.inference.image_input`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.config.values import guidance as check_guidance
from sdtune.config.values import integer
from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.families.source import check_weights
from sdtune.inference.embedding_files import load_embeddings, parse_embeddings, read_embeddings
from sdtune.inference.image_input import (
    draw,
    load_controlnet,
    parse_image_input,
    prepare_pictures,
    record_fields,
)
from sdtune.inference.loading import (
    apply_loras,
    base_model_config,
    check_families,
    parse_loras,
    pick_device,
    read_loras,
)
from sdtune.inference.sampling import make_grid
from sdtune.lora.apply import set_enabled
from sdtune.utils.console import tidy_console
from sdtune.utils.errors import ConfigError, exit_on_user_error
from sdtune.utils.infotext import infotext
from sdtune.utils.io import file_sha256, save_image_atomic, tensor_sha256, write_text_atomic

register_resolvers()
log = logging.getLogger(__name__)



def check_negative_prompt(negative_prompt: str | None, pipeline_cls: type) -> None:
    """Refuse a negative prompt the family's pipeline has no parameter for (FLUX's ControlNet img2img),
    rather than fail with a TypeError after the model has loaded."""
    if negative_prompt is not None and "negative_prompt" not in inspect.signature(pipeline_cls.__call__).parameters:
        raise ConfigError(
            f"negative_prompt={negative_prompt!r}: {pipeline_cls.__name__} takes no negative prompt (diffusers draws "
            "this task without classifier-free guidance). Fix: drop negative_prompt, or drop init_image or "
            "controlnet.path for a pipeline that takes one."
        )

def generate(cfg: DictConfig, out_dir: Path) -> list[Path]:
    tidy_console()
    refs = parse_loras(cfg.loras)
    embedding_refs = parse_embeddings(cfg.get("embeddings"))
    integer("num_images", cfg.num_images, ge=1, fix="e.g. num_images=4.")
    integer("steps", cfg.steps, ge=1, fix="e.g. steps=30.")
    spec = parse_image_input(cfg)  # pictures and settings checked before anything loads
    allow_pickle = OmegaConf.select(cfg, "model.allow_pickle", default=False) is True  # the user's, never a header's
    check_weights(spec.controlnet, key="controlnet.path", allow_pickle=allow_pickle)
    loras = read_loras(refs)  # every file vetted (readable, finite, consistent) before the base model loads
    model_cfg = base_model_config(cfg.get("model"), refs, loras)
    check_families(refs, loras, model_cfg)  # from the headers just read: mixed families fail before any load
    pipeline_cls = get_family(model_cfg["family"]).pipeline_class(spec.task, controlnet=spec.controlnet is not None)
    check_negative_prompt(cfg.negative_prompt, pipeline_cls)  # both refuse before anything loads
    check_size(cfg, model_cfg, spec)
    embeddings = read_embeddings(embedding_refs, get_family(model_cfg["family"]))  # vetted before the base loads
    guidance = cfg.get("guidance")
    guidance = get_family(model_cfg["family"]).guidance(model_cfg) if guidance is None else guidance
    guidance = check_guidance("guidance", guidance, fix="e.g. guidance=5 (1 turns guidance off).")
    device = pick_device(cfg.device)
    # on a GPU, the half precision the family runs in (bf16 for FLUX/SD3.5: their activations overflow fp16)
    dtype = getattr(torch, get_family(model_cfg["family"]).inference_dtype) if device.type == "cuda" else torch.float32
    family, parts = build_parts(model_cfg, dtype=dtype)
    adapters = apply_loras(parts, family, refs, loras)
    controlnet = (load_controlnet(spec.controlnet, dtype=dtype, family=family, denoiser=parts.denoiser,
                                  allow_pickle=allow_pickle)
                  if spec.controlnet else None)
    pipe = family.build_pipeline(parts, task=spec.task, controlnet=controlnet).to(device)
    load_embeddings(pipe, parts, family, embedding_refs, embeddings)  # textual-inversion words (embeddings=[...])
    pipe.set_progress_bar_config(disable=True)
    size = int(cfg.size or model_cfg.get("resolution") or family.default_resolution)
    pictures = prepare_pictures(spec, size, family.pixel_multiple)  # the init image resized in memory; the file is only read
    lead = {"input": pictures.init, "control": pictures.control}  # grid columns in front of the outputs
    lead = {name: im for name, im in lead.items() if im is not None}
    extra = []  # files beside the images: the control picture actually used
    if pictures.control is not None:
        save_image_atomic(pictures.control, out_dir / "control.png")
        extra.append(out_dir / "control.png")
    seeds = [int(cfg.seed) + i for i in range(int(cfg.num_images))]
    rows = {"LoRA on": []} if refs else {"base": []}
    if cfg.compare and refs:
        rows = {"LoRA off": [], "LoRA on": []}
    record = generation_record(cfg, model_cfg, refs, seeds, guidance=guidance, size=(pictures.width, pictures.height),
                               sampler=type(pipe.scheduler).__name__, image_input=record_fields(spec))
    record["embeddings"] = [{"path": os.path.abspath(r.path), "token": r.token} for r in embedding_refs]
    written = []
    for label in rows:
        if refs:
            set_enabled(parts, adapters, label != "LoRA off")
        for seed in tqdm(seeds, desc=f"generating ({label})", unit="img"):
            image = draw(
                pipe, spec, pictures,
                steps=int(cfg.steps),
                prompt=cfg.prompt,
                # only when set: FLUX's ControlNet img2img pipeline takes no negative prompt at all
                **({} if cfg.negative_prompt is None else {"negative_prompt": cfg.negative_prompt}),
                generator=torch.Generator("cpu").manual_seed(seed),
                control_key=family.controlnet_image_argument,
                **family.pipeline_call_kwargs(guidance, None, parts),
            )
            rows[label].append(image)
            tag = "off_" if label == "LoRA off" else ""
            path = out_dir / f"{tag}seed{seed}.png"
            save_image_atomic(image, path, text={"parameters": infotext(record, seed, loras_on=label != "LoRA off")})
            written.append(path)
    grid = make_grid([[*lead.values(), *row] for row in rows.values()], list(rows), [*lead, *(f"seed {s}" for s in seeds)])
    save_image_atomic(grid, out_dir / "grid.png")
    write_text_atomic(out_dir / "generation.json", json.dumps(record, indent=2, ensure_ascii=False, default=str))
    log.info("wrote %d image(s) and grid.png to %s", len(written), out_dir)
    return [*written, *extra, out_dir / "grid.png"]


def check_size(cfg: DictConfig, model_cfg: dict, spec) -> None:
    """A text2img ``size`` (the side drawn; with an input picture, only its area) must be a multiple
    of the family's ``pixel_multiple`` (16 for the transformers' 2x2 patches); checked before loading."""
    family = get_family(model_cfg["family"])
    size, multiple = int(cfg.size or model_cfg.get("resolution") or family.default_resolution), family.pixel_multiple
    if spec.init_image is None and spec.control_image is None and size % multiple:
        lower, upper = max(multiple, size - size % multiple), size - size % multiple + multiple
        raise ConfigError(f"size={size} is not a multiple of {multiple} ({family.pixel_multiple_reason}, model.family="
                          f"{family.name}). Fix: size={lower} or size={upper}.")


def generation_record(cfg: DictConfig, model_cfg: dict, refs, seeds: list[int], *, guidance: float,
                      size: int | tuple[int, int], sampler: str, image_input: dict | None = None) -> dict:
    """Everything that made the images (generation.json): rerunning it gives the same pictures.

    ``size`` is a square side or (width, height); ``image_input`` adds the img2img/ControlNet
    settings (:func:`sdtune.inference.image_input.record_fields`)."""
    width, height = (size, size) if isinstance(size, int) else size
    return {
        "prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "steps": int(cfg.steps), "guidance": guidance,
        "size": [width, height], "seeds": seeds, "sampler": sampler, "model": model_cfg,
        "loras": [{"path": os.path.abspath(r.path), "weight": r.weight, "sha256": file_sha256(r.path),
                   "tensor_sha256": tensor_sha256(r.path)} for r in refs],
        **(image_input or {}),
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        generate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
