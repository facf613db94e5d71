"""``sdtune_image_captioner``: a data-juicer Mapper that writes captions with a BLIP-family captioner,
Florence-2 or a chat VLM (Qwen2.5-VL, Qwen2-VL, SmolVLM, ...), deterministically.

It is a small op of its own, not a subclass of data-juicer's ``image_captioning_mapper``, because
that op's behaviour is hard-coded in the very method a subclass would reuse
(``_process_single_sample``): it always samples (``do_sample=True``, so two runs disagree), always
generates 128 new tokens, sets ``model.config.image_token_index = 50265`` (BLIP-2's OPT vocabulary;
wrong for any other model), only captions images whose text holds ``<__dj__image>`` and adds new
samples instead of editing the caption. ``mllm_mapper`` returns the chat echo as a list. What this
op does reuse is data-juicer's model loading (``prepare_model(model_type="huggingface")`` +
``get_model``: AutoProcessor and the class in ``config.architectures``, cached per process, on the
GPU when there is one). Images are decoded as training decodes them (``sdtune.data.images.load_rgb``:
transparency on white, where data-juicer's ``load_image`` makes it black).

Decoding is beam search (``num_beams`` > 1) or greedy, never sampling, so a run is reproducible.

* BLIP (no chat template): ``processor(images, text=prompt)``; ``prompt`` is the start of the
  caption (BLIP's conditional captioning) and stays in it.
* Florence-2 (``config.model_type == "florence2"``, native or remote code): ``prompt`` is one of the
  caption task tokens in :data:`FLORENCE_TASKS` (default :data:`FLORENCE_PROMPT`); the processor turns
  it into its text prompt for the encoder. The decoder writes only the caption, decoded with
  ``skip_special_tokens`` (what ``post_process_generation`` does for these "pure_text" tasks, minus
  ``<pad>`` in a batch, and without needing the processor's ``post_processor_config``).
* Chat VLMs (the processor has a chat template): one user turn with the image and ``prompt`` (default
  :data:`VLM_PROMPT`), the processor's chat template, left padding; only the new tokens are decoded.

A recipe uses it like any built-in op (``make data CAPTION=...`` appends it as the last op)::

    - sdtune_image_captioner:
        model: /models/blip-base      # folder or Hub id, checked before any image is read
        mode: missing                 # missing | replace | prefix (see ops/captioning.py)
        trigger: ohwx                 # "ohwx, <caption>"
        max_new_tokens: 75
        num_beams: 3
        batch_size: 8                 # images per forward pass
"""

from __future__ import annotations

from data_juicer.ops.base_op import OPERATORS, Mapper
from data_juicer.utils.model_utils import get_model, prepare_model
from transformers import PretrainedConfig

from data_pipeline.captioning import CaptionWriter, check_mode
from data_pipeline.models import TRANSFORMERS, InStageProcess, register_model_param
from sdtune.data.images import load_rgb

OP_NAME = "sdtune_image_captioner"
VLM_PROMPT = "Describe this image in one detailed sentence for a text-to-image training caption."

register_model_param(OP_NAME, "model", TRANSFORMERS)


FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
FLORENCE_PROMPT = "<DETAILED_CAPTION>"


def is_florence(model) -> bool:
    """Florence-2, from the model's config (never its folder name)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "florence2"


def config_model_type(model: str) -> str | None:
    """``model_type`` from the model's config.json (None when it cannot be read: the run then fails
    where :mod:`data_pipeline.models` says why)."""
    try:
        return PretrainedConfig.get_config_dict(str(model))[0].get("model_type")
    except (OSError, ValueError):
        return None


def florence_task(prompt) -> str:
    task = prompt or FLORENCE_PROMPT
    if task not in FLORENCE_TASKS:
        raise ValueError(f"{OP_NAME}: prompt={prompt!r} is not a Florence-2 caption task. Fix: use one of "
                         f"{list(FLORENCE_TASKS)} (--caption-prompt / prompt), or leave it out for {FLORENCE_PROMPT}.")
    return task


def is_chat_processor(processor) -> bool:
    """A chat VLM's processor carries a chat template; BLIP's does not."""
    return bool(getattr(processor, "chat_template", None)) and hasattr(processor, "apply_chat_template")


def generate_captions(model, processor, images, prompt, max_new_tokens: int, num_beams: int) -> list[str]:
    """Captions for ``images`` in one forward pass, deterministic (beam search or greedy)."""
    settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    if is_florence(model) or not is_chat_processor(processor):
        # BLIP: the prompt starts the caption and stays in it. Florence-2 (encoder-decoder): the task token goes
        # to the encoder, so the output holds only the caption
        task = florence_task(prompt) if is_florence(model) else prompt
        text = [task] * len(images) if task else None
        inputs = processor(images=images, text=text, return_tensors="pt").to(model.device)
        out = model.generate(**inputs, **settings)
        return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or VLM_PROMPT}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues every row's end
    try:
        inputs = processor(images=[[im] for im in images], text=[text] * len(images), padding=True,
                           return_tensors="pt").to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**inputs, **settings)
    new = out[:, inputs["input_ids"].shape[1]:]  # the prompt is echoed in front: keep only what was generated
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


@OPERATORS.register_module(module_name=OP_NAME, force=True)
class SdtuneImageCaptioner(InStageProcess, CaptionWriter, Mapper):
    """Caption images with a transformers captioner (BLIP family, Florence-2 or chat VLM), deterministically."""

    _accelerator = "cuda"
    _batched_op = True

    def __init__(
        self,
        model: str = "Salesforce/blip-image-captioning-large",
        mode: str = "missing",
        prompt: str | None = None,
        trigger: str | None = None,
        max_new_tokens: int = 75,
        num_beams: int = 3,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        *args,
        **kwargs,
    ):
        """
        Initialization method.

        :param model: a transformers model folder or Hugging Face Hub id (BLIP, BLIP-2, Florence-2, chat VLM).
        :param mode: 'missing' (caption only empty captions), 'replace', or 'prefix' (existing, generated).
        :param prompt: BLIP: the start of the caption; Florence-2: a caption task token; chat VLMs: the instruction.
        :param trigger: a word put in front of every caption the model writes.
        :param max_new_tokens: the longest caption, in tokens.
        :param num_beams: beam search width; 1 is greedy. Never sampling.
        :param batch_size: images per forward pass.
        :param trust_remote_code: let transformers run the model repo's own code.
        :param args: extra args
        :param kwargs: extra args
        """
        kwargs["batch_size"] = batch_size
        super().__init__(*args, **kwargs)
        check_mode(OP_NAME, mode, trigger)
        if max_new_tokens < 1 or num_beams < 1 or batch_size < 1:
            raise ValueError(f"{OP_NAME}: max_new_tokens, num_beams and batch_size must be at least 1.")
        if config_model_type(model) == "florence2":
            florence_task(prompt)  # refused here, clearly: an error inside a batch reaches the user garbled
        self.model, self.mode, self.prompt, self.trigger = model, mode, prompt, trigger
        self.max_new_tokens, self.num_beams = int(max_new_tokens), int(num_beams)
        self.model_key = prepare_model(
            model_type="huggingface", pretrained_model_name_or_path=model, trust_remote_code=trust_remote_code
        )

    def caption(self, paths: list[str], rank=None) -> list[str]:
        model, processor = get_model(self.model_key, rank, self.use_cuda())
        images = [load_rgb(p) for p in paths]  # as training sees them: transparency on white, not black
        return generate_captions(model, processor, images, self.prompt, self.max_new_tokens, self.num_beams)
