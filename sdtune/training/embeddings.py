"""Textual inversion and pivotal tuning: new words whose embedding vectors train (``embedding.*``).

Each token in ``embedding.tokens`` is added to every tokenizer of the family; with ``num_vectors``
> 1 a token is ``sks sks_1 ...`` (the names diffusers and A1111 give multi-vector embeddings), and
captions are expanded the way diffusers' ``maybe_convert_prompt`` expands prompts. Each encoder's
input embedding is wrapped by :class:`NewTokenEmbedding`: the original table stays frozen and
bit-for-bit untouched, and the new rows are one small fp32 parameter initialised from the init
word. So only the new rows train (no restore-after-step, and the optimizer's state and weight decay
never see the frozen vocabulary), and a checkpoint holds just those rows.

``with_lora: true`` trains the UNet LoRA beside the embeddings (pivotal tuning); ``false`` trains
the embeddings alone (textual inversion): the LoRA layers stay at their zero start and frozen, and
no LoRA file is written (:func:`lora_trains`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdtune.config.values import boolean, integer, number
from sdtune.families import ModelFamily, ModelParts, get_family
from sdtune.lora.layers import trainable_lora_parameters
from sdtune.utils.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULTS = {"tokens": None, "init": None, "num_vectors": 1, "lr": 5e-3, "with_lora": True}


@dataclass(frozen=True)
class EmbeddingSpec:
    tokens: tuple[str, ...]
    init: str
    num_vectors: int = 1
    lr: float = 5e-3
    with_lora: bool = True

    def names(self, token: str) -> list[str]:
        """The tokenizer words of ``token``: ``sks``, ``sks_1``, ... (diffusers' and A1111's names)."""
        return [token, *(f"{token}_{i}" for i in range(1, self.num_vectors))]

    def all_names(self) -> list[str]:
        return [name for token in self.tokens for name in self.names(token)]

    def expand(self, captions: list[str]) -> list[str]:
        """``a sks dog`` -> ``a sks sks_1 dog`` for multi-vector tokens (whole words only)."""
        if self.num_vectors == 1:
            return captions
        for token in self.tokens:
            pattern = re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])")
            captions = [pattern.sub(" ".join(self.names(token)), c) for c in captions]
        return captions

    def record(self) -> dict[str, Any]:
        """Plain values for checkpoints and headers."""
        return {**asdict(self), "tokens": list(self.tokens)}


def spec_from_config(cfg: Mapping[str, Any]) -> EmbeddingSpec | None:
    """``cfg['embedding']`` as a spec (None: off), or a :class:`ConfigError` naming the bad key."""
    section = cfg.get("embedding")
    if not section:
        return None
    values = {**DEFAULTS, **dict(section)}
    tokens = values["tokens"]
    if isinstance(tokens, str):
        tokens = [tokens]
    if not tokens or not all(isinstance(t, str) and t and not re.search(r"\s", t) for t in tokens):
        raise ConfigError(
            f"embedding.tokens must name one or more new words without spaces, got {values['tokens']!r}. "
            "Fix: e.g. embedding.tokens=[olq]."
        )
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"embedding.tokens lists a word twice: {list(tokens)!r}. Fix: name each new word once.")
    init = values["init"]
    if not isinstance(init, str) or not init.strip():
        raise ConfigError(
            f"embedding.init must be a word the model knows, whose embedding starts the new token(s); got {init!r}. "
            "Fix: e.g. embedding.init=shape (a neutral word), or the class of the concept (dog, style, ...)."
        )
    num = integer("embedding.num_vectors", values["num_vectors"], ge=1, full=True, fix="e.g. embedding.num_vectors=1.")
    lr = number("embedding.lr", values["lr"], gt=0, full=True, fix="e.g. embedding.lr=5e-3.")
    with_lora = boolean("embedding.with_lora", values["with_lora"])
    return EmbeddingSpec(tuple(tokens), init.strip(), num, lr, with_lora)


def check_config(cfg: Mapping[str, Any]) -> None:
    """The ``embedding`` section's check (:data:`sdtune.run.checks.SECTION_CHECKS`): it is well
    formed, the family supports it, and it is not combined with text-encoder LoRA."""
    spec = spec_from_config(cfg)
    if spec is None:
        return
    family = get_family(cfg["model"]["family"])
    if not family.embedding_keys:
        raise ConfigError(
            f"embedding (textual inversion) is not supported for model.family={family.name}: {family.embedding_refusal} "
            "Fix: set embedding=null and teach the word with a LoRA (captions holding the trigger word)."
        )
    if (cfg.get("lora") or {}).get("text_encoder"):
        raise ConfigError(
            "embedding (textual inversion / pivotal tuning) and lora.text_encoder are not combined in one run yet: both "
            "train inside the text encoders. Fix: embedding=null, or lora.text_encoder=null."
        )


#: Made-up words a tokenizer usually splits into pieces: the suggestion when a token is a known word.
RARE_WORDS = ("olq", "zwq", "qxv", "sks")


def known_word(tokenizer: Any, name: str) -> str | None:
    """The vocabulary entry ``name`` already is (``red`` -> ``red</w>``), or None when the tokenizer
    splits it into pieces. A new token of a known word's name would replace that word in every caption."""
    vocab = tokenizer.get_vocab()
    for entry in (name, f"{name}</w>"):
        if entry in vocab:
            return entry
    pieces = tokenizer.tokenize(name)
    return pieces[0] if len(pieces) == 1 and pieces[0] in vocab else None


