"""Aspect-ratio bucketing: every batch has one shape, and images keep their composition.

Each image goes to the bucket (h, w) with about ``resolution**2`` pixels whose aspect ratio is
nearest its own (diffusers' ``generate_aspect_ratio_buckets`` / ``find_nearest_bucket``). An image
smaller than its bucket is not upscaled unless asked: it gets a bucket of its own size, rounded
down to the step, as kohya's ``bucket_no_upscale`` does. The batch sampler then draws batches from
one bucket at a time, reshuffled every epoch from ``seed + epoch``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets
from torch.utils.data import Sampler

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


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share a bucket; order and grouping change with ``set_epoch``.

    With ``num_replicas > 1`` each rank takes every ``num_replicas``-th batch of the same global
    order, so processes never see different shapes in one step and no index is seen twice.
    """

    def __init__(
        self,
        buckets: Sequence[Size],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        groups: dict[Size, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.buckets):
            groups[bucket].append(index)
        batches = []
        for bucket in sorted(groups):
            members = groups[bucket]
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.num_replicas > 1:  # equal count per rank, so no process waits on another
            usable = len(batches) - len(batches) % self.num_replicas
            batches = batches[:usable]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._all_batches()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(self._all_batches()) // self.num_replicas
