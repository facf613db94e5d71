"""``sdtune_image_tagger``: booru tags as captions with a WD14-family tagger, on onnxruntime.

SmilingWolf's taggers (``SmilingWolf/wd-vit-tagger-v3``, ``wd-swinv2-tagger-v3``, ...) ship
``model.onnx`` and ``selected_tags.csv`` (``tag_id,name,category,count``; category 9 rating, 0
general, 4 character). data-juicer has no operator for them (its ``image_tagging_mapper`` runs the
RAM model), so this is a small Mapper of its own, written like ``sdtune_image_deduplicator``.

Preprocessing is the reference taggers': transparency composited onto white (as training sees
the image, :func:`sdtune.data.images.to_rgb`), the image on a white square canvas, resized (bicubic) to
the ONNX input's side, RGB -> BGR, float32 0-255, NHWC. Tags are general ones with probability above
``general_threshold`` and character ones above ``character_threshold`` (ratings are never written),
highest probability first, minus ``exclude_tags``, at most ``max_tags`` (0: all); underscores
become spaces except in kaomoji (``^_^``). They are joined with ", " (kohya's format) and written
with the same ``mode``/``trigger`` rules and ``sdtune_caption_by`` column as the captioner
(:mod:`data_pipeline.ops.captioning`).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
from data_juicer.ops.base_op import OPERATORS, Mapper
from PIL import Image

from data_pipeline.captioning import CaptionWriter, check_mode
from data_pipeline.models import WD14, InStageProcess, register_model_param
from sdtune.data.images import load_rgb

OP_NAME = "sdtune_image_tagger"
RATING, GENERAL, CHARACTER = 9, 0, 4
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}  # fmt: skip

register_model_param(OP_NAME, "model", WD14)


def model_folder(model: str) -> Path:
    """A local tagger folder, or the Hub repo's two files fetched (from the cache when there)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import hf_hub_download  # deferred: only for a Hub id

    hf_hub_download(model, "selected_tags.csv")
    return Path(hf_hub_download(model, "model.onnx")).parent


@lru_cache(maxsize=4)
def load_tagger(model: str):
    """(onnxruntime session, input side, [(name, category)]); cached per process."""
    import onnxruntime

    folder = model_folder(model)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=onnxruntime.get_available_providers())
    side = session.get_inputs()[0].shape[1]
    with open(folder / "selected_tags.csv", newline="", encoding="utf-8") as fh:
        tags = [(row["name"], int(row["category"])) for row in csv.DictReader(fh)]
    return session, int(side), tags


def preprocess(image: Image.Image, side: int) -> np.ndarray:
    """HWC float32 BGR 0-255 of ``image`` padded to a white square and resized to ``side``."""
    image = image.convert("RGB")
    square = max(image.size)
    canvas = Image.new("RGB", (square, square), (255, 255, 255))
    canvas.paste(image, ((square - image.width) // 2, (square - image.height) // 2))
    if square != side:
        canvas = canvas.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1]


def tag_line(probs, tags, general: float, character: float, max_tags: int, exclude: set[str], underscores: bool) -> str:
    """The caption for one image's probabilities."""
    chosen = [
        (float(p), name)
        for p, (name, cat) in zip(probs, tags)
        if (cat == GENERAL and p > general) or (cat == CHARACTER and p > character)
    ]
    chosen.sort(key=lambda pn: -pn[0])
    names = [n if not underscores or n in KAOMOJI else n.replace("_", " ") for _, n in chosen]
    names = [n for n in names if n not in exclude]
    return ", ".join(names[:max_tags] if max_tags > 0 else names)


@OPERATORS.register_module(module_name=OP_NAME, force=True)
class SdtuneImageTagger(InStageProcess, CaptionWriter, Mapper):
    """Write booru tags (WD14 tagger, onnxruntime) as captions."""

    _batched_op = True

    def __init__(
        self,
        model: str = "SmilingWolf/wd-vit-tagger-v3",
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        max_tags: int = 0,
        exclude_tags: list[str] | str | None = None,
        replace_underscores: bool = True,
        mode: str = "missing",
        trigger: str | None = None,
        batch_size: int = 16,
        *args,
        **kwargs,
    ):
        """
        Initialization method.

        :param model: a WD14 tagger folder (model.onnx, selected_tags.csv) or its Hugging Face Hub id.
        :param general_threshold: general tags above this probability are written.
        :param character_threshold: character tags above this probability are written.
        :param max_tags: at most this many tags, highest probability first; 0 writes all.
        :param exclude_tags: tags never written (a list, or one comma-separated string).
        :param replace_underscores: write "long hair" for long_hair (kaomoji keep theirs).
        :param mode: 'missing' (tag only empty captions), 'replace', or 'prefix' (existing, tags).
        :param trigger: a word put in front of every caption the tagger writes.
        :param batch_size: images per onnxruntime run.
        :param args: extra args
        :param kwargs: extra args
        """
        kwargs["batch_size"] = batch_size
        super().__init__(*args, **kwargs)
        check_mode(OP_NAME, mode, trigger)
        if not (0 <= general_threshold <= 1 and 0 <= character_threshold <= 1) or max_tags < 0 or batch_size < 1:
            raise ValueError(f"{OP_NAME}: thresholds must lie in [0, 1], max_tags >= 0, batch_size >= 1.")
        if isinstance(exclude_tags, str):
            exclude_tags = exclude_tags.split(",")
        self.exclude = {t.strip() for t in exclude_tags or () if t.strip()}
        self.exclude |= {t.replace("_", " ") for t in self.exclude} if replace_underscores else set()
        self.model, self.mode, self.trigger = model, mode, trigger
        self.general, self.character, self.max_tags = float(general_threshold), float(character_threshold), int(max_tags)
        self.underscores = bool(replace_underscores)

    def caption(self, paths: list[str], rank=None) -> list[str]:
        session, side, tags = load_tagger(self.model)
        batch = np.stack([preprocess(load_rgb(p), side) for p in paths])
        probs = session.run(None, {session.get_inputs()[0].name: batch})[0]
        return [tag_line(p, tags, self.general, self.character, self.max_tags, self.exclude, self.underscores)
                for p in probs]  # fmt: skip