def check_tokenizer(spec: EmbeddingSpec, tokenizer: Any, index: int, family: str, captions: list[str] = ()) -> None:
    """``spec`` against a real tokenizer of the base (before the model loads where it can be read):
    every new word is new to it, and ``num_vectors`` copies of it fit in its prompt length beside
    the other words of the captions that use it (the rest would be cut off and never trained)."""
    for name in spec.all_names():
        entry = known_word(tokenizer, name)
        if entry is not None:
            free = next((w for w in RARE_WORDS if w not in spec.tokens and known_word(tokenizer, w) is None), "olq")
            raise ConfigError(
                f"embedding.tokens: {name!r} is already a word of the {family} tokenizer {index + 1} ({entry!r}), so a "
                f"new token of that name would replace the word in every caption. Fix: pick a rare made-up string "
                f"that the tokenizer splits into pieces, e.g. embedding.tokens=[{free}]."
            )
    limit = int(tokenizer.model_max_length) - 2  # the tokens between the start and end tokens
    allowed, worst = limit - 1, None  # a caption holds at least one other word
    for token in spec.tokens:
        pattern = re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])")
        for caption in dict.fromkeys(captions):
            uses = len(pattern.findall(caption))
            if not uses:
                continue
            other = len(tokenizer(pattern.sub(" ", caption), add_special_tokens=False).input_ids)
            if (limit - other) // uses < allowed:
                allowed, worst = (limit - other) // uses, (caption, other)
    if spec.num_vectors > max(allowed, 1):
        where = (f"the caption {worst[0][:80]!r} needs {worst[1]} for its other words" if worst else
                 "a caption needs at least one more for its other words")
        raise ConfigError(
            f"embedding.num_vectors={spec.num_vectors} is more than a prompt can hold: the {family} tokenizer "
            f"{index + 1} reads {tokenizer.model_max_length} tokens ({limit} between its start and end tokens) and "
            f"{where}, so at most {max(allowed, 1)} vector(s) per word fit; the rest would be cut off every step "
            f"and never trained. Fix: embedding.num_vectors={max(1, min(allowed, 8))} (1-8 is usual)."
        )


def check_base(cfg: Mapping[str, Any], source: str, captions: list[str]) -> None:
    """:func:`check_tokenizer` with the tokenizers of a diffusers folder ``source``, before its
    weights load (other sources: :func:`install` checks the loaded tokenizers)."""
    from pathlib import Path

    spec = spec_from_config(cfg)
    if spec is None:
        return
    family = get_family(cfg["model"]["family"])
    folders = [sub.replace("text_encoder", "tokenizer") for sub in family.text_encoder_subfolders]
    if not family.embedding_keys or not all((Path(source) / f).is_dir() for f in folders):
        return
    from transformers import CLIPTokenizer

    for index, folder in enumerate(folders):
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=folder)
        check_tokenizer(spec, tokenizer, index, family.name, list(captions))


def lora_trains(cfg: Mapping[str, Any]) -> bool:
    """False for textual inversion alone (``embedding.with_lora: false``): no UNet LoRA trains or is written."""
    spec = spec_from_config(cfg)
    return spec is None or spec.with_lora


