"""The training dataset and its LightningDataModule.

The dataset serves either decoded images (``pixel_values``) or, once ``prepare_latents`` has
filled the on-disk cache, VAE latent distributions (``latent_params``) without decoding anything:
from a :class:`~.latents.LatentStore` read once into memory, or, when the store is on the training
device, only each sample's place in it (``latent_index``; the module gathers the batch there).
Samples carry their SDXL geometry (original size, crop offset, target size) either way.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from sdtune.data.buckets import Size, assign_buckets
from sdtune.data.cache_memory import CacheMemory
from sdtune.data.captions import CaptionOptions, process_caption
from sdtune.data.collate import collate, collate_prior
from sdtune.data.images import load_rgb, plan_crop, record_size, resize_and_crop, to_tensor
from sdtune.data.latent_fill import hold_latents, prepare_latents
from sdtune.data.latents import LatentCache, LatentStore
from sdtune.data.loader import loader_settings
from sdtune.data.masks import MaskSource, load_mask, transform_mask
from sdtune.data.prior import PriorPreservationDataset
from sdtune.data.records import Record, dataset_root
from sdtune.data.sampler import TrainBatchSampler
from sdtune.utils.errors import DataError

log = logging.getLogger(__name__)
_KOHYA_REPEATS = re.compile(r"^(\d+)_")
NO_CAPTION_CHANGES = CaptionOptions()
#: Most samples one epoch may hold with repeats (each epoch's order is a list in memory, ~100 bytes
#: a sample); a dataset larger than this on its own is still taken, once per epoch.
MAX_EPOCH_SAMPLES = 1_000_000


def check_epoch_size(repeats: Sequence[int], *, what: str = "data.repeats", fix: str = "") -> None:
    """Refuse repeat counts that would make one epoch longer than :data:`MAX_EPOCH_SAMPLES` samples
    (and more than the images themselves), before any list of that length is built."""
    total = sum(int(n) for n in repeats)
    if total > max(MAX_EPOCH_SAMPLES, len(repeats)):
        raise DataError(
            f"{what}: one epoch would be {total:,} samples with repeats, over sdtune's limit of "
            f"{MAX_EPOCH_SAMPLES:,} (each epoch's order is held in memory). A repeat count only weighs "
            f"images against the others: 10_a beside 1_b already shows a's images ten times as often. "
            f"Fix: {fix or 'use smaller repeat counts'}."
        )


def folder_repeats(records: Sequence[Record], root, explicit: Mapping[str, int] | None = None) -> list[int]:
    """Repeat count per record: ``explicit[top folder]``, else kohya's ``<N>_name`` prefix of the
    image's folder right under ``root`` (``10_photos/a.png``; ``images/10_photos/a.png`` as
    ``make data`` lays a kohya folder out), else 1. Only that folder counts, so a folder deeper
    down named like ``2023_trip`` is not read as 2023 repeats; ``0_name`` is refused.

    ``root`` is normalised as ``load_records`` does (``~``, relative paths); an image outside it
    (``data.allow_outside_root=true``) has no folder under ``root`` and is repeated once.
    """
    explicit = dict(explicit or {})
    root = dataset_root(root)
    out = []
    largest: tuple[int, str, str | None] = (1, "", None)  # (count, top folder, kohya folder): for the limit
    for rec in records:
        try:
            folders = Path(os.path.abspath(rec.path)).relative_to(root).parts[:-1]
        except ValueError:  # outside data.root
            folders = ()
        if folders and folders[0] in explicit:
            out.append(int(explicit[folders[0]]))
            largest = max(largest, (out[-1], folders[0], None))
            continue
        kohya = folders[1] if len(folders) > 1 and folders[0] == "images" else folders[0] if folders else ""
        match = _KOHYA_REPEATS.match(kohya)
        if match and int(match.group(1)) < 1:
            raise DataError(f"folder {kohya!r} in {root} asks for {match.group(1)} repeats. Fix: rename it "
                            f"to 1{kohya[len(match.group(1)):]} or more (kohya's <N>_name, N >= 1).")
        out.append(int(match.group(1)) if match else 1)
        if match:
            largest = max(largest, (out[-1], folders[0], kohya))
    count, top, kohya = largest
    if kohya:
        check_epoch_size(out, what=f"folder {kohya!r} in {root} asks for {count:,} repeats", fix=(
            f"rename it to e.g. 10_{kohya.split('_', 1)[1]} (kohya's <N>_name: N repeats an epoch), or, if the "
            f"number is part of its name, set its count: '++data.repeats={{{top}:1}}'"))
    else:
        check_epoch_size(out, what=f"data.repeats.{top}={count:,}" if top else "data.repeats",
                         fix=f"set a smaller count, e.g. '++data.repeats={{{top}:10}}'" if top else "")
    return out


class ImageCaptionDataset(Dataset):
    """One item per (record, repeat); images are resized to cover their target size and cropped."""

    def __init__(
        self,
        records: Sequence[Record],
        resolution: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        targets: Sequence[Size] | None = None,
        sizes: Sequence[Size] | None = None,
        repeats: Sequence[int] | None = None,
        captions: CaptionOptions = NO_CAPTION_CHANGES,
        masks: Sequence[MaskSource] | None = None,
    ):
        self.records = list(records)
        self.masks = list(masks) if masks is not None else None  # train.masked_loss: one source per record
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.targets = list(targets) if targets else [(self.resolution, self.resolution)] * len(self.records)
        self.sizes = list(sizes) if sizes else None
        self.caption_options = captions
        repeats = list(repeats or [1] * len(self.records))
        check_epoch_size(repeats)  # before the list below, which holds one entry per sample
        self.index = [r for r, n in enumerate(repeats) for _ in range(n)]
        self.latents: LatentStore | LatentCache | None = None  # set by prepare_latents; a LatentCache reads files
        self.latent_keys: dict[tuple[int, bool], str] = {}

    def __len__(self) -> int:
        return len(self.index)

    def bucket_of(self, item: int) -> Size:
        return self.targets[self.index[item]]

    def pixels(self, r: int, flip: bool, rng: random.Random | None = None, target: Size | None = None
               ) -> tuple[torch.Tensor, Any]:
        """Record ``r``'s crop as a (3, H, W) tensor and its CropInfo; ``target`` overrides its size."""
        record = self.records[r]
        try:
            image = load_rgb(record.path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read training image {record.path}: {err}. Fix or remove it.") from err
        if flip:
            image = ImageOps.mirror(image)  # before cropping, so the crop offset is in the seen frame
        image, info = resize_and_crop(image, target or self.targets[r], center_crop=self.center_crop,
                                      rng=rng or random.Random(0))
        return to_tensor(image), info

    def mask(self, r: int, flip: bool, info) -> torch.Tensor:
        """(1, H, W) loss weights of record ``r``'s crop ``info`` (ones for an image without a mask)."""
        mask = load_mask(self.masks[r], info.original_size)
        if mask is None:
            return torch.ones(1, *info.target_size)
        return transform_mask(mask, flip, info)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``dataset[(item, sample_seed)]`` as the training sampler asks; a bare index draws a seed."""
        item, seed = key if isinstance(key, tuple) else (key, random.getrandbits(63))
        rng = random.Random(seed)  # all of this sample's randomness: flip, caption, crop
        r = self.index[item]
        record = self.records[r]
        flip = self.random_flip and rng.random() < 0.5
        # One of several alternative captions, from this sample's seed: a new pick each epoch, the
        # same on resume. A single caption draws nothing, so its random stream stays as it was.
        text = rng.choice(record.alternatives) if record.alternatives else record.text
        return self.sample(r, flip, process_caption(text, self.caption_options, rng), seed=seed, rng=rng)

    def sample(self, r: int, flip: bool, text: str, *, seed: int = 0, rng: random.Random | None = None,
               target: Size | None = None) -> dict[str, Any]:
        """Record ``r`` as a training sample, mirrored or not, with the given caption (and, with
        masked loss, its mask); ``target`` crops it to another size (prior preservation's class
        samples take their instance batch's bucket)."""
        if self.latents is not None and target in (None, self.targets[r]):
            _, info = plan_crop(self.sizes[r], self.targets[r], center_crop=True)
            sample = self.latents.serve(self.latent_keys[(r, flip)])  # with masks, also latent_mask
        else:
            pixels, info = self.pixels(r, flip, rng, target)
            sample = {"pixel_values": pixels}
            if self.masks is not None:
                sample["mask"] = self.mask(r, flip, info)
        sample.update(
            seed=torch.tensor(seed, dtype=torch.int64),
            text=text,
            original_size=torch.tensor(info.original_size),
            crop_top_left=torch.tensor(info.crop_top_left),
            target_size=torch.tensor(info.target_size),
        )
        return sample


class ValidationView(Dataset):
    """A fixed subset of the training images, never flipped or re-captioned: a loss that compares."""

    def __init__(self, train: ImageCaptionDataset, records: Sequence[int]):
        self.train = train
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict[str, Any]:
        r = self.records[item]
        return self.train.sample(r, False, self.train.records[r].text, seed=item)


class ImageCaptionDataModule(L.LightningDataModule):
    def __init__(
        self,
        records: Sequence[Record],
        *,
        resolution: int,
        batch_size: int = 1,
        num_workers: int | str = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        pin_memory: bool | str = False,
        bucketing: bool = False,
        bucket_step: int = 64,
        bucket_upscale: bool = False,
        repeats: Sequence[int] | None = None,
        captions: CaptionOptions = NO_CAPTION_CHANGES,
        seed: int = 0,
        val_images: int = 0,
        masks: Sequence[MaskSource] | None = None,
        class_records: Sequence[Record] | None = None,
    ):
        """``masks``: one mask source per record (``train.masked_loss``); ``class_records``: the class
        images of DreamBooth prior preservation (:mod:`.prior`), each batch then doubled with them.
        ``num_workers`` / ``pin_memory`` may be ``"auto"``: chosen for the trainer's device in
        :meth:`setup` (:mod:`.loader`)."""
        super().__init__()
        sizes = targets = None
        if bucketing:
            sizes = [record_size(r) for r in records]
            targets = assign_buckets(sizes, resolution, step=bucket_step, upscale=bucket_upscale)
        if not bucketing or bucket_upscale:
            small = sum(1 for h, w in (sizes or (record_size(r) for r in records)) if min(h, w) < resolution)
            if small:
                log.warning(
                    "%d of %d images are smaller than data.resolution=%d and are upscaled; "
                    "data.bucketing=true keeps small images at their own size",
                    small, len(records), resolution,
                )
        self.dataset = ImageCaptionDataset(
            records, resolution, center_crop=center_crop, random_flip=random_flip,
            targets=targets, sizes=sizes, repeats=repeats, captions=captions, masks=masks,
        )
        self.class_dataset = None
        if class_records:
            self.class_dataset = ImageCaptionDataset(
                class_records, resolution, center_crop=center_crop, random_flip=random_flip, captions=captions,
                masks=None if masks is None else [None] * len(class_records),  # class images train unmasked
            )
        # Evenly spread over the (sorted) records, so the validation set is the same every run.
        step = max(1, len(records) // val_images) if val_images else 0
        self.val_set = ValidationView(self.dataset, list(range(0, len(records), step))[:val_images]) if val_images else None
        self.bucketing = bucketing
        self.batch_size = batch_size
        self.loader_config = (num_workers, pin_memory)  # as configured, "auto" included
        self.num_workers, self.pin_memory = loader_settings(num_workers, pin_memory, device_type="cpu")
        self.seed = seed
        self.latent_store: LatentStore | None = None  # the latent cache in memory (prepare_latents)

    @classmethod
    def from_config(cls, records: Sequence[Record], data_cfg: Mapping[str, Any], *, seed: int = 0,
                    masks: Sequence[MaskSource] | None = None,
                    class_records: Sequence[Record] | None = None) -> ImageCaptionDataModule:
        return cls(
            records,
            resolution=data_cfg["resolution"],
            batch_size=data_cfg["batch_size"],
            num_workers=data_cfg["num_workers"],
            center_crop=data_cfg["center_crop"],
            random_flip=data_cfg["random_flip"],
            pin_memory=data_cfg["pin_memory"],
            bucketing=data_cfg.get("bucketing", False),
            bucket_step=data_cfg.get("bucket_step", 64),
            bucket_upscale=data_cfg.get("bucket_upscale", False),
            repeats=folder_repeats(records, data_cfg["root"], data_cfg.get("repeats")),
            captions=CaptionOptions(
                dropout=float(data_cfg.get("caption_dropout", 0.0)),
                shuffle_tags=bool(data_cfg.get("shuffle_tags", False)),
                keep_tags=int(data_cfg.get("keep_tags", 1)),
            ),
            seed=seed,
            val_images=int(data_cfg.get("val_images", 0)),
            masks=masks,
            class_records=class_records,
        )

    def setup(self, stage: str) -> None:
        """Resolve ``data.num_workers`` / ``data.pin_memory`` for the device the trainer trains on."""
        if self.trainer is None:
            return
        devices = self.trainer.num_devices if self.trainer.world_size > 1 else 1  # processes sharing this machine
        self.num_workers, self.pin_memory = loader_settings(
            *self.loader_config, device_type=self.trainer.strategy.root_device.type, processes_per_node=devices)
        if stage == "fit":
            auto = [k for k, v in zip(("num_workers", "pin_memory"), self.loader_config) if v == "auto"]
            log.info("data loader: %d worker process(es)%s, pin_memory=%s%s", self.num_workers,
                     " (persistent)" if self.num_workers else "", self.pin_memory,
                     f" (data.{' and data.'.join(auto)}=auto on {self.trainer.strategy.root_device.type})" if auto else "")

    def captions(self) -> list[str] | None:
        """Every caption a training step can see (for the text-embedding cache); None if unbounded.

        Alternative captions are all listed: each training sample may pick any of them.
        """
        if self.dataset.caption_options.varies:
            return None
        classes = self.class_dataset.records if self.class_dataset is not None else []
        return [c for r in [*self.dataset.records, *classes] for c in r.captions] + [""]

    def prepare_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], cache: LatentCache, *, batch_size: int = 8,
                        memory: CacheMemory | None = None, dtype: torch.dtype = torch.float32) -> int:
        """Encode every (image, flip) the dataset (and the class images) can serve that the cache
        lacks; serve latents after, read once into a :class:`LatentStore` in ``dtype`` placed by
        ``memory`` (None: CPU memory). Returns how many crops were encoded (0: all were cached)."""
        datasets = [ds for ds in (self.dataset, self.class_dataset) if ds is not None]
        fresh: dict[str, dict[str, torch.Tensor]] = {}  # what was just encoded needs no read back
        total = sum(prepare_latents(ds, encode, cache, batch_size=batch_size, fresh=fresh) for ds in datasets)
        if total:
            log.info("encoded %d latent(s) into %s", total, cache.folder)
        self.latent_store = hold_latents(datasets, cache, fresh, memory or CacheMemory("cpu", "cpu"), dtype)
        for ds in datasets:
            ds.latents = self.latent_store if self.latent_store is not None else cache
        return total

    def train_dataloader(self) -> DataLoader:
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        # Without bucketing every item has the same target size: one bucket.
        buckets = [self.dataset.bucket_of(i) for i in range(len(self.dataset))]
        sampler = TrainBatchSampler(buckets, self.batch_size, seed=self.seed, num_replicas=world, rank=rank)
        prior = self.class_dataset is not None
        return DataLoader(
            PriorPreservationDataset(self.dataset, self.class_dataset) if prior else self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_prior if prior else collate,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []  # Lightning skips validation
        # Batch size 1: with buckets the validation images may all have different shapes.
        return DataLoader(self.val_set, batch_size=1, shuffle=False, collate_fn=collate, num_workers=0)
