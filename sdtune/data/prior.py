"""DreamBooth prior preservation on the data side: every batch is N instance + N class samples.

As in diffusers' ``train_dreambooth_lora.py`` (``DreamBoothDataset`` + ``collate_fn(with_prior_preservation)``)
and kohya's regularisation images, each instance sample brings one class sample; the batch holds
the N instance samples first, then the N class samples, and ``batch["prior"]`` marks the latter.
The training step then takes ``instance loss + train.prior_loss_weight * class loss``
(:func:`sdtune.training.diffusion.split_prior_loss`); the batch is built by
:func:`sdtune.data.collate.collate_prior`.

Which class image comes with an instance sample, and all of that class sample's own randomness
(flip, caption pick, noise, timestep), come from the instance sample's seed, which the training
sampler derives from (seed, epoch, batch, position): a resumed or multi-process run pairs exactly
the same images with the same noise. The class image is cropped to the instance sample's size, so
a bucketed batch keeps one shape.
"""

from __future__ import annotations

import random
from typing import Any

from torch.utils.data import Dataset

from sdtune.data.sampler import sample_seed

#: Mixed into an instance sample's seed to get its class sample's seed (any fixed number).
CLASS_STREAM = 0x0C1A55


def class_seed(seed: int) -> int:
    """The seed of the class sample paired with the instance sample seeded ``seed``."""
    return sample_seed(int(seed), CLASS_STREAM, 0, 0)


class PriorPreservationDataset(Dataset):
    """``dataset[(item, seed)]``: the instance sample and a class sample picked by its seed."""

    def __init__(self, instance, classes):
        self.instance = instance
        self.classes = classes
        if not len(classes.records):
            raise ValueError("prior preservation needs at least one class image")

    def __len__(self) -> int:
        return len(self.instance)

    def bucket_of(self, item: int):
        return self.instance.bucket_of(item)

    def pick(self, seed: int) -> tuple[int, int]:
        """(class record index, class sample seed) for the instance sample seeded ``seed``."""
        cseed = class_seed(seed)
        return random.Random(cseed).randrange(len(self.classes.index)), cseed

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        item, seed = key
        instance = self.instance[(item, seed)]
        citem, cseed = self.pick(seed)
        rng = random.Random(cseed)
        r = self.classes.index[citem]
        record = self.classes.records[r]
        flip = self.classes.random_flip and rng.random() < 0.5
        text = rng.choice(record.alternatives) if record.alternatives else record.text
        cls = self.classes.sample(r, flip, text, seed=cseed, rng=rng, target=self.instance.bucket_of(item))
        return {"instance": instance, "class": cls}
