"""What ``python -m sdtune.morph`` writes besides the frames: strip.png, morph.gif, morph.mp4 and
generation.json (everything that made the frames, and how well the end frames redraw the inputs)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sdtune.inference.sampling import make_grid
from sdtune.morph.inversion import pixel_error
from sdtune.utils.io import atomic_path, file_sha256, save_image_atomic, tensor_sha256, write_text_atomic

log = logging.getLogger(__name__)


def morph_record(cfg: DictConfig, model_cfg: dict, inputs, refs, prompts: list[str], prompt_sources: list[str],
                 ts: list[float], *, guidance: float, size: int, trained: list[str], sampler: str) -> dict:
    """generation.json: the inputs (with sha256), LoRAs, prompts and settings; rerunning it gives the same frames."""
    return {
        "images": [{"path": os.path.abspath(p), "sha256": file_sha256(p)} for p in inputs.images],
        "loras": [{"path": os.path.abspath(r.path), "sha256": file_sha256(r.path), "tensor_sha256": tensor_sha256(r.path)}
                  for r in refs],
        "trained_runs": trained,
        "train_overrides": list(OmegaConf.to_container(cfg.train_overrides) or []) if trained else [],
        "prompts": prompts, "prompt_sources": prompt_sources, "negative_prompt": cfg.get("negative_prompt"),
        "inversion_steps": inputs.steps, "guidance": guidance, "inversion_guidance": 1.0, "sampler": sampler,
        "frames": len(ts), "t": ts, "lora_weights": [[1.0 - t, t] for t in ts], "size": [size, size],
        "seed": int(cfg.seed), "model": model_cfg,
    }


def reconstruction(images: Sequence[Image.Image], roundtrips: Sequence[Image.Image], frames: Sequence[Image.Image]) -> dict:
    """How closely the end frames redraw the inputs (mean absolute pixel error in [0, 1]), beside the
    floor the VAE alone sets (encode-decode of the input) and the two inputs' own distance."""
    ends = {"a": (images[0], roundtrips[0], frames[0]), "b": (images[1], roundtrips[1], frames[-1])}
    out: dict = {name: {"frame_error": round(pixel_error(im, fr), 5), "vae_roundtrip_error": round(pixel_error(im, rt), 5)}
                 for name, (im, rt, fr) in ends.items()}
    out["inputs_distance"] = round(pixel_error(images[0], images[1]), 5)
    out["measure"] = "mean absolute pixel difference, 0-1 scale, at the morph's size"
    return out


def write_strip(frames: Sequence[Image.Image], ts: Sequence[float], path: Path) -> None:
    """All frames in one row, each labelled with its t."""
    save_image_atomic(make_grid([list(frames)], ["morph"], [f"t={t:.2f}" for t in ts]), path)


def write_animations(frames: Sequence[Image.Image], out_dir: Path, *, fps: float, pingpong: bool) -> list[str]:
    """morph.gif (looping forever) and, when imageio-ffmpeg is installed, morph.mp4; the names written.

    ``pingpong`` plays the frames forward then back (without repeating the ends)."""
    seq = [f.convert("RGB") for f in frames]
    if pingpong and len(seq) > 2:
        seq = seq + seq[-2:0:-1]
    with atomic_path(out_dir / "morph.gif") as tmp:
        seq[0].save(tmp, format="GIF", save_all=True, append_images=seq[1:], duration=round(1000 / fps), loop=0)
    written = ["morph.gif"]
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes MP4 with)
    except ImportError:
        log.info("morph.mp4 skipped: imageio-ffmpeg is not installed (pip install 'sdtune[video]')")
        return written
    import numpy as np

    # ffmpeg picks the container from the suffix, so the temporary file ends in .mp4 too
    fd, tmp = tempfile.mkstemp(prefix=".morph.", suffix=".mp4", dir=out_dir)
    os.close(fd)
    try:
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, macro_block_size=8) as writer:
            for frame in seq:
                writer.append_data(np.asarray(frame))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the video from other users
        os.replace(tmp, out_dir / "morph.mp4")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return [*written, "morph.mp4"]


def write_record(record: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False, default=str))
