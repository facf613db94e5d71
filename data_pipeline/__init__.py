"""The data-juicer cleaning stage behind ``make data``.

``python -m data_pipeline RAW OUT --recipe R --np N`` reads a raw image+caption collection,
drops files that cannot be trained on (our own Pillow pre-checks), runs a data-juicer recipe
in-process, and writes a training-ready folder (``images/``, ``metadata.csv``) plus a report of
every dropped file and the reason. See ``docs/data_pipeline.md``.
"""
