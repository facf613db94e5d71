"""The training batch sampler: reproducible order, one shape per batch, shardable, resumable.

Each epoch's order comes from ``seed + epoch`` alone. Items are grouped by bucket (one group
without bucketing), shuffled, cut into *global* batches of ``batch_size * num_replicas`` and the
batch order shuffled; rank ``r`` takes slice ``r`` of every global batch. Every item is yielded
with its own sample seed, derived from (seed, epoch, global batch, position), from which the
dataset draws flips, crops and caption dropout and the training step draws noise and timesteps.

So a run gives the same result whatever the number of processes (two ranks of batch 2 see
exactly the samples, and the randomness, of one process with batch 4, whenever each bucket
divides into global batches; otherwise the last one is padded by wrapping around), the number of dataloader
workers, or interruptions: a resumed run calls :meth:`skip` with the batches already done in the
epoch and carries on with the very next one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from sdtune.data.buckets import Size

_SEED_MOD = 2**63 - 1


def sample_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """A well-mixed 63-bit seed for one sample (splitmix64 over the four numbers)."""
    x = 0
    for part in (seed, epoch, batch, position):
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x % _SEED_MOD


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    def __init__(
        self,
        buckets: Sequence[Size],
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ):
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> TrainBatchSampler:
        """Lightning sets the epoch on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``,
        never on the batch sampler itself; a batch sampler that orders items on its own is its own
        inner sampler. Without this every epoch would replay epoch 0's order and sample seeds."""
        return self

    def skip(self, batches: int) -> None:
        """Start the next iteration ``batches`` batches into the epoch (resuming mid-epoch)."""
        self._skip = batches

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        groups: dict[Size, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.buckets):
            groups[bucket].append(index)
        size = self.batch_size * self.num_replicas
        batches = []
        for bucket in sorted(groups):
            members = groups[bucket]
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                if len(chunk) < size and self.num_replicas > 1:
                    # Every rank needs a full slice: wrap around the bucket, as DistributedSampler
                    # pads, so each image is still seen every epoch (a few twice).
                    chunk = chunk + [members[i % len(members)] for i in range(size - len(chunk))]
                batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start, self._skip = self._skip, 0
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for b, batch in enumerate(self.global_batches()):
            if b < start:
                continue
            yield [(item, sample_seed(self.seed, self.epoch, b, lo + k)) for k, item in enumerate(batch[lo:hi])]

    def __len__(self) -> int:
        return len(self.global_batches())


def skip_finished_batches(trainer) -> None:
    """After a mid-epoch restore, make the batch sampler skip the batches the checkpoint had finished.

    Lightning counts the resumed epoch's finished batches (a save at batch end counts that batch as
    finished) and runs only the rest, without calling ``on_train_epoch_start`` for that epoch; the
    sampler, iterated next, must skip as many batches to serve the same ones an uninterrupted run would.
    """
    loop = trainer.fit_loop.epoch_loop
    if not loop.restarting:
        return
    done = loop.batch_progress.current.completed + (1 if loop.restarted_on_train_batch_end else 0)
    if done >= trainer.num_training_batches:
        return  # saved after the epoch's last batch: Lightning moves on to the next epoch, whole
    sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
    if done and hasattr(sampler, "skip"):
        sampler.skip(done)
