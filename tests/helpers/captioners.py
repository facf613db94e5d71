"""Tiny random captioners and taggers, saved to folders as the real ones ship, for the data stage's tests.

* :func:`build_blip`: a BlipForConditionalGeneration (2 layers, 32 wide) with a BertTokenizer over a
  60-word vocabulary and a 32 px BlipImageProcessor; random weights, so its captions are word salad,
  but deterministic for one image and settings.
* :func:`build_wd14`: a WD14-style tagger: ``model.onnx`` (NHWC float32 0-255 BGR in, mean over the
  pixels, MatMul with known weights, Sigmoid out) and ``selected_tags.csv``; :func:`wd14_probs` gives
  the probabilities it computes, so a test knows which tags cross the thresholds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

WORDS = ("a photo of the cat dog red blue green tree sky house man woman car on in with and small big old new "
         "river mountain field city street night day light dark water stone wood flower bird horse boat bridge "
         "road window door table chair girl boy hat coat sun moon cloud snow rain grass sand wall").split()


def build_blip(folder: Path) -> Path:
    """Save a tiny random BLIP captioner (model, tokenizer, image processor) to ``folder``."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    (folder / "vocab.txt").unlink()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=128, encoder_hidden_size=32, initializer_range=0.5,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  image_size=32, patch_size=8, initializer_range=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model.save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


TAGS = [  # (name, category): 9 rating, 0 general, 4 character
    ("general", 9), ("sensitive", 9), ("1girl", 0), ("solo", 0), ("long_hair", 0), ("blue_sky", 0),
    ("outdoors", 0), ("^_^", 0), ("smile", 0), ("hatsune_miku", 4), ("red_eyes", 0), ("simple_background", 0),
]  # fmt: skip


def wd14_weights(seed: int = 0, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The tagger's (3 x n_tags) weights and bias: the logit of each tag from the mean B, G, R / 255."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 4, (3, len(TAGS))).astype(np.float32) / 255.0, rng.normal(0, 1, len(TAGS)).astype(np.float32)


def build_wd14(folder: Path, size: int = 16) -> Path:
    """Save a tiny WD14-style tagger (``model.onnx`` + ``selected_tags.csv``) to ``folder``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weight, bias = wd14_weights(size=size)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0", "axes"], ["pooled"], keepdims=0),  # (N, 3)
            helper.make_node("MatMul", ["pooled", "weight"], ["logits0"]),
            helper.make_node("Add", ["logits0", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [None, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [None, len(TAGS)])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
         numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, cat, 1000 - i] for i, (name, cat) in enumerate(TAGS))
    return folder


def wd14_probs(image, size: int = 16) -> dict[str, float]:
    """What :func:`build_wd14`'s tagger gives ``image`` (an RGB PIL image), preprocessed as WD14 expects."""
    from PIL import Image

    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixels = np.asarray(canvas.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)[:, :, ::-1]
    weight, bias = wd14_weights(size=size)
    logits = pixels.mean(axis=(0, 1)) @ weight + bias
    return {name: float(p) for (name, _), p in zip(TAGS, 1 / (1 + np.exp(-logits)))}


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


LLAVA_TEMPLATE = (
    "{% for m in messages %}<|user|> {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|end|> {% endfor %}{% if add_generation_prompt %}<|bot|> {% endif %}"
)


def build_llava(folder: Path) -> Path:
    """Save a tiny random chat VLM (LlavaForConditionalGeneration: CLIP vision tower, Llama text model,
    a word-level tokenizer and a chat template) to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<pad>", "<|end|>", "<image>", "<|user|>", "<|bot|>", "<unk>"]
    words = dict.fromkeys([*WORDS, *"describe this image in one detailed sentence for text-to-image training caption."
                           .split()])  # fmt: skip
    vocab = {w: i for i, w in enumerate([*special, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
    backend.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                               num_additional_image_tokens=1)  # fmt: skip
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=3, eos_token_id=vocab["<|end|>"]),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


FLORENCE_POST_PROCESSING = {  # as the Hub's Florence-2 processors ship it; post_process_generation needs the keys
    "ocr": {"pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]}, "pure_text": {}, "description_with_bboxes": {},
    "description_with_polygons": {}, "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {},
}  # fmt: skip


def build_florence(folder: Path) -> Path:
    """Save a tiny random Florence-2 (Florence2ForConditionalGeneration: a 2-stage DaViT vision tower, a
    1+1-layer BART; Florence2Processor with the PIL CLIP image processor and a byte-level BPE tokenizer over
    printable ASCII plus :data:`WORDS`, with ``<image>`` as its image token) to ``folder``."""
    import torch
    from transformers import BartTokenizer, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    byte_chars = bytes_to_unicode()
    tokens, merges = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<image>"], []
    tokens += [byte_chars[b] for b in range(32, 127)]  # printable ASCII; " " is "Ġ"
    for word in dict.fromkeys(WORDS):  # "Ġcat" from "Ġ"+"c", "Ġc"+"a", "Ġca"+"t"
        piece = byte_chars[32]
        for ch in word:
            merges.append((piece, ch))
            piece += ch
            tokens.append(piece)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tokenizer = BartTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)),
                              extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    # 32 px through strides 4 and 2: 4 x 4 visual tokens, plus the one pooled over them
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                            image_seq_length=17)  # fmt: skip
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], window_size=2,
                  projection_dim=32, max_position_embeddings=8, drop_path_rate=0.0)  # fmt: skip
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)  # fmt: skip
    text = dict(model_type="bart", vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=128, init_std=0.5, forced_eos_token_id=tokenizer.eos_token_id, **ids)  # fmt: skip
    torch.manual_seed(0)
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(folder)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                       post_processor_config=FLORENCE_POST_PROCESSING).save_pretrained(folder)  # fmt: skip
    return folder
