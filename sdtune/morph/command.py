"""``python -m sdtune.morph``: a smooth transition between two images, DiffMorpher-style.

    python -m sdtune.morph 'images=[a.png,b.png]' 'loras=[a.safetensors,b.safetensors]' prompt="..." frames=10
    python -m sdtune.morph 'images=[a.png,b.png]' train=true model=toy prompt="..."

Each image has its own LoRA (overfit on that one image; ``train=true`` trains them first with
sdtune's trainer, :mod:`sdtune.morph.train`). Both images are DDIM-inverted to their starting noise
(image a with LoRA a alone, b with b; :mod:`sdtune.morph.inversion`); frame i of ``frames`` (t = i /
frames, both ends included: frames + 1 images) blends the LoRAs at weights (1 - t, t), slerps the two
noises at t, lerps the two prompts' embeddings at t and samples with DDIM. Blending the LoRAs is
what makes the in-between frames plausible images rather than a cross-fade of noise.

Writes frame_000.png... (with A1111 ``parameters`` text), strip.png, morph.gif, morph.mp4 (when
imageio-ffmpeg is installed: the ``video`` extra) and generation.json into outputs/morph/<time>.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sdtune.config.paths import CONF_DIR
from sdtune.config.resolvers import register_resolvers
from sdtune.config.values import guidance as check_guidance
from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.inference.loading import LoraRef, apply_loras, base_model_config, check_families, pick_device, read_loras
from sdtune.lora.apply import activate
from sdtune.morph.inputs import check_inputs, load_image, resolve_prompts
from sdtune.morph.inversion import (
    conditioning,
    ddim_schedulers,
    decode_latent,
    encode_image,
    invert,
    lerp_conditioning,
    sample,
    slerp,
)
from sdtune.morph.outputs import morph_record, reconstruction, write_animations, write_record, write_strip
from sdtune.morph.train import train_single_loras, training_config
from sdtune.utils.console import tidy_console
from sdtune.utils.errors import ConfigError, exit_on_user_error
from sdtune.utils.infotext import infotext
from sdtune.utils.io import save_image_atomic

register_resolvers()
log = logging.getLogger(__name__)


def _base_model(cfg: DictConfig, refs: list[LoraRef], loras) -> dict:
    """``model=`` as given, else the first LoRA's recorded base; with train=true and neither, the
    model the training preset composes (``train_overrides`` may name it)."""
    if refs or cfg.get("model"):
        return base_model_config(cfg.get("model"), refs, loras)

    composed = training_config(list(cfg.train_overrides or []), data_root=Path("."), run_dir=Path("."), seed=0)
    return dict(OmegaConf.to_container(composed.model, resolve=True))


def morph(cfg: DictConfig, out_dir: Path) -> list[Path]:
    """Run the morph ``cfg`` describes into ``out_dir``; the frame files."""
    tidy_console()
    inputs = check_inputs(cfg)
    guidance = check_guidance("guidance", cfg.get("guidance"), fix="guidance=1 (the default: DDIM inversion is exact "
                              "only without classifier-free guidance).")
    prompts, prompt_sources = resolve_prompts(cfg.prompt, inputs.images)
    refs = [LoraRef(p) for p in inputs.lora_paths]
    loras = read_loras(refs)  # every file vetted before a model loads
    model_cfg = _base_model(cfg, refs, loras)
    check_families(refs, loras, model_cfg)  # from the headers just read: mixed families fail before any load
    family = get_family(model_cfg["family"])
    if family.morph_refusal:  # before any training or loading
        raise ConfigError(f"sdtune.morph cannot morph with model.family={family.name}: {family.morph_refusal}")
    size = int(cfg.size or model_cfg.get("resolution") or family.default_resolution)
    if size % 8:
        raise ConfigError(f"size must be a multiple of 8 (the VAE's factor), got {size}. Fix: e.g. size={size - size % 8}.")
    images = [load_image(p, size) for p in inputs.images]
    device = pick_device(cfg.device)
    trained = []
    if inputs.train:
        paths = train_single_loras(images, prompts, out_dir, overrides=list(cfg.train_overrides or []),
                                   seed=int(cfg.seed), model=model_cfg, cpu=device.type == "cpu")
        trained = [str(p.parent) for p in paths]
        refs = [LoraRef(str(p)) for p in paths]
        loras = read_loras(refs)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    family, parts = build_parts(model_cfg, dtype=dtype)
    adapters = apply_loras(parts, family, refs, loras)
    pipe = family.build_pipeline(parts).to(device)
    inverse, forward = ddim_schedulers(parts.noise_scheduler.config)
    steps, seed, neg = inputs.steps, int(cfg.seed), cfg.get("negative_prompt")

    def blend(t: float) -> dict:
        """LoRA weights (1 - t, t) and the prompts' embeddings at t, under those weights."""
        activate(parts, adapters, {"lora_0": 1.0 - t, "lora_1": t})
        conds = [conditioning(pipe, p, guidance=guidance, negative_prompt=neg) for p in dict.fromkeys(prompts)]
        return conds[0] if len(conds) == 1 else lerp_conditioning(conds[0], conds[1], t)

    noises, roundtrips = [], []
    for i, image in enumerate(images):  # image a with LoRA a alone, b with b alone
        latent = encode_image(pipe, image)
        roundtrips.append(decode_latent(pipe, latent))
        pipe.set_progress_bar_config(desc=f"inverting image {'ab'[i]}", leave=False)
        noises.append(invert(pipe, latent, blend(float(i)), scheduler=inverse, steps=steps, size=size, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    ts = [i / inputs.frames for i in range(inputs.frames + 1)]
    record = morph_record(cfg, model_cfg, inputs, refs, prompts, prompt_sources, ts, guidance=guidance, size=size,
                          trained=trained, sampler=type(forward).__name__)
    frames, written = [], []
    for i, t in enumerate(tqdm(ts, desc="morphing", unit="frame")):
        frame = sample(pipe, slerp(noises[0], noises[1], t), blend(t), scheduler=forward, steps=steps,
                       guidance=guidance, size=size, seed=seed)
        frames.append(frame)
        path = out_dir / f"frame_{i:03d}.png"
        save_image_atomic(frame, path, text={"parameters": _frame_text(record, t)})
        written.append(path)
    record["reconstruction"] = reconstruction(images, roundtrips, frames)
    write_strip(frames, ts, out_dir / "strip.png")
    record["animations"] = write_animations(frames, out_dir, fps=float(cfg.fps), pingpong=bool(cfg.pingpong))
    write_record(record, out_dir / "generation.json")
    rec = record["reconstruction"]
    log.info("wrote %d frames, strip.png and %s to %s; frame 0 reconstructs image a within %.3f and the last frame "
             "image b within %.3f (mean pixel error; the two images differ by %.3f)", len(frames),
             ", ".join(record["animations"]), out_dir, rec["a"]["frame_error"], rec["b"]["frame_error"],
             rec["inputs_distance"])
    return written


def _frame_text(record: dict, t: float) -> str:
    """A1111 ``parameters`` for one frame: the nearer image's prompt, both LoRAs at their weights, and t."""
    prompts = record["prompts"]
    weights = [1.0 - t, t]
    frame = {**record, "prompt": prompts[0] if t < 0.5 else prompts[1], "steps": record["inversion_steps"],
             "loras": [{**lo, "weight": round(w, 4)} for lo, w in zip(record["loras"], weights)]}
    return infotext(frame, record["seed"]) + f", Morph t: {t:.4g}"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="morph")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        morph(cfg, Path(HydraConfig.get().runtime.output_dir))

