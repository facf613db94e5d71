"""Aspect-ratio bucketing: every batch has one shape, and images keep their composition.

Each image goes to the bucket (h, w) with about ``resolution**2`` pixels whose aspect ratio is
nearest its own (diffusers' ``generate_aspect_ratio_buckets`` / ``find_nearest_bucket``). An image
smaller than its bucket is not upscaled unless asked: it gets a bucket of its own size, rounded
down to the step, as kohya's ``bucket_no_upscale`` does. :class:`~sdtune.data.sampler.TrainBatchSampler` then
draws every batch from one bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets

Size = tuple[int, int]  # (height, width)


def assign_buckets(sizes: Sequence[Size], resolution: int, *, step: int = 64, upscale: bool = False) -> list[Size]:
    """The bucket of every image, given its (height, width)."""
    ladder = generate_aspect_ratio_buckets(resolution, divisibility=step)
    out = []
    for h, w in sizes:
        bh, bw = ladder[find_nearest_bucket(h, w, ladder)]
        if not upscale and (h < bh or w < bw):
            # Fit a bucket inside the image at its own aspect ratio instead of enlarging it.
            scale = min(1.0, (resolution * resolution / (h * w)) ** 0.5)
            bh = max(step, int(h * scale) // step * step)
            bw = max(step, int(w * scale) // step * step)
        out.append((bh, bw))
    return out
