"""The tiny models are real diffusers folders that load through the ordinary paths."""

from __future__ import annotations

import json

import torch
from diffusers import StableDiffusionPipeline

from sdtune.families import get_family
from sdtune.families.tiny import TINY_FORMAT_VERSION, ensure_tiny_model
from sdtune.families.tiny_parts import train_clip_bpe


def test_tiny_folder_has_diffusers_layout_and_loads_with_pipeline(tiny_sd15):
    index = json.loads((tiny_sd15 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd15 / sub).is_dir(), sub
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.vae_scale_factor == 8  # the same 1/8 latent size as real SD


def test_family_load_gives_parts_that_fit_together(tiny_sd15):
    family = get_family("sd15")
    parts = family.load(str(tiny_sd15))
    text = family.encode_prompts(parts, ["a red circle", "二次元，一个紫色短发小女孩"])
    ctx = text["encoder_hidden_states"]
    assert ctx.shape == (2, parts.tokenizers[0].model_max_length, 32)
    latents = parts.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    out = parts.unet(latents.repeat(2, 1, 1, 1), torch.tensor([1, 999]), **family.conditioning(text, {})).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_tiny_model_is_built_once_and_rebuilt_when_stale(tmp_path):
    folder = ensure_tiny_model("sd15", tmp_path / "m")
    weights = next((folder / "unet").glob("*.safetensors"))
    first = weights.stat().st_mtime_ns
    assert ensure_tiny_model("sd15", folder) == folder
    assert weights.stat().st_mtime_ns == first  # reused, not rebuilt
    (folder / "sdtune_tiny.json").write_text(json.dumps({"family": "sd15", "version": TINY_FORMAT_VERSION + "-old"}))
    ensure_tiny_model("sd15", folder)
    assert json.loads((folder / "sdtune_tiny.json").read_text())["version"] == TINY_FORMAT_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # no temporary folders left


def test_clip_bpe_vocabulary_is_clip_shaped():
    vocab, merges = train_clip_bpe("a red circle a red square", num_merges=10)
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    assert "a</w>" in vocab and "red</w>" in vocab  # learned whole-word merges
    assert len(merges) == 10 and all(len(m.split(" ")) == 2 for m in merges)
    assert len(set(vocab.values())) == len(vocab)
