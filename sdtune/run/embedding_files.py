"""The run's textual-inversion export: ``<token>.safetensors`` per trained word when ``fit`` ends,
in the format of :mod:`sdtune.inference.embedding_files`."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from sdtune.inference.embedding_files import save_embedding
from sdtune.training.stopping import writes_outputs

log = logging.getLogger(__name__)


class EmbeddingExport(L.Callback):
    """Write ``<dirpath>/<token>.safetensors`` for every trained word at the end of ``fit`` (nothing
    when the run trains no embedding)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        embeddings = getattr(pl_module, "embeddings", None)
        if embeddings is None or not writes_outputs(trainer):
            return
        spec = embeddings.spec
        for token in spec.tokens:
            path = self.dirpath / f"{token}.safetensors"
            metadata = {"sdtune.token": token, "sdtune.init": spec.init, "sdtune.num_vectors": str(spec.num_vectors),
                        "sdtune.family": pl_module.family.name, "sdtune.base_model": str(pl_module.cfg["model"]["path"]),
                        "sdtune.steps": str(trainer.global_step)}
            save_embedding(path, pl_module.family, embeddings.vectors(token), metadata)
            log.info("wrote %s (load as %r)", path, token)
