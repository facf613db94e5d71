"""sdtune's own data-juicer operators; importing this package registers them in ``OPERATORS``."""

from data_pipeline.ops.sdtune_image_captioner import OP_NAME as CAPTIONER_OP
from data_pipeline.ops.sdtune_image_captioner import SdtuneImageCaptioner
from data_pipeline.ops.sdtune_image_deduplicator import OP_NAME as IMAGE_DEDUP_OP
from data_pipeline.ops.sdtune_image_deduplicator import SdtuneImageDeduplicator
from data_pipeline.ops.sdtune_image_tagger import OP_NAME as TAGGER_OP
from data_pipeline.ops.sdtune_image_tagger import SdtuneImageTagger
from data_pipeline.ops.sdtune_model_filters import (
    AESTHETICS_OP,
    ITM_OP,
    SdtuneAestheticsFilter,
    SdtuneImageTextMatchingFilter,
)

__all__ = ["AESTHETICS_OP", "CAPTIONER_OP", "IMAGE_DEDUP_OP", "ITM_OP", "TAGGER_OP", "SdtuneAestheticsFilter",
           "SdtuneImageCaptioner", "SdtuneImageDeduplicator", "SdtuneImageTagger", "SdtuneImageTextMatchingFilter"]
