"""The training dataset and its LightningDataModule."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .images import load_rgb, resize_and_crop, to_tensor
from .records import Record


class ImageCaptionDataset(Dataset):
    """Images resized on the shorter side, cropped to a square and normalised to [-1, 1]."""

    def __init__(self, records: Sequence[Record], resolution: int, *, center_crop: bool = True, random_flip: bool = False):
        self.records = list(records)
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            image = load_rgb(record.path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read training image {record.path}: {err}. Fix or remove it.") from err
        if self.random_flip and random.random() < 0.5:
            image = ImageOps.mirror(image)  # before cropping, so the crop offset is in the seen frame
        image, info = resize_and_crop(image, (self.resolution, self.resolution), center_crop=self.center_crop, rng=random)
        return {
            "pixel_values": to_tensor(image),
            "text": record.text,
            "original_size": torch.tensor(info.original_size),
            "crop_top_left": torch.tensor(info.crop_top_left),
            "target_size": torch.tensor(info.target_size),
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"text": [s["text"] for s in samples]}
    for key in ("pixel_values", "original_size", "crop_top_left", "target_size"):
        batch[key] = torch.stack([s[key] for s in samples])
    return batch


class ImageCaptionDataModule(L.LightningDataModule):
    def __init__(
        self,
        records: Sequence[Record],
        *,
        resolution: int,
        batch_size: int = 1,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.dataset = ImageCaptionDataset(records, resolution, center_crop=center_crop, random_flip=random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def captions(self) -> list[str]:
        """Every caption a training step can see (for the text-embedding cache)."""
        return [r.text for r in self.dataset.records]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )
