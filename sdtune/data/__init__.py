"""Training data: folder validation, image transforms, dataset and datamodule."""

from .datamodule import ImageCaptionDataModule, ImageCaptionDataset, collate
from .records import Record, load_records

__all__ = ["ImageCaptionDataModule", "ImageCaptionDataset", "Record", "collate", "load_records"]
