"""Toy-size building blocks shared by the families' tiny builders (``ModelFamily.build_tiny``).

Real diffusers and transformers classes at miniature sizes, and tokenizers trained here on a few
caption lines: no download, yet every tiny model is saved and loaded like a real one.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

# Words the tiny tokenizers learn merges from: the quickstart captions plus common caption words.
CORPUS = """
a photo of a red circle on a blue background
a photo of a green square on a yellow background
a drawing of a purple triangle on a white background
an anime girl with short purple hair, smiling, in a garden
a small orange cat sitting on a wooden table
a landscape with mountains, a lake and a clear sky
portrait of a person, high quality, detailed, masterpiece
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte to printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_clip_bpe(corpus: str, num_merges: int = 120) -> tuple[dict[str, int], list[str]]:
    """Learn a small CLIP-style BPE vocabulary (byte alphabet, ``</w>`` word ends) from ``corpus``.

    The vocabulary is built the way CLIP's was: every byte character, every byte character with
    ``</w>``, then one entry per learned merge, then the two special tokens.
    """
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower()))
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = tuple(out)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


def build_clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer over a locally trained tiny BPE vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = train_clip_bpe(CORPUS)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"),
            merges=str(Path(tmp) / "merges.txt"),
            model_max_length=model_max_length,
        )


def tiny_clip_text_encoder(tokenizer, hidden_size: int = 32, projection: bool = False):
    """A 2-layer CLIP text encoder sized for ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def tiny_vae():
    """A 4-level AutoencoderKL, so latents are 1/8 of the image side as in the real models."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def sd_noise_scheduler():
    """SD1.5's training noise schedule (scaled-linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def tiny_xl_unet(cross_attention_dim: int, pooled_dim: int, **extra):
    """SDXL-style UNet: linear projections, ``text_time`` added conditioning (6 size ids)."""
    from diffusers import UNet2DConditionModel

    time_dim = 8
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
        norm_num_groups=32,
        **extra,
    )


def sdxl_noise_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


def hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A published ``config.json`` without the bookkeeping keys transformers' configs would keep as attributes."""
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def clip_config(cfg: dict[str, Any]):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**hf_config(cfg))
