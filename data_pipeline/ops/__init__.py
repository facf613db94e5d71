"""sdtune's own data-juicer operators; importing this package registers them in ``OPERATORS``."""

from data_pipeline.ops.sdtune_image_deduplicator import OP_NAME as IMAGE_DEDUP_OP
from data_pipeline.ops.sdtune_image_deduplicator import SdtuneImageDeduplicator

__all__ = ["IMAGE_DEDUP_OP", "SdtuneImageDeduplicator"]
