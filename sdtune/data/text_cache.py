"""Text-encoder outputs computed once per caption, in memory and optionally on disk.

With frozen text encoders the embedding of a caption never changes, so encoding it every step is
wasted work, and keeping the encoders on the accelerator wastes memory: Kolors' ChatGLM-6B alone is
about 12 GB in half precision. The trainer fills this cache at fit start, then moves the encoders
off the accelerator; training steps only look embeddings up.

Rows are held in the training dtype, stacked per output into one tensor with a caption -> row
index, so a lookup is one ``index_select`` (on the device when the table fits
``data.cache_budget_gb``, :mod:`sdtune.data.cache_memory`). On disk (``train.text_cache_dir``), each
caption's tensors are one ``.safetensors`` file whose name hashes everything the values depend on:
family, model, revision, dtype, max token length and the caption itself; a run reads each file
once into memory (or, with ``data.cache_memory=disk``, at each lookup).

When captions are encoded every step (text-encoder LoRA, textual inversion, tag shuffling),
:class:`TokenCache` at least tokenizes each caption once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdtune.data.cache_memory import CacheMemory
from sdtune.families import ModelFamily, ModelParts
from sdtune.utils.io import atomic_path

log = logging.getLogger(__name__)


class TextEmbeddingCache:
    def __init__(self, family: ModelFamily, parts: ModelParts, *, model_key: str, dtype: torch.dtype,
                 disk_dir: Path | None = None, memory: CacheMemory | None = None):
        self.family = family
        self.parts = parts
        self.dtype = dtype
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.placement = memory or CacheMemory("cpu", "cpu")
        self._key_base = json.dumps(
            [family.name, model_key, str(dtype), family.text_max_length(parts)], sort_keys=True
        )
        self.rows: dict[str, int] = {}  # caption -> row of every tensor in self.table
        self.table: dict[str, torch.Tensor] = {}  # output name -> (rows, ...), on self.table_device
        self.table_device: torch.device | None = None
        self.on_disk: set[str] = set()  # data.cache_memory=disk: captions read from their file at each lookup
        self.encoded = 0  # captions run through the encoders (not read from disk)
        self.read = 0  # cache files read

    def key(self, caption: str) -> str:
        return hashlib.sha256(json.dumps([self._key_base, caption]).encode("utf-8")).hexdigest()

    def _disk_path(self, caption: str) -> Path | None:
        return self.disk_dir / f"{self.key(caption)}.safetensors" if self.disk_dir else None

    def _load(self, caption: str) -> dict[str, torch.Tensor]:
        self.read += 1
        return {k: v.to(self.dtype) for k, v in load_file(str(self._disk_path(caption))).items()}

    @torch.no_grad()
    def fill(self, captions: Iterable[str], *, batch_size: int = 8) -> None:
        """Make sure every caption is cached; encode only the ones found neither in memory nor on disk,
        then hold the new rows in memory (reading the ones found on disk once)."""
        new = [c for c in dict.fromkeys(captions) if c not in self.rows and c not in self.on_disk]
        todo = [c for c in new if not (self.disk_dir and self._disk_path(c).is_file())]
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        for start in tqdm(range(0, len(todo), batch_size), desc="caching text embeddings", unit="batch",
                          disable=len(todo) <= batch_size):
            chunk = todo[start : start + batch_size]
            out = self.family.encode_prompts(self.parts, chunk)
            for i, caption in enumerate(chunk):
                fresh[caption] = row = {k: v[i].detach().to("cpu", self.dtype).contiguous() for k, v in out.items()}
                if self.disk_dir is not None:
                    with atomic_path(self._disk_path(caption)) as tmp:
                        save_file(row, str(tmp))
            self.encoded += len(chunk)
        if todo:
            log.info("cached text embeddings for %d caption(s)", len(todo))
        if new:
            self._hold(new, fresh)

    def _hold(self, captions: list[str], fresh: dict[str, dict[str, torch.Tensor]]) -> None:
        """Append ``captions``' rows to the table, placed by ``data.cache_memory`` on the first fill."""
        first = fresh.get(captions[0]) or self._load(captions[0])
        if self.table_device is None:
            size = len(captions) * sum(t.numel() * t.element_size() for t in first.values())
            tier = self.placement.place(size, f"text-embedding cache ({len(captions)} captions, {self.dtype})",
                                        on_disk=self.disk_dir is not None)
            if tier == "disk":
                self.on_disk.update(captions)
                return
            self.table_device = self.placement.device if tier == "device" else torch.device("cpu")
        rows = [first] + [fresh[c] if c in fresh else self._load(c) for c in captions[1:]]
        for name in first:
            stacked = torch.stack([r[name] for r in rows]).to(self.table_device)
            self.table[name] = torch.cat([self.table[name], stacked]) if name in self.table else stacked
        self.rows.update({c: len(self.rows) + i for i, c in enumerate(captions)})

    def lookup(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Stacked embeddings for a batch of captions on ``device``; every caption must have been filled.

        One ``index_select`` per output on the table's device; the row index (and, for a CPU table
        feeding a GPU, the rows) go through pinned memory, so nothing waits for the device.
        """
        missing = [c for c in captions if c not in self.rows and c not in self.on_disk]
        if missing:
            raise KeyError(f"caption not in the text-embedding cache: {missing[0]!r}")
        device = torch.device(device)
        if self.on_disk:
            rows = [self._load(c) for c in captions]
            return {k: torch.stack([r[k] for r in rows]).to(device, non_blocking=True) for k in rows[0]}
        index = _to(torch.tensor([self.rows[c] for c in captions]), self.table_device)
        return {k: _to(t.index_select(0, index), device) for k, t in self.table.items()}


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor bound for CUDA is pinned first so the copy is asynchronous."""
    if tensor.device == device or (device.type == tensor.device.type and device.index is None):
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class TokenCache:
    """Token ids per caption, so a caption encoded every step is tokenized once (bounded: the oldest
    caption is forgotten past ``limit``, e.g. with tag shuffling, which makes new captions each step).

    ``tokenize`` is the family's :meth:`~sdtune.families.ModelFamily.tokenize` over a list of
    captions; rows are independent (padded to the fixed maximum length), so a batch's ids are its
    captions' cached rows stacked.
    """

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]], limit: int = 65536, *,
                 pin: bool = False):
        self.tokenize = tokenize
        self.limit = limit
        self.pin = pin  # a CUDA run: the batch's ids in pinned memory, so their copy to the GPU does not block
        self.ids: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.tokenized = 0  # captions run through the tokenizer

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        new = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if new:
            out = self.tokenize(new)
            self.tokenized += len(new)
            for i, caption in enumerate(new):
                self.ids[caption] = {k: v[i].clone() for k, v in out.items()}
        rows = [self.ids[c] for c in captions]
        while len(self.ids) > self.limit:
            self.ids.popitem(last=False)
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch
