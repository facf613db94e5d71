"""Pictures as input to ``python -m sdtune.generate``: img2img (SDEdit) and ControlNet.

``init_image=in.png strength=0.5`` redraws a picture: it is encoded, noised to ``strength`` of the
schedule and denoised with the prompt (and the LoRAs), so 0 keeps it and 1 ignores it. A ControlNet
(``controlnet.path``) adds a control picture that steers every step, by default the input's Canny
edge map: the seed article's style transfer (ControlNet canny + img2img + a style LoRA).

The input is read, never written; it is resized (keeping its aspect, area about ``size``², sides
multiples of 8) in memory, and the control picture actually used is saved as ``control.png``.
This module reads and checks the settings, loads the ControlNet, builds the pictures and the
pipeline arguments, and writes the settings into generation.json (A1111's infotext reads them from
there: :func:`sdtune.utils.infotext.infotext_fields`).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdtune.config.values import number
from sdtune.data.images import load_rgb
from sdtune.families.base import FAMILIES, ModelFamily
from sdtune.families.source import _looks_local, check_weights
from sdtune.utils.errors import ConfigError, ModelLoadError
from sdtune.utils.io import file_sha256

PREPROCESSORS = ("canny", "none")


@dataclass(frozen=True)
class ImageInput:
    """The image-input settings of one generate run, checked."""

    init_image: str | None = None
    strength: float = 0.5
    controlnet: str | None = None  # a diffusers ControlNet folder or hub id
    conditioning_scale: float = 0.5
    preprocess: str = "canny"
    low_threshold: int = 100
    high_threshold: int = 200
    control_image: str | None = None  # controlnet.image: the control source instead of init_image

    @property
    def task(self) -> str:
        return "img2img" if self.init_image else "text2img"


def parse_image_input(cfg) -> ImageInput:
    """``init_image``, ``strength`` and ``controlnet.*`` of a generate config, checked before any model loads."""
    cn = cfg.get("controlnet") or {}
    init = cfg.get("init_image")
    spec = ImageInput(
        init_image=str(init) if init else None,
        strength=number("strength", cfg.get("strength", 0.5), ge=0, le=1,
                        fix="e.g. strength=0.5 (0 keeps the input, 1 ignores it)."),
        controlnet=str(cn["path"]) if cn.get("path") else None,
        conditioning_scale=number("controlnet.conditioning_scale", cn.get("conditioning_scale", 0.5), ge=0, le=10,
                                  fix="e.g. controlnet.conditioning_scale=0.5 (0 turns the ControlNet off)."),
        preprocess=str(cn.get("preprocess", "canny")),
        low_threshold=int(number("controlnet.low_threshold", cn.get("low_threshold", 100), ge=0, le=10000, fix="e.g. 100.")),
        high_threshold=int(number("controlnet.high_threshold", cn.get("high_threshold", 200), ge=0, le=10000,
                                  fix="e.g. 200.")),
        control_image=str(cn["image"]) if cn.get("image") else None,
    )
    if spec.preprocess not in PREPROCESSORS:
        raise ConfigError(f"controlnet.preprocess={spec.preprocess!r} is not known. Fix: choose one of {PREPROCESSORS} "
                          "(none: the picture already is the control image).")
    if spec.low_threshold > spec.high_threshold:
        raise ConfigError(f"controlnet.low_threshold={spec.low_threshold} is above controlnet.high_threshold="
                          f"{spec.high_threshold}. Fix: low <= high (the seed's 100 and 200).")
    if spec.control_image and not spec.controlnet:
        raise ConfigError("controlnet.image is set but controlnet.path is null. Fix: set controlnet.path to a "
                          "diffusers ControlNet folder, or drop controlnet.image.")
    if spec.controlnet and not (spec.init_image or spec.control_image):
        raise ConfigError("a ControlNet needs a control picture: set init_image=... (img2img) or controlnet.image=... "
                          "(text2img steered by that picture), or drop controlnet.path.")
    for key, path in (("init_image", spec.init_image), ("controlnet.image", spec.control_image)):
        if path:
            read_picture(path, key)  # fail now, not after the base model has loaded
    if spec.controlnet:
        check_controlnet(spec.controlnet)
    return spec


def read_picture(path: str, key: str) -> Image.Image:
    """The RGB picture at ``path`` (read only), decoded by training's own reader
    (:func:`sdtune.data.images.load_rgb`: 16-bit scaled, EXIF rotation applied, transparency on
    white), so generate sees the pixels training sees; a :class:`ConfigError` naming ``key`` and the path."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r}: no such file. Fix: point {key} at a PNG/JPEG/WebP picture.")
    try:
        return load_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ConfigError(f"{key}={path!r} is not a readable picture ({type(err).__name__}: {err}). "
                          f"Fix: point {key} at a PNG/JPEG/WebP picture.") from None


