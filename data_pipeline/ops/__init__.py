"""sdtune's own data-juicer operators; importing this package registers them in ``OPERATORS``."""

from data_pipeline.ops.sdtune_image_captioner import OP_NAME as CAPTIONER_OP
from data_pipeline.ops.sdtune_image_captioner import SdtuneImageCaptioner
from data_pipeline.ops.sdtune_image_deduplicator import OP_NAME as IMAGE_DEDUP_OP
from data_pipeline.ops.sdtune_image_deduplicator import SdtuneImageDeduplicator
from data_pipeline.ops.sdtune_image_tagger import OP_NAME as TAGGER_OP
from data_pipeline.ops.sdtune_image_tagger import SdtuneImageTagger

__all__ = ["CAPTIONER_OP", "IMAGE_DEDUP_OP", "TAGGER_OP", "SdtuneImageCaptioner", "SdtuneImageDeduplicator",
           "SdtuneImageTagger"]
