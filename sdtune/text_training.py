"""When the text encoders take part in training: one place that says so, for every feature that needs it.

Textual inversion (``embedding``) trains new rows of the encoders' token embeddings, so captions
must run through the encoders every step, with gradients, on the device. That rules out the text
cache (``train.cache_text_embeddings``), which encodes each caption once and moves the encoders
off the device. Another feature that trains the encoders adds its condition to
:func:`text_encoders_train`; everything else follows from it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)


def text_encoders_train(cfg: Mapping[str, Any]) -> bool:
    """Whether anything in the text encoders trains in this run (today: ``embedding`` is set)."""
    return bool(cfg.get("embedding"))


def text_cache_allowed(cfg: Mapping[str, Any]) -> bool:
    """``train.cache_text_embeddings``, switched off (with one log line) when the encoders train."""
    if not cfg["train"].get("cache_text_embeddings", True):
        return False
    if text_encoders_train(cfg):
        log.info("train.cache_text_embeddings is off for this run: the text encoders train (embedding), so captions "
                 "are encoded every step and the encoders stay on the device")
        return False
    return True


@contextlib.contextmanager
def text_grad(cfg: Mapping[str, Any]) -> Iterator[None]:
    """Gradients through the text encoders only when they train (and grad mode is on, i.e. not in validation)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and text_encoders_train(cfg)):
        yield
