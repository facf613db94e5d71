"""sdtune's model-based filters: data-juicer's own filters with the part that cannot work here replaced.

* ``sdtune_aesthetics_filter`` is data-juicer's ``ImageAestheticsFilter`` (same stats key
  ``image_aesthetics_scores``, same ``any_or_all`` and keep rule) loading the LAION predictor from
  :mod:`sdtune.evaluation.aesthetics` instead of the ``simple-aesthetics-predictor`` package, which
  cannot be installed next to transformers 5. ``min_score``/``max_score`` are on LAION's 0-10 scale
  (data-juicer divides the shunk031 models' scores by ten; this op does not)::

      - sdtune_aesthetics_filter:
          model: /models/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE
          min_score: 5.0
          # allow_pickle: true   # only for a trusted folder holding just pytorch_model.bin

* ``sdtune_image_text_matching_filter`` is data-juicer's ``ImageTextMatchingFilter`` (BLIP ITM,
  stats key ``image_text_matching_score``, ``min_score``/``max_score`` on the match probability
  0-1) scoring the whole caption against each image. data-juicer's op scores only text chunks that
  hold the ``<__dj__image>`` token, which sdtune's captions never hold, so it would keep every image
  without scoring any. A sample without a caption has nothing to match: it gets no score and is
  kept (a captioner or the ``text_length_filter`` decides about it).

* ``image_nsfw_filter`` and ``image_watermark_filter`` stay data-juicer's own classes, re-registered
  under their own names as batched ops (nothing else changes). data-juicer 1.6.1's tracer misses
  every drop of a per-sample filter: the exception wrapper hands it ``[False]`` for a batch of one,
  which it reads as "kept", so no drop would reach dropped.csv. Batched ops are traced correctly;
  sdtune's two filters above are batched for the same reason.

All four run in the stage's own process whatever ``np`` is, and fail loudly (``skip_op_error``
false unless the recipe sets it): see :data:`data_pipeline.models.IN_PROCESS_OPS`.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.ops.filter.image_aesthetics_filter import ImageAestheticsFilter
from data_juicer.ops.filter.image_nsfw_filter import ImageNSFWFilter
from data_juicer.ops.filter.image_text_matching_filter import ImageTextMatchingFilter
from data_juicer.ops.filter.image_watermark_filter import ImageWatermarkFilter
from data_juicer.utils.constant import Fields, StatsKeys
from data_juicer.utils.mm_utils import load_data_with_context, remove_special_tokens
from data_juicer.utils.model_utils import get_model
from PIL import ImageOps

from data_pipeline.models import AESTHETICS, TRANSFORMERS, InStageProcess, register_model_param
from sdtune.data.images import load_rgb
from sdtune.evaluation.aesthetics import load_predictor

AESTHETICS_OP = "sdtune_aesthetics_filter"
ITM_OP = "sdtune_image_text_matching_filter"


def _load_predictor(path: str, allow_pickle: bool = False, device: str = "cpu"):
    """``(model, image processor)`` for data-juicer's ``get_model`` (called once per process)."""
    return load_predictor(path, key=f"{AESTHETICS_OP}.model", allow_pickle=allow_pickle, device=device)


@OPERATORS.register_module(module_name=AESTHETICS_OP, force=True)
class SdtuneAestheticsFilter(InStageProcess, ImageAestheticsFilter):
    """Keep samples whose LAION aesthetic score (0-10) lies in [min_score, max_score]."""

    _batched_op = True  # traced (see the module's docstring)

    def __init__(self, model: str = "", min_score: float = 5.0, max_score: float = 10.0, any_or_all: str = "any",
                 allow_pickle: bool = False, *args, **kwargs):
        """
        Initialization method.

        :param model: a local folder of the LAION aesthetic predictor (simple-aesthetics-predictor's
            layout, e.g. shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE downloaded).
        :param min_score: lowest score kept, on LAION's 0-10 scale.
        :param max_score: highest score kept, on LAION's 0-10 scale.
        :param any_or_all: with several images per sample: keep when 'any' or 'all' of them pass.
        :param allow_pickle: load a folder whose weights are only pickles (pytorch_model.bin), which can
            run arbitrary code: only for a file you trust. Refused (before any image is read) otherwise.
        :param args: extra args
        :param kwargs: extra args
        """
        kwargs["memory"] = kwargs.get("memory") or "1500MB"
        Filter.__init__(self, *args, **kwargs)  # not ImageAestheticsFilter's: it imports the package
        if any_or_all not in ("any", "all"):
            raise ValueError(f"{AESTHETICS_OP}: any_or_all={any_or_all!r}; one of 'any', 'all'.")
        self.min_score, self.max_score, self.any = min_score, max_score, any_or_all == "any"
        self.need_normalized_by_ten = False  # the score stays on LAION's 0-10 scale
        self.model_key = partial(_load_predictor, model, allow_pickle is True)


@OPERATORS.register_module(module_name=ITM_OP, force=True)
class SdtuneImageTextMatchingFilter(InStageProcess, ImageTextMatchingFilter):
    """Keep samples whose BLIP image-text match probability for the whole caption is in range."""

    _batched_op = True

    def compute_stats_single(self, sample, rank=None, context=False):
        stats = sample[Fields.stats]
        if StatsKeys.image_text_matching_score in stats:
            return sample
        text = remove_special_tokens(sample.get(self.text_key) or "").strip()
        if not sample.get(self.image_key) or not text:  # no image, or no caption to match: kept unscored
            stats[StatsKeys.image_text_matching_score] = np.array([], dtype=np.float64)
            return sample
        keys = sample[self.image_key]
        # load_rgb: the picture training sees (transparency on white; data-juicer's load_image makes it black)
        sample, images = load_data_with_context(sample, context, keys, load_rgb, mm_bytes_key=self.image_bytes_key)
        model, processor = get_model(self.model_key, rank, self.use_cuda())
        scores = []
        for key in keys:
            image = images[key]
            image = ImageOps.mirror(image) if self.horizontal_flip else image
            image = ImageOps.flip(image) if self.vertical_flip else image
            inputs = processor(text=text, images=image, return_tensors="pt", truncation=True, padding=True,
                               max_length=model.config.text_config.max_position_embeddings).to(model.device)
            with torch.no_grad():
                scores.append(float(model(**inputs).itm_score.detach().cpu().softmax(dim=-1)[0, 1]))
        reduce = {"avg": np.mean, "max": np.max, "min": np.min}[self.reduce_mode]
        stats[StatsKeys.image_text_matching_score] = [float(reduce(scores))]
        return sample


@OPERATORS.register_module(module_name="image_nsfw_filter", force=True)
class TracedNSFWFilter(InStageProcess, ImageNSFWFilter):
    """data-juicer's ``image_nsfw_filter`` (label 1's probability in [min_score, max_score]), traced."""

    _batched_op = True


@OPERATORS.register_module(module_name="image_watermark_filter", force=True)
class TracedWatermarkFilter(InStageProcess, ImageWatermarkFilter):
    """data-juicer's ``image_watermark_filter`` (label 1's probability at most prob_threshold), traced."""

    _batched_op = True


register_model_param(AESTHETICS_OP, "model", AESTHETICS)
register_model_param(ITM_OP, "hf_blip", TRANSFORMERS)
