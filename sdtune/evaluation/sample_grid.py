"""Sample images during and after training: fixed prompts, seeds and negatives at each LoRA scale.

``callbacks.samples.prompts`` lists plain prompts (seeds from ``seeds``, one ``negative_prompt``
for all) or per-sample entries ``{prompt, negative_prompt, seed}``, as the seeds' Kolors baseline
renders eight prompts, each with its own negative and seed. ``columns`` lays each scale's images
out in rows of that many (the baseline's 2x4 sheet); otherwise a scale is one row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from sdtune.inference.sampling import make_grid, render, sample_batch_size
from sdtune.training.ema import exported_weights
from sdtune.training.fit_caches import frozen_modules_on_device
from sdtune.training.stopping import final_render, writes_outputs
from sdtune.utils.errors import ConfigError
from sdtune.utils.io import save_image_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    prompt: str
    seed: int
    negative_prompt: str | None = None


def parse_samples(prompts: Sequence, seeds: Sequence[int], negative_prompt: str | None) -> list[Sample]:
    """``prompts`` entries (a string, or ``{prompt, negative_prompt, seed}``) as samples; plain
    prompts take the seeds in turn and the shared negative prompt."""
    out = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            out.append(Sample(item, int(seeds[i % len(seeds)]), negative_prompt))
            continue
        if not isinstance(item, Mapping) or "prompt" not in item or set(item) - {"prompt", "negative_prompt", "seed"}:
            raise ConfigError(
                f"callbacks.samples.prompts[{i}] = {item!r}: each entry is a prompt, or {{prompt: ..., "
                "negative_prompt: ..., seed: ...}} (negative_prompt and seed optional)."
            )
        out.append(Sample(str(item["prompt"]), int(item.get("seed", seeds[i % len(seeds)])),
                          item.get("negative_prompt", negative_prompt)))
    return out


def render_at_scales(pl_module, samples: Sequence[Sample], scales: Sequence[float], *, steps: int,
                     guidance: float | None, size: int | None = None) -> list[list]:
    """One list of images per LoRA scale, drawn by the model being trained (in eval mode).

    ``guidance=None`` samples at the base model's own scale (``model.guidance`` or the family's).
    """
    size = size or int(pl_module.cfg["data"]["resolution"])
    if guidance is None:
        guidance = pl_module.family.guidance(pl_module.cfg["model"])
    pipe = pl_module.family.build_pipeline(pl_module.parts)
    pipe.set_progress_bar_config(disable=True)
    trained = [pl_module.parts.denoiser, *pl_module.parts.text_encoders]  # text encoders train with lora.text_encoder
    was_training = [m.training for m in trained]
    for m in trained:
        m.eval()  # no LoRA dropout in samples
    prompts, seeds = [s.prompt for s in samples], [s.seed for s in samples]
    negatives = [s.negative_prompt for s in samples]
    try:
        with frozen_modules_on_device(pl_module), exported_weights(pl_module):  # draw what the run exports
            return [render(pipe, prompts, seeds, steps=steps, size=size, batch_size=sample_batch_size(size),
                           call_kwargs=pl_module.family.pipeline_call_kwargs(guidance, scale, pl_module.parts),
                           negative_prompt=negatives if any(negatives) else None) for scale in scales]
    finally:
        for m, mode in zip(trained, was_training):
            m.train(mode)


class SampleGrid(L.Callback):
    """Render the samples with the LoRA at each of ``scales``; save one labelled grid PNG.

    Rows are LoRA scales (0 = the base model), columns the samples, so the effect of the LoRA is
    visible at a glance (``columns`` wraps each scale into rows of that many). Also logged to
    TensorBoard when that logger is active.
    """

    def __init__(
        self,
        dirpath: str,
        prompts: Sequence | None = None,
        seeds: Sequence[int] = (0, 1),
        scales: Sequence[float] = (0.0, 1.0),
        steps: int = 20,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        size: int | None = None,
        every_n_steps: int | None = None,
        filename: str = "samples.png",
        columns: int | None = None,
    ):
        self.dirpath = Path(dirpath)
        self.samples = parse_samples(prompts, seeds, negative_prompt) if prompts else None
        self.seeds = list(seeds)
        self.negative_prompt = negative_prompt
        self.scales = list(scales)
        self.steps = steps
        self.guidance = guidance
        self.size = size
        self.every_n_steps = every_n_steps
        self.filename = filename
        if columns is not None and int(columns) < 1:
            raise ConfigError(f"callbacks.samples.columns must be >= 1 or null, got {columns!r}.")
        self.columns = columns
        self._last_step = -1  # gradient accumulation repeats a global step over micro-batches

    def _samples(self, trainer) -> list[Sample]:
        if self.samples:
            return self.samples
        records = trainer.datamodule.dataset.records  # default: the first captions of the data
        return parse_samples([r.text for r in records[: len(self.seeds)]], self.seeds, self.negative_prompt)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not (self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step):
            return
        self._last_step = step  # on every rank: the check below is a collective under DDP
        if hasattr(pl_module, "check_finite"):  # no samples from after a NaN/Inf loss (sdtune.training.nonfinite)
            pl_module.check_finite(before=f"rendering the samples of step {step}")
        if writes_outputs(trainer):
            self.write(trainer, pl_module, self.dirpath / "samples" / f"step{step:06d}.png")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not writes_outputs(trainer):
            return
        with final_render(trainer) as go:  # a stopped run exits without rendering; a signal ends the render
            if go:
                self.write(trainer, pl_module, self.dirpath / self.filename)

    def _layout(self, rows: list[list], samples: list[Sample]) -> tuple[list[list], list[str], list[str]]:
        labels = [f"seed {s.seed}: {s.prompt}" for s in samples]
        if not self.columns or self.columns >= len(samples):
            return rows, [f"LoRA x{s:g}" for s in self.scales], labels
        n = self.columns
        wrapped, row_labels = [], []
        for scale, images in zip(self.scales, rows):
            for start in range(0, len(images), n):
                wrapped.append(images[start : start + n])
                row_labels.append(f"LoRA x{scale:g} #{start + 1}-{min(start + n, len(images))}")
        return wrapped, row_labels, [f"column {c + 1}" for c in range(n)]

    def write(self, trainer, pl_module, path: Path) -> Path:
        samples = self._samples(trainer)
        rows = render_at_scales(pl_module, samples, self.scales, steps=self.steps, guidance=self.guidance, size=self.size)
        grid = make_grid(*self._layout(rows, samples))
        save_image_atomic(grid, path)
        # The last row (the LoRA at full scale) also as single images, for sweep reports.
        tiles = self.dirpath / "samples" / path.stem
        for j, image in enumerate(rows[-1]):
            save_image_atomic(image, tiles / f"{j:02d}.png")
        write_text_atomic(tiles / "prompts.json", json.dumps([s.prompt for s in samples], ensure_ascii=False))
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                arr = torch.from_numpy(np.array(grid)).permute(2, 0, 1)
                logger.experiment.add_image("samples", arr, global_step=trainer.global_step)
        log.info("wrote %s", path)
        return path
