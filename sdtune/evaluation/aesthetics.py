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

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from sdtune.evaluation.aesthetic_folders import FIX, predictor_problem
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
