"""Which way each logged metric is better: a fact about metric names that several layers need.

Hydra's ``${sdtune_direction:...}`` resolver (:mod:`sdtune.config.resolvers`, for
``hparams_search=optuna``), the evaluation section (:mod:`sdtune.evaluation.config`) and
``python -m sdtune.report --sort`` all read it; it lives here, below all of them, so that the
config layer does not import the evaluation code.
"""

from __future__ import annotations

#: Metrics where larger is better (cosine similarities, and the LAION aesthetic score); every other
#: metric (losses, distances) is better when smaller.
SIMILARITIES = ("clip_t", "clip_i", "dino")
HIGHER_IS_BETTER = (*SIMILARITIES, "aesthetic")


def higher_is_better(metric: str) -> bool:
    """True for similarities (``eval/clip_t``, ``eval/<name>/dino``) and ``eval/aesthetic``, False for
    losses and distances."""
    return str(metric).rsplit("/", 1)[-1] in HIGHER_IS_BETTER


def sweep_direction(metric: str | None) -> str:
    """The Optuna direction for ``optimized_metric``: maximize similarities and aesthetics, minimize the rest."""
    return "maximize" if metric and higher_is_better(metric) else "minimize"
