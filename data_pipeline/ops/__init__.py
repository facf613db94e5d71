"""sdtune's own data-juicer operators; importing this package registers them in ``OPERATORS``."""

from data_pipeline.ops.sdtune_image_deduplicator import OP_NAME as IMAGE_DEDUP_OP
from data_pipeline.ops.sdtune_image_deduplicator import SdtuneImageDeduplicator
from data_pipeline.ops.sdtune_model_filters import (
           AESTHETICS_OP,
           ITM_OP,
           SdtuneAestheticsFilter,
           SdtuneImageTextMatchingFilter,
)

__all__ = ["AESTHETICS_OP", "IMAGE_DEDUP_OP", "ITM_OP", "SdtuneAestheticsFilter", "SdtuneImageDeduplicator",
           "SdtuneImageTextMatchingFilter"]
