"""Full-size SD1.5 / SDXL / Kolors architectures with random weights, built from shipped configs.

The bench must count FLOPs and (on a GPU) time the real architectures without downloading
weights, so ``configs/`` holds the published ``config.json`` of each UNet, VAE, text encoder and
scheduler. ``build_parts`` turns them (or a diffusers folder's own configs, e.g. a tiny model's)
into :class:`~sdtune.families.ModelParts`. On ``torch.device("meta")`` nothing is allocated, so
an SDXL or a 6B-parameter ChatGLM costs no memory; the FLOP counter still sees every operation.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..families import ModelParts
from ..families.kolors import MAX_LENGTH as KOLORS_MAX_LENGTH

CONFIGS = Path(__file__).resolve().parent / "configs"
#: Component -> (diffusers subfolder, config file name inside it).
SUBFOLDERS = {
    "unet": ("unet", "config.json"),
    "vae": ("vae", "config.json"),
    "text_encoder": ("text_encoder", "config.json"),
    "text_encoder_2": ("text_encoder_2", "config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}
TEXT_ENCODERS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"), "kolors": ("text_encoder",)}


def architecture(family: str, folder: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The component configs of ``family``: shipped JSON files, or those of a diffusers ``folder``."""
    names = ("unet", "vae", *TEXT_ENCODERS[family], "scheduler")
    out = {}
    for name in names:
        if folder is None:
            path = CONFIGS / f"{family}_{name}.json"
        else:
            sub, file = SUBFOLDERS[name]
            path = Path(folder) / sub / file
        out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop bookkeeping keys that transformers' config classes would store as attributes."""
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (a 6B encoder in fp32 first would need 24 GB)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _text_encoders(family: str, arch: dict[str, dict[str, Any]], meta: bool) -> list[torch.nn.Module]:
    if family == "kolors":
        from diffusers.pipelines.kolors import ChatGLMModel
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

        from ..tiny import _init_chatglm

        encoder = ChatGLMModel(ChatGLMConfig(**_hf_config(arch["text_encoder"])))
        if not meta:
            _init_chatglm(encoder)  # diffusers' ChatGLM leaves its weights uninitialised
        return [encoder]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders: list[torch.nn.Module] = [CLIPTextModel(CLIPTextConfig(**_hf_config(arch["text_encoder"])))]
    if family == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_hf_config(arch["text_encoder_2"]))))
    return encoders


def _tokenizers(family: str) -> list[Any]:
    """Locally built tokenizers (sdtune.tiny's): random weights need token ids, not a real vocabulary."""
    from ..tiny import build_chatglm_tokenizer, build_clip_tokenizer

    if family == "kolors":
        with tempfile.TemporaryDirectory() as tmp:
            return [build_chatglm_tokenizer(Path(tmp))]
    return [build_clip_tokenizer() for _ in TEXT_ENCODERS[family]]


def build_parts(
    family: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    folder: str | Path | None = None,
    seed: int = 0,
) -> ModelParts:
    """Random-initialised parts of ``family`` (shipped configs, or ``folder``'s) on ``device``.

    On the meta device no tokenizers are built: meta tensors have shapes but no values to encode.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    arch = architecture(family, folder)
    device = torch.device(device)
    meta = device.type == "meta"
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        unet = UNet2DConditionModel.from_config(arch["unet"])
        vae = AutoencoderKL.from_config(arch["vae"])
        encoders = _text_encoders(family, arch, meta)
    return ModelParts(
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=[] if meta else _tokenizers(family),
        noise_scheduler=DDPMScheduler.from_config(arch["scheduler"]),
        source=f"random-init:{family}" if folder is None else str(folder),
    )


def text_shapes(family: str, arch: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the text conditioning a family's ``encode_prompts`` returns.

    Meta tensors cannot run every encoder (ChatGLM's TorchScript rotary kernel refuses them), and
    with cached embeddings the encoders are not part of the step anyway, so FLOP counting only needs
    the shapes, read off the encoder configs.
    """
    te = arch["text_encoder"]
    if family == "sd15":
        return {"encoder_hidden_states": (te["max_position_embeddings"], te["hidden_size"])}
    if family == "sdxl":
        te2 = arch["text_encoder_2"]
        return {
            "encoder_hidden_states": (te["max_position_embeddings"], te["hidden_size"] + te2["hidden_size"]),
            "text_embeds": (te2["projection_dim"],),
        }
    if family == "kolors":
        return {"encoder_hidden_states": (KOLORS_MAX_LENGTH, te["hidden_size"]), "text_embeds": (te["hidden_size"],)}
    raise ValueError(f"unknown family {family!r}")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
