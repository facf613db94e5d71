"""Readable drop reasons for the model-based filters: the measured value and the bound it crossed.

Each filter leaves one value per image in its stats (one per caption for image-text matching);
the reason names the first value outside the op's effective ``[min, max]``, e.g.
``sdtune_aesthetics_filter: aesthetic score 4.21 is below min 5.0``. The scales: aesthetic score
0-10 (LAION), NSFW score and watermark probability 0-1 (the classifier's label-1 probability),
match score 0-1 (BLIP's image-text match probability). :data:`MODEL_EXPLAIN` joins
:data:`data_pipeline.reasons.EXPLAIN`.
"""

from __future__ import annotations

from collections.abc import Callable


def _values(stats: dict, key: str) -> list[float]:
    value = stats.get(key)
    if value is None:
        return []
    return [float(v) for v in (value if isinstance(value, list | tuple) else list(value))]


def _outside(what: str, key: str, low_key: str | None, high_key: str) -> Callable:
    """An EXPLAIN function for a filter keeping ``stats[key]`` values within ``[p[low_key], p[high_key]]``."""

    def explain(p: dict, s: dict, size) -> str | None:
        low = p.get(low_key) if low_key else None
        high = p.get(high_key)
        for v in _values(s, key):
            if low is not None and v < low:
                return f"{what} {v:.4g} is below min {low}"
            if high is not None and v > high:
                return f"{what} {v:.4g} is above max {high}"
        return None

    return explain


MODEL_EXPLAIN: dict[str, Callable] = {
    "sdtune_aesthetics_filter": _outside("aesthetic score", "image_aesthetics_scores", "min_score", "max_score"),
    "image_nsfw_filter": _outside("NSFW score", "image_nsfw_score", "min_score", "max_score"),
    "image_watermark_filter": _outside("watermark probability", "image_watermark_prob", None, "prob_threshold"),
    "sdtune_image_text_matching_filter": _outside(
        "image-text match score", "image_text_matching_score", "min_score", "max_score"
    ),
}
