"""Toy-size building blocks of the flow-matching families' tiny builders: a T5 tokenizer and
encoder, and a 16-channel VAE.

Real transformers and diffusers classes, as in :mod:`sdtune.families.tiny_parts`, so a tiny FLUX
or SD3.5 folder is saved and loaded exactly like a downloaded one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sdtune.families.tiny_parts import CORPUS, hf_config


def build_t5_tokenizer(model_max_length: int = 32):
    """A T5 tokenizer with a 100-piece unigram vocabulary trained here on :data:`CORPUS`.

    transformers 5's ``T5Tokenizer(vocab_file=...)`` silently yields a 4-token vocabulary, so the
    pieces go in as ``vocab=[(piece, score), ...]``, with T5's special ids: pad 0, eos 1, unk 2.
    sentencepiece's training is deterministic, so every build gives the same ids.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(CORPUS * 3)
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=100, character_coverage=1.0,
            model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
            num_threads=1,
        )
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "sp.model"))
        pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(3, sp.get_piece_size())]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_config(cfg: dict[str, Any]):
    from transformers import T5Config

    return T5Config(**hf_config(cfg))


def tiny_t5(tokenizer, d_model: int = 32):
    """A 2-layer gated-GELU T5 encoder (T5-XXL's structure: ``T5EncoderModel``, relative position buckets)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
        is_encoder_decoder=False, use_cache=False,
    ))


def tiny_vae16(shift_factor: float, scaling_factor: float):
    """A 4-level AutoencoderKL with 16 latent channels and no quant convs (FLUX's and SD3's VAE layout),
    latents 1/8 of the image side; ``shift_factor`` and ``scaling_factor`` are the family's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )
