"""Random-initialised miniature base models in real diffusers folder layout.

The demo and the tests cannot download weights, yet they must exercise the exact loading code a
real model goes through. So we build each family's real classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, ...) at toy sizes, build their tokenizers locally, save the lot with
``save_pretrained`` as a diffusers folder, and let the family's ordinary ``load`` read it back.

A folder is built once and reused; it is written to a temporary sibling and renamed into place,
so concurrent builders (parallel test workers) never see a half-written model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)

# Bump when a builder changes shape, so stale cached folders are rebuilt rather than reused.
TINY_FORMAT_VERSION = "3"
_MARKER = "sdtune_tiny.json"

# Words the tiny tokenizers learn merges from: the quickstart captions plus common caption words.
_CORPUS = """
a photo of a red circle on a blue background
a photo of a green square on a yellow background
a drawing of a purple triangle on a white background
an anime girl with short purple hair, smiling, in a garden
a small orange cat sitting on a wooden table
a landscape with mountains, a lake and a clear sky
portrait of a person, high quality, detailed, masterpiece
"""


_CORPUS_ZH = [
    "二次元，一个紫色短发小女孩，穿着粉色的裙子，在花园里微笑",
    "一只橘色的小猫坐在木桌上",
    "山川湖泊，晴朗的天空，高质量，细节丰富，杰作",
    "红色的圆形，蓝色的背景",
]


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

    vocab, merges = train_clip_bpe(_CORPUS)
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


def build_chatglm_tokenizer(folder: Path):
    """A Kolors ChatGLMTokenizer over a sentencepiece model trained here on mixed Chinese/English lines."""
    import sentencepiece as spm
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    corpus = _CORPUS + "\n".join(_CORPUS_ZH) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(corpus * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "sp"),
        vocab_size=160,
        character_coverage=1.0,
        model_type="bpe",
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return ChatGLMTokenizer(vocab_file=str(folder / "sp.model"))


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


def build_tiny_sd15(folder: Path) -> None:
    """Save a tiny SD1.5-architecture pipeline (cross-attention dim 32, 8×8 latents) to ``folder``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_noise_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def _tiny_sdxl_unet(cross_attention_dim: int, pooled_dim: int, **extra):
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


def build_tiny_sdxl(folder: Path) -> None:
    """Tiny SDXL: CLIP encoders of width 32 and 48 (80-d context), pooled 48-d, text_time conditioning.

    The widths differ as in the real model (768 and 1280); diffusers' single-file reader tells
    the two encoders apart by width.
    """
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(tokenizer),
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, hidden_size=48, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_tiny_sdxl_unet(cross_attention_dim=80, pooled_dim=48),
        scheduler=sdxl_noise_scheduler(),
    )
    pipe.save_pretrained(folder)


def _init_chatglm(model: torch.nn.Module) -> None:
    """diffusers' ChatGLM leaves ``_init_weights`` empty (it only ever loads checkpoints), so a
    freshly built one holds uninitialised memory; give it GPT-style initial values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)


def build_tiny_kolors(folder: Path) -> None:
    """Tiny Kolors: a 2-layer ChatGLM (original RoPE) and a UNet with a text projection (32 -> 64)."""
    from diffusers import KolorsPipeline
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_chatglm_tokenizer(Path(tmp))
        hidden = 32
        text_encoder = ChatGLMModel(
            ChatGLMConfig(
                num_layers=2,
                padded_vocab_size=max(len(tokenizer), tokenizer.vocab_size) + 8,
                hidden_size=hidden,
                ffn_hidden_size=2 * hidden,
                kv_channels=8,
                num_attention_heads=4,
                seq_length=256,
                multi_query_attention=True,
                multi_query_group_num=2,
                original_rope=True,  # diffusers' ChatGLM needs it set explicitly
            )
        )
        _init_chatglm(text_encoder)
        pipe = KolorsPipeline(
            vae=tiny_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_tiny_sdxl_unet(
                cross_attention_dim=64, pooled_dim=hidden, encoder_hid_dim=hidden, encoder_hid_dim_type="text_proj"
            ),
            scheduler=sdxl_noise_scheduler(),
        )
        pipe.save_pretrained(folder)


TINY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "sd15": build_tiny_sd15,
    "sdxl": build_tiny_sdxl,
    "kolors": build_tiny_kolors,
}


def tiny_cache_root() -> Path:
    """The only folder tiny models are ever built in: ``$SDTUNE_CACHE``, else ``<repo>/.cache``
    (the same rule as ``paths.cache_dir`` in ``conf/paths/default.yaml``)."""
    from .config import ROOT

    return Path(os.path.realpath(os.environ.get("SDTUNE_CACHE") or ROOT / ".cache"))


def in_tiny_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) lies inside :func:`tiny_cache_root`."""
    real, root = Path(os.path.realpath(Path(path).expanduser())), tiny_cache_root()
    return real != root and root in real.parents


def read_marker(folder: Path) -> dict | None:
    """The build marker of a tiny folder, or None when there is none (or it is not ours)."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and set(marker) == {"family", "version"} else None


def ensure_tiny_model(family: str, folder: str | os.PathLike) -> Path:
    """Return ``folder`` holding the tiny ``family`` model, building it first if needed.

    Only a folder this function built (it carries our marker) is ever replaced; an existing folder
    without the marker is refused, never deleted, whatever it holds.
    """
    folder = Path(folder).expanduser()
    expected = {"family": family, "version": TINY_FORMAT_VERSION}
    marker = read_marker(folder)
    if marker == expected:
        return folder
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; known: {sorted(TINY_BUILDERS)}")
    if folder.exists() and (marker is None or not folder.is_dir()) and not _is_empty_dir(folder):
        raise ModelLoadError(
            f"{folder} exists but was not built by sdtune (no {_MARKER} in it), so it is not replaced by a tiny "
            "model. Fix: move it away, or point model.path (or SDTUNE_CACHE) at another folder."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        TINY_BUILDERS[family](tmp)
        (tmp / _MARKER).write_text(json.dumps(expected))
        if folder.exists():  # empty, or our own stale build from an older version: replace it
            stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process won the race and its folder is already in place.
            if read_marker(folder) != expected:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def prepare_tiny(model_cfg) -> None:
    """Build the tiny model a config asks for (``model.tiny``), but only inside our cache.

    ``model.tiny`` and ``model.path`` also arrive from LoRA headers, which anyone can write, and
    from overrides such as ``experiment=quickstart model.path=/my/model``. So a path outside
    :func:`tiny_cache_root` is never built, created or replaced: it is loaded as the ordinary
    model folder it names (and a missing one fails as missing).
    """
    if not model_cfg.get("tiny"):
        return
    path = str(model_cfg["path"])
    if in_tiny_cache(path):
        ensure_tiny_model(model_cfg["family"], path)
    else:
        log.info("model.path=%s is outside the tiny-model cache %s: loading it as an ordinary model", path, tiny_cache_root())
