"""What sdtune's captioning operators (data_pipeline/ops) and the stage share: the modes, the trigger word, the progress bar.

* ``missing`` (default): only samples whose caption is empty (or only whitespace) are captioned; the
  others are never sent to the model and their text is returned untouched, byte for byte.
* ``replace``: every sample gets the generated caption instead of its own.
* ``prefix``: the existing caption stays in front and the generated one follows after ``", "``
  (a sample without a caption just gets the generated one).

``trigger`` goes in front of every caption a model wrote (``"trigger, caption"``), unless that caption
already starts with it. Both operators write :data:`CAPTION_BY`: the model value for a caption they
wrote, ``""`` otherwise; :mod:`data_pipeline.juicer` reads it back for ``report.json``.

Captioning runs in the stage's own process, whatever ``np`` is (:class:`data_pipeline.models.InStageProcess`:
the model loads once, and no worker pool can die under data-juicer's forkserver start method on a GPU
machine); ``batch_size`` sets the throughput. So a plain tqdm bar on stderr, "captioning (<model>)",
counts the images as each batch leaves the model, with an ETA.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

MODES = ("missing", "replace", "prefix")
CAPTION_BY = "sdtune_caption_by"

_bars: dict[str, tqdm] = {}  # op name -> its bar while it runs (kept off the op: datasets hashes and copies it)
_quiet: list[tuple] = []  # what to turn back on when the op ends


def check_mode(op_name: str, mode: str, trigger) -> None:
    if mode not in MODES:
        raise ValueError(f"{op_name}: mode {mode!r} is not supported; use one of {list(MODES)}.")
    if trigger is not None and not isinstance(trigger, str):
        raise ValueError(f"{op_name}: trigger must be a string, got {trigger!r}.")


def needs_caption(text, mode: str) -> bool:
    """Whether a sample with caption ``text`` is sent to the model in ``mode``."""
    return mode != "missing" or not str(text or "").strip()


def combine(existing: str, generated: str, mode: str, trigger: str | None) -> str:
    """The sample's new caption from its ``existing`` one and the model's ``generated`` one."""
    caption = generated.strip()
    if mode == "prefix" and existing.strip():
        caption = f"{existing.strip()}, {caption}" if caption else existing.strip()
    if trigger and not caption.startswith(trigger):
        caption = f"{trigger}, {caption}" if caption else trigger
    return caption


def model_label(model: str) -> str:
    """A short name for the progress bar: the folder or Hub repo name."""
    return Path(str(model).rstrip("/")).name or str(model)


def start_progress(op, texts, mode: str) -> None:
    """Show "captioning (<model>)" over the images the op will send to its model, instead of
    datasets' "<op>_process" bar and transformers' "Loading weights" bar (turned back on by
    :func:`stop_progress`)."""
    import datasets
    from transformers.utils import logging as hf_logging

    todo = sum(1 for t in texts if needs_caption(t, mode))
    if not todo:
        return
    _bars[op._name] = tqdm(total=todo, desc=f"captioning ({model_label(op.model)})", unit="img", file=sys.stderr,
                           mininterval=0, miniters=1)  # a line per batch: a batch takes far longer than a print
    if datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        _quiet.append((op._name, datasets.enable_progress_bars))
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        _quiet.append((op._name, hf_logging.enable_progress_bar))


def advance(op, n: int) -> None:
    bar = _bars.get(op._name)
    if bar is not None:
        bar.update(n)


def stop_progress(op) -> None:
    """Close the bar and turn datasets' and transformers' bars back on."""
    bar = _bars.pop(op._name, None)
    if bar is not None:
        bar.close()
    for name, turn_on in [q for q in _quiet if q[0] == op._name]:
        turn_on()
        _quiet.remove((name, turn_on))


class CaptionWriter:
    """The part sdtune's captioning ops share (a base before data-juicer's ``Mapper``): which samples go
    to the model, the progress bar, and writing the captions back. A subclass only says how a list
    of image paths becomes captions (:meth:`caption`); it has ``model``, ``mode`` and ``trigger``."""

    def caption(self, paths: list[str], rank=None) -> list[str]:
        raise NotImplementedError

    def run(self, dataset, *, exporter=None, tracer=None):
        start_progress(self, dataset[self.text_key], self.mode)
        try:
            return super().run(dataset, exporter=exporter, tracer=tracer)
        finally:
            stop_progress(self)

    def process_batched(self, samples, rank=None):
        texts = samples[self.text_key]
        todo = [i for i, t in enumerate(texts) if needs_caption(t, self.mode) and samples[self.image_key][i]]
        generated = self.caption([samples[self.image_key][i][0] for i in todo], rank) if todo else []
        advance(self, len(todo))
        return apply_captions(samples, self.text_key, todo, generated, self)


def apply_captions(samples: dict, text_key: str, todo: list[int], generated: list[str], op) -> dict:
    """Write the generated captions (for the indices in ``todo``) into a batch of ``samples``."""
    n = len(samples[text_key])
    by = [""] * n
    for i, gen in zip(todo, generated):
        if gen.strip():
            samples[text_key][i] = combine(str(samples[text_key][i] or ""), gen, op.mode, op.trigger)
            by[i] = str(op.model)
    samples[CAPTION_BY] = [b or prev for b, prev in zip(by, samples.get(CAPTION_BY) or [""] * n)]
    return samples