def fit_size(width: int, height: int, size: int, multiple: int = 8) -> tuple[int, int]:
    """(w, h) with ``width:height``'s aspect, an area of about ``size``², both sides multiples of
    ``multiple`` (the family's ``pixel_multiple``: the VAE's 8, or 16 for a transformer's 2x2 patches),
    at least ``multiple``: a 640x480 input at size 512 becomes 592x440 (with 16: 592x448)."""
    scale = size / math.sqrt(width * height)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edge map of ``image`` (white edges on black), as a 3-channel picture."""
    try:
        import cv2
    except ImportError:
        raise ConfigError("controlnet.preprocess=canny needs OpenCV. Fix: pip install 'sdtune[image]', or pass a "
                          "ready edge map with controlnet.preprocess=none.") from None
    import numpy as np

    edges = cv2.Canny(np.asarray(image), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


@dataclass
class Pictures:
    """The pictures a run draws from, at the size the pipeline works at."""

    width: int
    height: int
    init: Image.Image | None = None
    control: Image.Image | None = None


def prepare_pictures(spec: ImageInput, size: int, multiple: int = 8) -> Pictures:
    """The init picture resized (see :func:`fit_size`) and the control picture (Canny or as given)."""
    source = spec.init_image or spec.control_image
    if source is None:
        return Pictures(size, size)
    first = read_picture(source, "init_image" if spec.init_image else "controlnet.image")
    width, height = fit_size(*first.size, size, multiple)
    pictures = Pictures(width, height)
    if spec.init_image:
        pictures.init = first.resize((width, height), Image.Resampling.LANCZOS)
    if spec.controlnet:
        control = read_picture(spec.control_image, "controlnet.image") if spec.control_image else first
        control = control.resize((width, height), Image.Resampling.LANCZOS)
        if spec.preprocess == "canny":
            control = canny(control, spec.low_threshold, spec.high_threshold)
        pictures.control = control
    return pictures


CONTROLNET_FIX = ("Fix: point controlnet.path at a diffusers ControlNet folder (config.json with _class_name "
                  "ControlNetModel, or the family's own class such as SD3ControlNetModel, and its weights) made for "
                  "this base, or set controlnet.path=null.")
#: what a folder's ``_class_name`` is, for the message when it is not a ControlNet
_KINDS = {"UNet2DConditionModel": "a base model's UNet", "AutoencoderKL": "a VAE",
          "CLIPTextModel": "a text encoder", "CLIPTextModelWithProjection": "a text encoder"}


def _config_class(config: Path) -> str | None:
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return str(kind) if kind else None


def _check_controlnet_config(path: str, config: Path) -> None:
    kind = _config_class(config)
    if kind not in {cls.controlnet_class for cls in FAMILIES.values()}:
        what = f"a {kind}" if kind else "an unreadable config.json"
        also = f" ({_KINDS[kind]}; a ControlNet is a separate model made for a base)" if kind in _KINDS else ""
        raise ModelLoadError(f"controlnet.path={path!r} holds {what}, not a ControlNetModel{also}. {CONTROLNET_FIX}")


def check_controlnet(path: str) -> None:
    """``controlnet.path``, checked before any model loads: a diffusers ControlNet folder
    (config.json whose ``_class_name`` is ControlNetModel, and its weights), or a hub id that can be
    reached or is in the local hub cache. A whole pipeline, a UNet, a single file or a missing path
    is a :class:`ModelLoadError` that says what it is and what is needed."""
    local = Path(path).expanduser()
    if not local.exists():
        if _looks_local(path):
            raise ModelLoadError(f"controlnet.path={path!r} does not exist. {CONTROLNET_FIX}")
        _check_controlnet_hub_id(path)
        return
    if local.is_file():
        raise ModelLoadError(f"controlnet.path={path!r} is a file; generate loads a ControlNet from a diffusers folder "
                             f"(config.json + diffusion_pytorch_model.safetensors), as diffusers saves one. {CONTROLNET_FIX}")
    index = local / "model_index.json"
    if index.is_file():
        pipeline = _config_class(index) or "diffusers pipeline"
        inner = local / "controlnet"
        hint = (f"Its ControlNet is in a subfolder: controlnet.path={str(inner)!r}." if (inner / "config.json").is_file()
                else CONTROLNET_FIX)
        raise ModelLoadError(f"controlnet.path={path!r} is a whole pipeline ({pipeline}, with model_index.json), not a "
                             f"ControlNet: a ControlNet folder holds a config.json whose _class_name is ControlNetModel. "
                             f"{hint}")
    config = local / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"controlnet.path={path!r} holds no config.json, so it is not a diffusers model folder. "
                             f"{CONTROLNET_FIX}")
    _check_controlnet_config(path, config)
    if not any(local.glob("diffusion_pytorch_model*")):
        raise ModelLoadError(f"controlnet.path={path!r} has a ControlNet config.json but no weights "
                             f"(diffusion_pytorch_model.safetensors). {CONTROLNET_FIX}")


def _check_controlnet_hub_id(path: str) -> None:
    """A hub id: reachable (one quick query, as for the base model) or in the local hub cache, and
    its config.json a ControlNet's."""
    from huggingface_hub import hf_hub_download, model_info, try_to_load_from_cache

    try:
        model_info(path, timeout=15)
    except Exception as err:  # offline, unknown or gated repo
        cached = try_to_load_from_cache(path, "config.json")
        if not isinstance(cached, str):
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"controlnet.path={path!r} is not a local folder, and as a hub id it cannot be reached "
                                 f"and is not in the local hub cache ({type(err).__name__}: {reason[:200]}). "
                                 f"{CONTROLNET_FIX}") from None
        config = cached
    else:
        try:
            config = hf_hub_download(path, "config.json")
        except Exception as err:
            raise ModelLoadError(f"controlnet.path={path!r}: the hub repo has no readable config.json "
                                 f"({type(err).__name__}), so it is not a diffusers ControlNet. {CONTROLNET_FIX}") from None
    _check_controlnet_config(path, Path(config))


