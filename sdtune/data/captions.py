"""Per-sample caption augmentation: caption dropout and comma-tag shuffling.

Dropout replaces a caption by "" with probability ``dropout`` (the unconditional case that
classifier-free guidance relies on). Tag shuffling treats the caption as comma-separated tags and
shuffles all but the first ``keep`` (usually the trigger word and class), as kohya's
``shuffle_caption``/``keep_tokens`` do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 1

    @property
    def varies(self) -> bool:
        """Whether a caption can differ from step to step beyond being dropped."""
        return self.shuffle_tags


def process_caption(text: str, options: CaptionOptions, rng: random.Random | None = None) -> str:
    rng = rng or random
    if options.dropout and rng.random() < options.dropout:
        return ""
    if options.shuffle_tags:
        tags = [t.strip() for t in text.split(",") if t.strip()]
        fixed, rest = tags[: options.keep_tags], tags[options.keep_tags :]
        rng.shuffle(rest)
        return ", ".join(fixed + rest)
    return text
