"""Text-encoder outputs computed once per caption, in memory and optionally on disk.

With frozen text encoders the embedding of a caption never changes, so encoding it every step is
wasted work, and keeping the encoders on the accelerator wastes memory: Kolors' ChatGLM-6B alone is
about 12 GB in half precision. The trainer fills this cache at fit start, then moves the encoders
off the accelerator; training steps only look embeddings up.

On disk, each caption's tensors are one ``.safetensors`` file whose name hashes everything the
values depend on: family, model, revision, dtype, max token length and the caption itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .families import ModelFamily, ModelParts
from .io import atomic_path

log = logging.getLogger(__name__)


class TextEmbeddingCache:
    def __init__(self, family: ModelFamily, parts: ModelParts, *, model_key: str, dtype: torch.dtype, disk_dir: Path | None = None):
        self.family = family
        self.parts = parts
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._key_base = json.dumps(
            [family.name, model_key, str(dtype), family.text_max_length(parts)], sort_keys=True
        )
        # With a disk cache, rows are read per batch instead of held: Kolors' are ~2 MiB each.
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.on_disk: set[str] = set()
        self.encoded = 0  # captions run through the encoders (not read from disk)

    def key(self, caption: str) -> str:
        return hashlib.sha256(json.dumps([self._key_base, caption]).encode("utf-8")).hexdigest()

    def _disk_path(self, caption: str) -> Path | None:
        return self.disk_dir / f"{self.key(caption)}.safetensors" if self.disk_dir else None

    @torch.no_grad()
    def fill(self, captions: Iterable[str], *, batch_size: int = 8) -> None:
        """Make sure every caption is cached; encode only the ones found neither in memory nor on disk."""
        todo = []
        for caption in dict.fromkeys(captions):
            if caption in self.memory or caption in self.on_disk:
                continue
            path = self._disk_path(caption)
            if path is not None and path.is_file():
                self.on_disk.add(caption)
            else:
                todo.append(caption)
        if not todo:
            return
        for start in tqdm(range(0, len(todo), batch_size), desc="caching text embeddings", unit="batch", disable=len(todo) <= batch_size):
            chunk = todo[start : start + batch_size]
            out = self.family.encode_prompts(self.parts, chunk)
            for i, caption in enumerate(chunk):
                row = {k: v[i].detach().to("cpu").contiguous() for k, v in out.items()}
                path = self._disk_path(caption)
                if path is None:
                    self.memory[caption] = row
                else:
                    with atomic_path(path) as tmp:
                        save_file(row, str(tmp))
                    self.on_disk.add(caption)
            self.encoded += len(chunk)
        log.info("cached text embeddings for %d caption(s)", len(todo))

    def lookup(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Stacked embeddings for a batch of captions; every caption must have been filled."""
        missing = [c for c in captions if c not in self.memory and c not in self.on_disk]
        if missing:
            raise KeyError(f"caption not in the text-embedding cache: {missing[0]!r}")
        rows = [self.memory[c] if c in self.memory else load_file(str(self._disk_path(c))) for c in captions]
        return {k: torch.stack([r[k] for r in rows]).to(device, non_blocking=True) for k in rows[0]}
