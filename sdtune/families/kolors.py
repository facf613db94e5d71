"""Kolors: SDXL's UNet layout driven by a ChatGLM-6B text encoder (256 tokens, Chinese prompts).

Embeddings are taken exactly as ``KolorsPipeline.encode_prompt`` does: the penultimate hidden
state (ChatGLM is sequence-first, so it is transposed) and the last token of the final hidden state
as the pooled embedding. Micro-conditioning is SDXL's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from sdtune.families.base import ModelFamily, ModelParts
from sdtune.families.quantize_load import text_encoder_kwargs
from sdtune.families.sdxl import micro_conditioning
from sdtune.families.tiny_parts import CORPUS, hf_config, sdxl_noise_scheduler, tiny_vae, tiny_xl_unet

MAX_LENGTH = 256  # KolorsPipeline's max_sequence_length
#: Chinese lines for the tiny ChatGLM tokenizer (Kolors prompts are mostly Chinese).
CORPUS_ZH = [
    "二次元，一个紫色短发小女孩，穿着粉色的裙子，在花园里微笑",
    "一只橘色的小猫坐在木桌上",
    "山川湖泊，晴朗的天空，高质量，细节丰富，杰作",
    "红色的圆形，蓝色的背景",
]


def build_chatglm_tokenizer(folder: Path):
    """A Kolors ChatGLMTokenizer over a sentencepiece model trained here on mixed Chinese/English lines."""
    import sentencepiece as spm
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    corpus = CORPUS + "\n".join(CORPUS_ZH) + "\n"
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


def init_chatglm(model: torch.nn.Module) -> None:
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


class Kolors(ModelFamily):
    name = "kolors"
    default_resolution = 1024
    default_guidance = 5.0
    base_model_version = "kolors"
    # ChatGLM's attention: the fused QKV projection and its output projection (the MLP is dense_h_to_4h/dense_4h_to_h).
    default_text_encoder_lora_targets = ("query_key_value", "dense")
    text_encoder_kinds = ("chatglm",)
    embedding_refusal = (
        "Kolors' ChatGLM tokenizer is a sentencepiece model whose added words diffusers' KolorsPipeline does not "
        "expand or load (it has no load_textual_inversion), so an embedding file would load nowhere."
    )

    def load_text_parts(self, path: str, *, dtype: torch.dtype, revision: str | None, quantize: str | None = None):
        from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        text_encoder = ChatGLMModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype,
                                                    **text_encoder_kwargs(self, 0, quantize, dtype))
        return [tokenizer], [text_encoder]

    def text_max_length(self, parts: ModelParts) -> int:
        return MAX_LENGTH

    def tokenize(self, parts: ModelParts, captions: list[str]) -> dict[str, torch.Tensor]:
        inputs = parts.tokenizers[0](captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        return {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")}

    def encode_tokens(self, parts: ModelParts, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder = parts.text_encoders[0]
        inputs = {k: v.to(encoder.device, non_blocking=True) for k, v in tokens.items()}
        out = encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            output_hidden_states=True,
        )
        return {
            "encoder_hidden_states": out.hidden_states[-2].permute(1, 0, 2).contiguous(),  # (seq, b, d) -> (b, seq, d)
            "text_embeds": out.hidden_states[-1][-1, :, :].clone(),
        }

    def conditioning(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return micro_conditioning(text, batch)

    # diffusers has Kolors ControlNet pipelines only among its community scripts, not in the library.
    pipelines = {
        ("text2img", False): "KolorsPipeline",
        ("img2img", False): "KolorsImg2ImgPipeline",
        ("text2img", True): None,
        ("img2img", True): None,
    }

    def pipeline_components(self, parts: ModelParts) -> dict[str, Any]:
        from diffusers import EulerDiscreteScheduler

        return {
            "vae": parts.vae,
            "text_encoder": parts.text_encoders[0],
            "tokenizer": parts.tokenizers[0],
            "unet": parts.denoiser,
            "scheduler": EulerDiscreteScheduler.from_config(parts.noise_scheduler.config),
        }

    def build_tiny(self, folder: Path) -> None:
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
            init_chatglm(text_encoder)
            pipe = KolorsPipeline(
                vae=tiny_vae(),
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=tiny_xl_unet(
                    cross_attention_dim=64, pooled_dim=hidden, encoder_hid_dim=hidden, encoder_hid_dim_type="text_proj"
                ),
                scheduler=sdxl_noise_scheduler(),
            )
            pipe.save_pretrained(folder)

    def random_text_parts(self, arch, *, meta):
        from diffusers.pipelines.kolors import ChatGLMModel
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

        encoder = ChatGLMModel(ChatGLMConfig(**hf_config(arch["text_encoder"])))
        if meta:
            return [], [encoder]
        init_chatglm(encoder)  # diffusers' ChatGLM leaves its weights uninitialised
        with tempfile.TemporaryDirectory() as tmp:
            return [build_chatglm_tokenizer(Path(tmp))], [encoder]

    def text_shapes(self, arch):
        hidden = arch["text_encoder"]["hidden_size"]
        return {"encoder_hidden_states": (MAX_LENGTH, hidden), "text_embeds": (hidden,)}
