"""The LAION aesthetic predictor, loaded from the folders simple-aesthetics-predictor publishes.

The seeds' Kolors baseline scores images with ``simple-aesthetics-predictor`` (shunk031's
``aesthetics-predictor-*`` folders on the Hugging Face Hub). That package pins transformers < 5 and
torchvision, so it cannot be installed next to sdtune; this module rebuilds the same three models
on plain transformers and torch, with the same parameter names, so those folders load unchanged:

* a CLIP vision tower with its projection (``CLIPVisionModelWithProjection``: keys ``vision_model.*``,
  ``visual_projection.weight``), whose image embedding is divided by its L2 norm, then
* a head on that unit vector: ``AestheticsPredictorV1`` one Linear (``predictor.*``);
  ``AestheticsPredictorV2Linear`` Linear layers 1024, 128, 64, 16, 1 with dropouts between the
  first four (``layers.0/2/4/6/7.*``); ``AestheticsPredictorV2ReLU`` the same with ReLUs
  (``layers.0/3/6/9/11.*``).

The head is chosen from ``config.json``'s ``architectures`` (or, without one, from the weight
names), never from the folder's name. The score is the head's raw output: LAION's 0-10 scale
(about 5 for an average web image, 6.5+ for what LAION-Aesthetics kept), not divided by ten as
data-juicer's own operator does. Folders load from disk only, through the loading gate
(:func:`sdtune.families.source.check_weights`: no pickled weights unless allowed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from sdtune.families.source import check_weights
from sdtune.utils.errors import ConfigError

SCALE = "LAION's 0-10 aesthetic scale"


class _Predictor(CLIPVisionModelWithProjection):
    """CLIP's projected image embedding, L2-normalised, then :meth:`head`; logits [N, 1]."""

    def head(self, embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutputWithNoAttention:
        embeds = super().forward(pixel_values=pixel_values).image_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return ImageClassifierOutputWithNoAttention(logits=self.head(embeds), hidden_states=embeds)


class AestheticsPredictorV1(_Predictor):
    """The first LAION predictor: one Linear (``predictor``)."""

    def __init__(self, config):
        super().__init__(config)
        self.predictor = nn.Linear(config.projection_dim, 1)
        self.post_init()

    def head(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.predictor(embeds)


class AestheticsPredictorV2Linear(_Predictor):
    """The improved predictor's MLP without activations (``layers``)."""

    RELU = False

    def __init__(self, config):
        super().__init__(config)
        widths, drops = (config.projection_dim, 1024, 128, 64, 16), (0.2, 0.2, 0.1, None)
        mods: list[nn.Module] = []
        for (a, b), drop in zip(zip(widths, widths[1:]), drops):
            mods.append(nn.Linear(a, b))
            mods += [nn.ReLU()] if self.RELU else []
            mods += [nn.Dropout(drop)] if drop else []
        self.layers = nn.Sequential(*mods, nn.Linear(16, 1))
        self.post_init()

    def head(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class AestheticsPredictorV2ReLU(AestheticsPredictorV2Linear):
    """The improved predictor's MLP with ReLUs."""

    RELU = True


HEADS = {cls.__name__: cls for cls in (AestheticsPredictorV1, AestheticsPredictorV2Linear, AestheticsPredictorV2ReLU)}
#: the head's Linear layers' weight names, by which a folder without ``architectures`` is recognised
HEAD_KEYS = {
    "AestheticsPredictorV1": {"predictor.weight"},
    "AestheticsPredictorV2Linear": {f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)},
    "AestheticsPredictorV2ReLU": {f"layers.{i}.weight" for i in (0, 3, 6, 9, 11)},
}
FIX = ("Fix: a folder of simple-aesthetics-predictor's layout (e.g. shunk031/aesthetics-predictor-v2-sac-logos-ava1-"
       "l14-linearMSE, downloaded with `huggingface-cli download <id> --local-dir <folder>`): config.json, "
       "preprocessor_config.json and .safetensors weights")


def _weight_names(folder: Path) -> set[str]:
    """The tensor names in the folder's safetensors files (headers only; nothing is loaded)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            names |= set(fh.keys())
    return names


def predictor_problem(folder: Path) -> tuple[str | None, str | None]:
    """``(architecture, None)`` for a predictor folder, else ``(None, what is wrong)``. Reads only
    config.json and the weights' headers, so the stage and the config checks can call it early."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"has no readable config.json ({type(err).__name__})"
    if config.get("model_type") != "clip_vision_model":
        return None, f"is no CLIP vision predictor (config.json model_type {config.get('model_type')!r}, not 'clip_vision_model')"
    names = _weight_names(folder)
    archs = [a for a in config.get("architectures") or [] if a in HEADS]
    if not archs:
        archs = [a for a, keys in HEAD_KEYS.items() if names and keys <= names]
        if not archs:
            return None, (f"names no aesthetic head (config.json architectures {config.get('architectures')!r}, not one "
                          f"of {sorted(HEADS)}, and its .safetensors weights hold no head)")
    arch = archs[-1]  # V2ReLU's keys are no subset of V2Linear's, nor the reverse
    if names and not HEAD_KEYS[arch] <= names:
        return None, f"says {arch} in config.json, but its weights lack {sorted(HEAD_KEYS[arch] - names)}"
    if not (folder / "preprocessor_config.json").is_file():
        return None, "has no preprocessor_config.json (the CLIP image processor's settings)"
    return arch, None


def load_predictor(path: str | Path, *, key: str, allow_pickle: bool = False, device: str | torch.device = "cpu"):
    """``(model, image processor)`` from a local predictor folder; a :class:`ConfigError` names ``key``."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: no such local folder; the aesthetic predictor loads from disk only. {FIX}.")
    check_weights(folder, key=key, allow_pickle=allow_pickle)  # the loading gate: no pickles unless allowed
    arch, problem = predictor_problem(folder)
    if problem:
        raise ConfigError(f"{key}={path}: the folder {problem}. {FIX}.")
    try:
        model = HEADS[arch].from_pretrained(folder, local_files_only=True, use_safetensors=not allow_pickle or None)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}={path}: {arch} could not be loaded ({first[:300]}). {FIX}.") from None
    return model.to(device).eval(), processor


class AestheticScorer:
    """Aesthetic scores of PIL images (``eval.aesthetic_model``), on :data:`SCALE`."""

    def __init__(self, path: str | Path, *, key: str = "eval.aesthetic_model", allow_pickle: bool = False):
        self.model, self.processor = load_predictor(path, key=key, allow_pickle=allow_pickle)

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], device: torch.device | str = "cpu") -> torch.Tensor:
        """[N] float32 CPU: one score per image."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        self.model.to(device)
        try:
            return self.model(pixel_values=pixels.to(device)).logits[:, 0].float().cpu()
        finally:
            self.model.to("cpu")
