"""Training data: folder validation, image transforms, dataset and datamodule."""

from sdtune.data.collate import collate
from sdtune.data.datamodule import ImageCaptionDataModule, ImageCaptionDataset
from sdtune.data.records import Record, load_records

__all__ = ["ImageCaptionDataModule", "ImageCaptionDataset", "Record", "collate", "load_records"]
