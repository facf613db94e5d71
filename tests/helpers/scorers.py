"""Tiny random scoring models, built with the real transformers classes and saved with save_pretrained.

* :func:`build_aesthetic`: the LAION predictor (CLIP vision tower + projection + an aesthetic head) in
  simple-aesthetics-predictor's folder layout, with a CLIP image processor;
* :func:`build_classifier`: a 2-label ViTForImageClassification (label 1 = nsfw / watermark), as
  data-juicer's NSFW and watermark filters read;
* :func:`build_blip_itm`: a BlipForImageTextRetrieval with a BlipProcessor (tiny BERT vocabulary).

All are 32x32-pixel models of a few thousand parameters: built and saved in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
HEAD_GAIN, GAIN = 1.5, 3.0
WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "the", "cat", "dog", "on", "background"]


def _clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def build_aesthetic(folder: Path, arch: str = "AestheticsPredictorV2Linear", seed: int = 0) -> Path:
    """A tiny random aesthetic predictor; its head's last bias is 5 so scores sit near LAION's middle."""
    from transformers import CLIPVisionConfig

    from sdtune.evaluation.aesthetics import HEADS

    torch.manual_seed(seed)
    model = HEADS[arch](CLIPVisionConfig(**VISION, projection_dim=16)).eval()
    head = model.predictor if arch.endswith("V1") else model.layers
    with torch.no_grad():  # random init gives near-equal outputs; spread them so thresholds separate images
        for layer in [m for m in head.modules() if isinstance(m, torch.nn.Linear)]:
            torch.nn.init.normal_(layer.weight, std=HEAD_GAIN / layer.in_features**0.5)
            torch.nn.init.zeros_(layer.bias)
        (head if arch.endswith("V1") else head[-1]).bias.fill_(5.0)
    model.save_pretrained(folder)
    _clip_processor().save_pretrained(folder)
    return Path(folder)


def build_classifier(folder: Path, label: str = "nsfw", seed: int = 0) -> Path:
    """A tiny random 2-label image classifier (0 = normal, 1 = ``label``) with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(**VISION, num_labels=2, id2label={0: "normal", 1: label}, label2id={"normal": 0, label: 1})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(GAIN)  # probabilities spread over (0, 1), not all about 0.5
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)


def build_blip_itm(folder: Path, seed: int = 0) -> Path:
    """A tiny random BLIP image-text matching model with its processor (BERT tokenizer, tiny vocabulary)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab_file=str(vocab))
    torch.manual_seed(seed)
    text = dict(vocab_size=len(WORDS) + 5, hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, initializer_range=0.2, pad_token_id=0,
                bos_token_id=2, sep_token_id=3)
    model = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config={**VISION, "initializer_range": 0.2}, projection_dim=16)).eval()
    with torch.no_grad():
        model.itm_head.weight.mul_(GAIN)
    model.save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder
