"""Training data: folder and metadata reading (``records``), image decoding and transforms, buckets,
captions, masks, prior-preservation batches, the batch sampler, collate, the latent and text caches
and where they live, and the dataset and datamodule.

Import from the module that holds a name (``sdtune.data.records.load_records``): this package
imports nothing, so reading a dataset or a picture does not import Lightning (``datamodule``).
"""