def load_controlnet(path: str, *, dtype: torch.dtype, family: ModelFamily, denoiser: torch.nn.Module,
                    allow_pickle: bool = False) -> torch.nn.Module:
    """The family's ControlNet class (``ControlNetModel`` for the UNet families) ``.from_pretrained(path)``
    in ``dtype``, checked to fit the base's ``denoiser``; pickle weights only with ``allow_pickle``
    (the user's ``model.allow_pickle=true``)."""
    import diffusers

    fix = CONTROLNET_FIX
    check_controlnet(path)
    check_weights(path, key="controlnet.path", allow_pickle=allow_pickle)
    kind = _config_class(Path(path) / "config.json") if Path(path).is_dir() else None
    if kind is not None and kind != family.controlnet_class:
        raise ModelLoadError(f"controlnet.path={path!r} holds a {kind}, but a {family.name} base takes a "
                             f"{family.controlnet_class} (its ControlNet was made for another family). {fix}")
    try:
        model = getattr(diffusers, family.controlnet_class).from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"Could not load the ControlNet from controlnet.path={path!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}\n{fix}") from err
    for key in family.controlnet_fits(denoiser.config, model.config)[:1]:
        ours, theirs = denoiser.config.get(key), model.config.get(key)
        raise ModelLoadError(f"controlnet.path={path!r} was made for another base: its {key} is {theirs!r}, the base "
                             f"model's {family.denoiser_class} has {ours!r}. {fix}")
    return model.requires_grad_(False).eval()


def pipeline_inputs(spec: ImageInput, pictures: Pictures, control_key: str = "image") -> dict[str, Any]:
    """The picture arguments of the diffusers pipeline call; ``control_key`` names the control picture
    of a text2img ControlNet pipeline (the family's ``controlnet_image_argument``)."""
    if pictures.init is None:
        kwargs: dict[str, Any] = {"height": pictures.height, "width": pictures.width}
        if pictures.control is not None:  # text2img steered by controlnet.image
            kwargs |= {control_key: pictures.control, "controlnet_conditioning_scale": spec.conditioning_scale}
        return kwargs
    kwargs = {"image": pictures.init, "strength": spec.strength}
    if pictures.control is not None:
        kwargs |= {"control_image": pictures.control, "controlnet_conditioning_scale": spec.conditioning_scale}
    return kwargs


def denoises(spec: ImageInput, steps: int) -> bool:
    """Whether img2img runs any step: diffusers runs ``int(steps * strength)`` and fails on none."""
    return spec.init_image is None or int(steps * spec.strength) >= 1


@torch.no_grad()
def vae_round_trip(pipe, image: Image.Image) -> Image.Image:
    """``image`` encoded and decoded by the pipeline's VAE: img2img with no denoising step (strength 0)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:  # as diffusers' pipelines do: the fp16 SD VAEs overflow
        vae.to(torch.float32)
    try:
        x = pipe.image_processor.preprocess(image).to(device=vae.device, dtype=vae.dtype)
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def draw(pipe, spec: ImageInput, pictures: Pictures, *, steps: int, control_key: str = "image", **call) -> Image.Image:
    """One image: the pipeline with the picture arguments, or the VAE round trip when no step runs."""
    if not denoises(spec, steps):
        return vae_round_trip(pipe, pictures.init)
    inputs = pipeline_inputs(spec, pictures, control_key)
    if "height" not in inputs and {"height", "width"} <= set(inspect.signature(pipe.__call__).parameters):
        # SD3's, FLUX's and Kolors' img2img pipelines resize the input to their default size unless told
        inputs |= {"height": pictures.height, "width": pictures.width}
    return pipe(**call, num_inference_steps=steps, **inputs).images[0]


def record_fields(spec: ImageInput) -> dict[str, Any]:
    """generation.json's image-input settings (empty for plain text2img)."""
    out: dict[str, Any] = {}
    if spec.init_image:
        out["init_image"] = {"path": os.path.abspath(spec.init_image), "sha256": file_sha256(spec.init_image)}
        out["strength"] = spec.strength
    if spec.controlnet:
        image = spec.control_image
        out["controlnet"] = {
            "path": os.path.abspath(spec.controlnet) if os.path.exists(spec.controlnet) else spec.controlnet,
            "conditioning_scale": spec.conditioning_scale, "preprocess": spec.preprocess,
            "low_threshold": spec.low_threshold, "high_threshold": spec.high_threshold,
            "image": {"path": os.path.abspath(image), "sha256": file_sha256(image)} if image else None,
        }
    return out