class NewTokenEmbedding(nn.Module):
    """An encoder's token embedding plus trainable rows for the ids ``start .. start + len(rows) - 1``.

    Ids below ``start`` read the frozen ``base`` table; the new ids read ``rows`` (which may lie past
    the end of ``base``), so the base table is never resized or written.
    """

    def __init__(self, base: nn.Embedding, start: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.start = start
        self.rows = nn.Parameter(rows.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The full table (base rows, then the new ones), for code that reads ``embedding.weight``."""
        return torch.cat([self.base.weight[: self.start], self.rows.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = (ids >= self.start) & (ids < self.start + self.rows.shape[0])
        out = self.base(torch.where(new, torch.zeros_like(ids), ids))
        extra = F.embedding((ids - self.start).clamp(0, self.rows.shape[0] - 1), self.rows).to(out.dtype)
        return torch.where(new.unsqueeze(-1), extra, out)


class TrainedEmbeddings(nn.Module):
    """The new rows of every encoder, one parameter per encoder (``rows.<i>``): what the optimizer
    trains and what checkpoints hold. Registered on the LightningModule as ``embeddings``."""

    def __init__(self, spec: EmbeddingSpec, layers: list[NewTokenEmbedding]):
        super().__init__()
        self.spec = spec
        self.layers = layers  # plain list: the encoders own these modules; only the rows register here
        self.rows = nn.ParameterList([layer.rows for layer in layers])

    def vectors(self, token: str) -> list[torch.Tensor]:
        """``token``'s trained vectors, one ``[num_vectors, dim]`` tensor per encoder."""
        index = self.spec.tokens.index(token) * self.spec.num_vectors
        return [rows.detach()[index : index + self.spec.num_vectors].float().cpu().contiguous() for rows in self.rows]


def install(cfg: Mapping[str, Any], family: ModelFamily, parts: ModelParts) -> TrainedEmbeddings | None:
    """Add the new tokens to ``parts``' tokenizers and encoders as ``cfg['embedding']`` says (None: off)."""
    spec = spec_from_config(cfg)
    if spec is None:
        return None
    check_config(cfg)
    names = spec.all_names()
    layers = []
    for i, (tokenizer, encoder) in enumerate(zip(parts.tokenizers, parts.text_encoders)):
        check_tokenizer(spec, tokenizer, i, family.name)
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ConfigError(f"embedding.tokens: the {family.name} tokenizer {i + 1} gave the new words ids {ids}, not consecutive ones.")
        base = encoder.get_input_embeddings()
        init_ids = tokenizer(spec.init, add_special_tokens=False).input_ids
        if not init_ids:
            raise ConfigError(f"embedding.init={spec.init!r} gives no tokens. Fix: a word, e.g. embedding.init=shape.")
        init = base.weight.detach()[init_ids].float().mean(dim=0)  # several tokens: their mean
        layer = NewTokenEmbedding(base, ids[0], init.expand(len(names), -1))
        encoder.set_input_embeddings(layer)
        layers.append(layer)
    if not spec.with_lora:
        for param in trainable_lora_parameters(parts.denoiser):  # zero start (B = 0): the denoiser stays the base
            param.requires_grad_(False)
    log.info("embedding: training %d new vector(s) per encoder for %s (init %r)%s", len(names), list(spec.tokens),
             spec.init, " with the UNet LoRA (pivotal tuning)" if spec.with_lora else " alone (textual inversion)")
    return TrainedEmbeddings(spec, layers)


def param_group(embeddings: TrainedEmbeddings) -> dict[str, Any]:
    """The optimizer param group of the new rows, at ``embedding.lr`` (after the LoRA's groups, see
    :func:`sdtune.training.optimization.build_optimization`)."""
    return {"params": list(embeddings.rows), "lr": embeddings.spec.lr, "name": "embedding"}


def check_resume(saved: Mapping[str, Any] | None, spec: EmbeddingSpec | None) -> None:
    """Refuse a checkpoint whose ``embedding`` setup differs from the config's (its rows would not fit)."""
    now = spec.record() if spec is not None else None
    if saved != now:
        raise ConfigError(
            f"cannot resume: the checkpoint was trained with embedding={saved!r}, the config says embedding={now!r}. "
            "Fix: resume with that run's embedding settings (its config.yaml is in the run folder), or start a new run."
        )
