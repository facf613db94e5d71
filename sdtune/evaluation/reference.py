"""``ReferenceEval``: score the LoRA being trained against reference images while it trains.

Each evaluation renders every ``eval.prompts`` entry at the fixed ``eval.seeds`` with the current
LoRA (the sample grid's renderer, so the same seeds give the same starting noise at every step)
and computes the metrics of :mod:`sdtune.evaluation.metrics` (and, with ``eval.aesthetic_model``, the
mean LAION aesthetic score of :mod:`sdtune.evaluation.aesthetics`). Evaluations run at step 0 (the base
model: the LoRA starts as a no-op), every ``eval.every_n_steps`` steps, or, when that is null, at
each validation (``data.val_images`` > 0), and at the end of training. Each is logged to every
logger (TensorBoard, CSV) under ``eval/<metric>`` (averaged over prompts) and
``eval/<name>/<metric>``, kept in the trainer's metrics (so ``optimized_metric=eval/latent_dist``
and ``summary.json``'s ``final_metrics`` see the last), written into ``summary.json`` (``eval``,
with every evaluation's step and numbers) and its images saved under ``eval/stepNNNNNN/``.
The history is part of the checkpoint, so a resumed run reports the whole run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sdtune.evaluation.aesthetics import AestheticScorer
from sdtune.evaluation.config import EvalSpec, parse_eval
from sdtune.evaluation.metrics import ClipScorer, DinoScorer, load_references, mean_cosine, nearest_rms, vae_latents
from sdtune.evaluation.sample_grid import Sample, render_at_scales
from sdtune.training.fit_caches import frozen_modules_on_device
from sdtune.training.stopping import final_render, writes_outputs
from sdtune.utils.io import save_image_atomic

log = logging.getLogger(__name__)


def evaluation_callbacks(cfg: dict[str, Any], output_dir: str | Path) -> list[L.Callback]:
    """``[ReferenceEval]`` when ``eval.prompts`` is set, else nothing."""
    spec = parse_eval(cfg.get("eval"))
    return [ReferenceEval(spec, output_dir)] if spec else []


class ReferenceEval(L.Callback):
    def __init__(self, spec: EvalSpec, dirpath: str | Path):
        self.spec = spec
        self.dirpath = Path(dirpath)
        self.history: list[dict[str, float]] = []  # {"step": n, "eval/...": value, ...} per evaluation
        self._refs: dict[str, dict[str, torch.Tensor]] | None = None  # per prompt: reference latents/embeddings
        self._clip = self._dino = self._aesthetic = None

    # -- when -----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:  # the base model's scores, the baseline every later one compares to
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.spec.every_n_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.spec.every_n_steps is None and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._final(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._final(trainer, pl_module)  # a finished run resumed (no on_train_end); else already done at this step

    def _final(self, trainer, pl_module) -> None:
        with final_render(trainer) as go:  # a stopped run exits at once (resuming it evaluates later)
            if go:
                self.run(trainer, pl_module)

    # -- what -----------------------------------------------------------------------------------
    def run(self, trainer, pl_module) -> dict[str, float] | None:
        """Evaluate now (once per step: gradient accumulation and validation may repeat a step)."""
        step = trainer.global_step
        if not writes_outputs(trainer) or (self.history and self.history[-1]["step"] == step):
            return None
        metrics = self.evaluate(pl_module, folder=self.dirpath / "eval" / f"step{step:06d}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.history.append({"step": step, **metrics})
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.count("/") == 1))
        return metrics

    @torch.no_grad()
    def evaluate(self, pl_module, folder: Path | None = None) -> dict[str, float]:
        """Render every prompt at every seed with the LoRA at full scale and score the images."""
        spec = self.spec
        samples = [Sample(p.prompt, seed, p.negative_prompt) for p in spec.prompts for seed in spec.seeds]
        images = render_at_scales(pl_module, samples, (1.0,), steps=spec.steps, guidance=spec.guidance)[0]
        n = len(spec.seeds)
        per_prompt = {p.name: images[i * n:(i + 1) * n] for i, p in enumerate(spec.prompts)}
        if folder is not None:
            for p in spec.prompts:
                for seed, image in zip(spec.seeds, per_prompt[p.name]):
                    save_image_atomic(image, folder / f"{p.name}_seed{seed}.png")
        return self.score(pl_module, per_prompt)

    def score(self, pl_module, per_prompt: dict) -> dict[str, float]:
        """``eval/<name>/<metric>`` for each prompt and ``eval/<metric>`` averaged over prompts."""
        device, spec = pl_module.device, self.spec
        refs = self._references(pl_module, next(iter(per_prompt.values()))[0].size)
        with frozen_modules_on_device(pl_module):
            latents = {name: vae_latents(pl_module.parts.vae, ims) for name, ims in per_prompt.items()}
        out: dict[str, float] = {}
        for p in spec.prompts:
            ims, key, ref = per_prompt[p.name], f"eval/{p.name}", refs[p.name]
            if p.references:
                out[f"{key}/latent_dist"] = nearest_rms(latents[p.name], ref["latents"])
            if self._clip is not None:
                embeds = self._clip.images(ims, device)
                out[f"{key}/clip_t"] = mean_cosine(embeds, self._clip.texts([p.prompt], device))
                if p.references:
                    out[f"{key}/clip_i"] = mean_cosine(embeds, ref["clip"])
            if self._dino is not None and p.references:
                out[f"{key}/dino"] = mean_cosine(self._dino.images(ims, device), ref["dino"])
            if self._aesthetic is not None:  # the mean LAION score (0-10) of this prompt's images
                out[f"{key}/aesthetic"] = float(self._aesthetic.scores(ims, device).mean())
        for metric in sorted({k.rsplit("/", 1)[1] for k in out}):
            values = [v for k, v in out.items() if k.endswith("/" + metric)]
            out[f"eval/{metric}"] = sum(values) / len(values)
        return out

    def _references(self, pl_module, size: tuple[int, int]) -> dict[str, dict[str, torch.Tensor]]:
        """Reference latents and embeddings, computed once (VAE, CLIP and DINO are frozen)."""
        if self._refs is not None:
            return self._refs
        spec, device = self.spec, pl_module.device
        allow_pickle = (pl_module.cfg.get("model") or {}).get("allow_pickle", False) is True
        self._clip = ClipScorer(spec.clip_model, allow_pickle=allow_pickle) if spec.clip_model else None
        self._dino = DinoScorer(spec.dino_model, allow_pickle=allow_pickle) if spec.dino_model else None
        self._aesthetic = AestheticScorer(spec.aesthetic_model, allow_pickle=allow_pickle) if spec.aesthetic_model else None
        refs: dict[str, dict[str, torch.Tensor]] = {}
        for p in spec.prompts:
            refs[p.name] = {}
            if not p.references:
                continue
            images = load_references(p.references, size)
            with frozen_modules_on_device(pl_module):
                refs[p.name]["latents"] = vae_latents(pl_module.parts.vae, images)
            if self._clip is not None:
                refs[p.name]["clip"] = self._clip.images(images, device)
            if self._dino is not None:
                refs[p.name]["dino"] = self._dino.images(images, device)
        self._refs = refs
        return refs

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def summary_section(self) -> dict:
        if not self.history:
            return {}
        return {"eval": {"first": self.history[0], "final": self.history[-1], "history": self.history}}
