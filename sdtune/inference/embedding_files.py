"""Textual-inversion embedding files: the format, read by ``generate``, written by the run's
:class:`~sdtune.run.embedding_files.EmbeddingExport`.

One ``<token>.safetensors`` per trained word, in the layout A1111, ComfyUI and diffusers read:
SD1.5 ``{"emb_params": [n_vectors, 768]}`` (A1111's safetensors embedding, a one-key dict), SDXL
``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (one vector set per text encoder). The key names are
the family's (:attr:`~sdtune.families.base.ModelFamily.embedding_keys`). The safetensors metadata
records the token, init word and base model, which none of those readers needs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sdtune.families import ModelFamily, ModelParts
from sdtune.lora.checks import check_finite, first_line, not_safetensors
from sdtune.lora.keys import detect_format
from sdtune.utils.errors import ConfigError, LoraFileError
from sdtune.utils.io import atomic_path

log = logging.getLogger(__name__)


def embedding_tensors(family: ModelFamily, vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors: one ``[n_vectors, dim]`` tensor per encoder under the family's key."""
    return {key: v.detach().float().cpu().contiguous() for key, v in zip(family.embedding_keys, vectors, strict=True)}


def save_embedding(path: str | Path, family: ModelFamily, vectors: Sequence[torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``path`` atomically, refusing non-finite vectors."""
    from safetensors.torch import save_file

    tensors = embedding_tensors(family, vectors)
    check_finite(tensors, path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_embedding(path: str | Path, family: ModelFamily) -> dict[str, torch.Tensor]:
    """The tensors of an embedding file for ``family``, vetted: readable, the family's keys, finite.

    The tensor names are checked from the header before any tensor is read, so a LoRA or a whole
    model passed as an embedding is named as such (in a message of bounded length) at once."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"embedding file {str(path)!r} does not exist.")
    what = not_safetensors(path)
    if what is not None:
        raise LoraFileError(f"embedding file {str(path)!r} is not a .safetensors file ({what}).")
    keys = list(family.embedding_keys)
    if not keys:
        raise ConfigError(f"embeddings: the {family.name} family cannot use textual-inversion embeddings: {family.embedding_refusal}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            names = list(fh.keys())
            if not (len(keys) == 1 and len(names) == 1) and sorted(names) != sorted(keys):
                raise LoraFileError(not_an_embedding(path, names, family))
            tensors = {k: fh.get_tensor(k) for k in names}
    except LoraFileError:
        raise
    except Exception as err:
        raise LoraFileError(f"embedding file {str(path)!r} cannot be read: {first_line(err)}.") from err
    if len(keys) == 1 and len(tensors) == 1:  # SD1.5: any single-tensor file (diffusers' learned_embeds too)
        tensors = {keys[0]: next(iter(tensors.values()))}
    check_finite(tensors, path)
    return {k: (t.unsqueeze(0) if t.dim() == 1 else t) for k, t in tensors.items()}


def not_an_embedding(path: Path, names: Sequence[str], family: ModelFamily) -> str:
    """Why a file whose tensors are ``names`` is no ``family`` embedding: a LoRA is named as one
    (with the key it belongs under); anything else shows a few of its tensor names, never all."""
    try:
        layout = detect_format(names) if names else None
    except LoraFileError:
        layout = None
    if layout is not None:
        return (f"embedding file {str(path)!r} is a LoRA file ({len(names)} LoRA tensors, {layout} layout), not an "
                f"embedding: pass it as loras=[{str(path)}] (embeddings=[...] takes textual-inversion files).")
    shown = [n if len(n) <= 80 else n[:77] + "..." for n in sorted(names)[:3]]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return (f"embedding file {str(path)!r} holds {shown}{more}, but a {family.name} embedding holds "
            f"{list(family.embedding_keys)}. Fix: use an embedding trained for this model family.")


@dataclass(frozen=True)
class EmbeddingRef:
    path: str
    token: str


def parse_embeddings(items: Sequence[Any] | None) -> list[EmbeddingRef]:
    """``embeddings`` entries: ``path`` (token = the file's stem) or ``{path: ..., token: ...}``."""
    refs = []
    for i, item in enumerate(items or []):
        if isinstance(item, (dict, DictConfig)):
            if "path" not in item:
                raise ConfigError(f"embeddings[{i}] needs a 'path' (got keys {list(item)}).")
            path, token = str(item["path"]), item.get("token")
        else:
            path, token = str(item), None
        refs.append(EmbeddingRef(path, str(token or Path(path).stem)))
    return refs


def read_embeddings(refs: Sequence[EmbeddingRef], family: ModelFamily) -> list[dict[str, torch.Tensor]]:
    """Every file of ``refs`` read and vetted (:func:`read_embedding`): before any model loads."""
    return [read_embedding(ref.path, family) for ref in refs]


def load_embeddings(pipe, parts: ModelParts, family: ModelFamily, refs: Sequence[EmbeddingRef],
                    vetted: Sequence[dict[str, torch.Tensor]] | None = None) -> None:
    """Load each file into ``pipe`` as its token with diffusers' ``load_textual_inversion``, each
    vector set into its own encoder and tokenizer (SDXL: clip_l -> text_encoder, clip_g -> text_encoder_2).
    ``vetted``: the files already read by :func:`read_embeddings` (not read again)."""
    for i, ref in enumerate(refs):
        tensors = vetted[i] if vetted is not None else read_embedding(ref.path, family)
        for key, encoder, tokenizer in zip(family.embedding_keys, parts.text_encoders, parts.tokenizers, strict=True):
            vectors = tensors[key].to(encoder.dtype)
            pipe.load_textual_inversion(vectors, token=ref.token, text_encoder=encoder, tokenizer=tokenizer)
        log.info("embedding %s loaded as %r", ref.path, ref.token)
