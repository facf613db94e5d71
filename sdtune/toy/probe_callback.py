"""``ConceptProbe``: measure, at the end of training, whether the LoRA taught its trigger words.

For each trigger it draws the trigger's probe prompts at fixed seeds with the LoRA off and on,
reads every image with the toy probe, and reports the share whose background shows each concept
colour. The result is logged as a table, written into ``summary.json`` (``concept_probe``) and
saved as ``concept_probe.png``. Only meaningful on the toy bases, whose images the probe can read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L

from sdtune.evaluation.sample_grid import Sample, render_at_scales
from sdtune.inference.sampling import make_grid
from sdtune.toy.concepts import TRIGGERS, concept_shares, probe_prompts
from sdtune.training.stopping import final_render, writes_outputs
from sdtune.utils.io import save_image_atomic

log = logging.getLogger(__name__)


class ConceptProbe(L.Callback):
    def __init__(self, dirpath: str, triggers: Sequence[str] = ("sks",), seeds: Sequence[int] = (0, 1),
                 steps: int = 20, guidance: float | None = None, size: int | None = None, filename: str = "concept_probe.png"):
        unknown = [t for t in triggers if t not in TRIGGERS]
        if unknown:
            raise ValueError(f"callbacks.concept_probe.triggers: unknown trigger(s) {unknown}; known: {sorted(TRIGGERS)}")
        self.path = Path(dirpath) / filename
        self.triggers = list(triggers)
        self.seeds = list(seeds)
        self.steps = steps
        self.guidance = guidance
        self.size = size
        self.result: dict | None = None
        self._tried = False

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self._tried = False

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._probe(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self._tried:  # a finished run resumed: Lightning skipped training and on_train_end
            self._probe(trainer, pl_module)

    def _probe(self, trainer: L.Trainer, pl_module) -> None:
        self._tried = True
        if not writes_outputs(trainer):
            return
        with final_render(trainer) as go:  # skipped after a stop; a signal ends it at once
            if go:
                self._render(trainer, pl_module)

    def _render(self, trainer: L.Trainer, pl_module) -> None:
        report, grid_rows, labels = {}, [], []
        for trigger in self.triggers:
            prompts = [p for p in probe_prompts(trigger) for _ in self.seeds]
            seeds = [s for _ in probe_prompts(trigger) for s in self.seeds]
            samples = [Sample(p, s) for p, s in zip(prompts, seeds)]
            off, on = render_at_scales(pl_module, samples, (0.0, 1.0), steps=self.steps, guidance=self.guidance,
                                       size=self.size)
            concepts = {t: TRIGGERS[t] for t in self.triggers}
            report[trigger] = {
                "concept": TRIGGERS[trigger],
                "lora_off": concept_shares(off, trigger, concepts).shares,
                "lora_on": concept_shares(on, trigger, concepts).shares,
                "samples": len(prompts),
            }
            grid_rows += [off, on]
            labels += [f"{trigger}: LoRA off", f"{trigger}: LoRA on"]
        self.result = report
        columns = [f"{' '.join(p.split()[1:3])} / seed {s}" for p in probe_prompts(self.triggers[0]) for s in self.seeds]
        save_image_atomic(make_grid(grid_rows, labels, columns, min_tile=64), self.path)
        for line in self.table(report):
            log.info(line)

    @staticmethod
    def table(report: dict) -> list[str]:
        """Human-readable lines: per trigger, the share of samples in its concept colour, off and on."""
        lines = ["concept probe (share of samples whose background the probe reads as each concept colour):"]
        for trigger, r in report.items():
            for state in ("lora_off", "lora_on"):
                shares = ", ".join(f"{c} {v:.0%}" for c, v in sorted(r[state].items()))
                lines.append(f"  '{trigger}' prompts, LoRA {state[5:]:>3}: {shares}  (concept: {r['concept']}, {r['samples']} samples)")
        return lines

    def summary_section(self) -> dict:
        return {"concept_probe": self.result} if self.result is not None else {}
