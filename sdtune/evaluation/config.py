"""The ``eval:`` section: which prompts are evaluated against which reference images, checked early.

No model loads here: :func:`check_config` runs with the other sections' checks
(:func:`sdtune.run.checks.validate`) before any model is loaded, so a missing reference image or a
wrong model folder costs a second (the metric models pass the loading gate of
:mod:`sdtune.families.source`). Which way each metric is better, for sweeps and
``python -m sdtune.report --sort``, is :func:`sdtune.utils.metrics.higher_is_better`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdtune.config.values import guidance, integer, setting
from sdtune.evaluation.aesthetic_folders import FIX as PREDICTOR_FIX
from sdtune.evaluation.aesthetic_folders import predictor_problem
from sdtune.families.source import check_weights
from sdtune.utils.errors import ConfigError
from sdtune.utils.formats import IMAGE_SUFFIXES

DISTANCES = ("latent_dist",)
ENTRY_KEYS = {"prompt", "references", "negative_prompt", "name"}
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class EvalPrompt:
    name: str  # in metric names: eval/<name>/latent_dist
    prompt: str
    references: tuple[Path, ...] = ()
    negative_prompt: str | None = None


@dataclass(frozen=True)
class EvalSpec:
    prompts: tuple[EvalPrompt, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float | None
    every_n_steps: int | None
    clip_model: Path | None
    dino_model: Path | None
    aesthetic_model: Path | None = None  # the LAION predictor (sdtune.evaluation.aesthetics): eval/aesthetic

    def metrics(self) -> set[str]:
        """The averaged metric names (``eval/...``) a run with this spec logs."""
        refs = any(p.references for p in self.prompts)
        names = {"latent_dist"} if refs else set()
        if self.clip_model:
            names |= {"clip_t", "clip_i"} if refs else {"clip_t"}
        if self.dino_model and refs:
            names.add("dino")
        if self.aesthetic_model:
            names.add("aesthetic")
        return {f"eval/{n}" for n in names}


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].strip("_") or "prompt"


def reference_images(value: Any, key: str) -> tuple[Path, ...]:
    """The image files ``value`` names (image paths and/or folders of images), each checked to open."""
    from PIL import Image, UnidentifiedImageError

    items = [value] if isinstance(value, (str, Path)) else value
    if not isinstance(items, Sequence) or isinstance(items, (bytes, Mapping)):
        raise ConfigError(f"{key} = {value!r}: give a list of image files or folders, e.g. references: [refs/a.png, refs/]")
    files: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser().resolve()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise ConfigError(f"{key}: the folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}). "
                                  "Fix: put the reference images there, or name the files.")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{key}: reference image {path} does not exist. Fix: correct the path (relative paths "
                              "count from the folder the command runs in), or remove it.")
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError) as err:
            raise ConfigError(f"{key}: {path} is not a readable image ({err}). Fix: replace or remove it.") from None
    return tuple(files)


def _entry(item: Any, i: int) -> EvalPrompt:
    key = f"eval.prompts[{i}]"
    if isinstance(item, str):
        if not item.strip():
            raise ConfigError(f"{key} is empty. Fix: a prompt, or remove the entry.")
        return EvalPrompt(slug(item), item)
    if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str) or set(item) - ENTRY_KEYS:
        extra = sorted(set(item) - ENTRY_KEYS) if isinstance(item, Mapping) else []
        raise ConfigError(
            f"{key} = {item!r}{f' has unknown key(s) {extra}' if extra else ''}: each entry is a prompt, or "
            "{prompt: ..., references: [image files or folders], negative_prompt: ..., name: ...} (all but prompt optional)."
        )
    name = item.get("name") or slug(item["prompt"])
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{key}.name = {name!r}: use letters, digits, _ . or - (it becomes part of metric names "
                          "such as eval/<name>/latent_dist).")
    refs = reference_images(item["references"], f"{key}.references") if item.get("references") is not None else ()
    negative = item.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ConfigError(f"{key}.negative_prompt must be text or null, got {negative!r}.")
    return EvalPrompt(name, item["prompt"], refs, negative)


def _model_folder(value: Any, key: str, what: str) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}={value}: {path} is no local {what} folder (no config.json there). Fix: the folder "
                          f"a transformers save_pretrained (or a downloaded hub snapshot) wrote, or {key}=null.")
    return path


def parse_eval(section: Mapping[str, Any] | None) -> EvalSpec | None:
    """The checked ``eval:`` section, or None when it lists no prompts (evaluation off)."""
    section = dict(section or {})
    prompts = section.get("prompts") or []
    if not isinstance(prompts, Sequence) or isinstance(prompts, str):
        raise ConfigError(f"eval.prompts must be a list of prompts or {{prompt, references}} entries, got {prompts!r}.")
    if not prompts:
        return None
    entries = [_entry(item, i) for i, item in enumerate(prompts)]
    seen: dict[str, int] = {}
    for j, e in enumerate(entries):  # two prompts with the same slug: the second gets _2
        seen[e.name] = seen.get(e.name, 0) + 1
        if seen[e.name] > 1:
            entries[j] = EvalPrompt(f"{e.name}_{seen[e.name]}", e.prompt, e.references, e.negative_prompt)
    if len({e.name for e in entries}) != len(entries):
        raise ConfigError(f"eval.prompts: names {[e.name for e in entries]} repeat. Fix: give each entry its own name.")
    seeds = section.get("seeds")
    if not isinstance(seeds, Sequence) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"eval.seeds must be a non-empty list of integers >= 0, got {seeds!r}. Fix: e.g. eval.seeds=[0,1].")
    steps = integer("eval.steps", section.get("steps"), ge=1, full=True, fix="e.g. eval.steps=20 (sampling steps).")
    every = integer("eval.every_n_steps", section.get("every_n_steps"), ge=1, optional="evaluate at each validation")
    scale = guidance("eval.guidance", section.get("guidance"), optional="the base model's own scale")
    spec = EvalSpec(tuple(entries), tuple(int(s) for s in seeds), steps, scale, every, _model_folder(section.get("clip_model"), "eval.clip_model", "CLIP model"),
                    _model_folder(section.get("dino_model"), "eval.dino_model", "DINO model"),
                    _model_folder(section.get("aesthetic_model"), "eval.aesthetic_model", "aesthetic predictor"))
    for i, p in enumerate(entries):
        if not p.references and not spec.clip_model and not spec.aesthetic_model:
            raise ConfigError(f"eval.prompts[{i}] ({p.prompt!r}) has no references and eval.clip_model and "
                              "eval.aesthetic_model are null: nothing would be measured for it. Fix: {prompt: ..., "
                              "references: [image files or a folder]}, or set eval.clip_model for the prompt-image "
                              "score (CLIP-T) or eval.aesthetic_model for the aesthetic score.")
    return spec


def check_optimized_metric(metric: str, spec: EvalSpec | None) -> None:
    """``optimized_metric=eval/...`` must be a metric this config's evaluation logs."""
    if not metric.startswith("eval/"):
        return
    if spec is None:
        raise ConfigError(f"optimized_metric={metric}, but eval.prompts is empty, so nothing logs it. Fix: set "
                          "eval.prompts with references (docs/training_methods.md: Evaluation against reference images).")
    names = spec.metrics() | {f"eval/{p.name}/{m.split('/')[-1]}" for p in spec.prompts for m in spec.metrics()
                              if p.references or m in ("eval/clip_t", "eval/aesthetic")}
    if metric not in names:
        raise ConfigError(f"optimized_metric={metric} is not logged by this evaluation; it logs {sorted(names)}. "
                          "Fix: choose one of those (clip_* needs eval.clip_model, dino eval.dino_model, "
                          "aesthetic eval.aesthetic_model).")


def check_config(cfg: Any) -> None:
    """The ``eval:`` section: reference images exist and open, the metric models pass the loading
    gate, and an ``optimized_metric=eval/...`` is one this evaluation logs."""
    node = setting(cfg, "eval")
    spec = parse_eval(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)
    if spec and (spec.clip_model or spec.dino_model or spec.aesthetic_model):  # the loading gate, before any model loads
        allow_pickle = setting(cfg, "model.allow_pickle") is True
        check_weights(spec.clip_model, key="eval.clip_model", allow_pickle=allow_pickle)
        check_weights(spec.dino_model, key="eval.dino_model", allow_pickle=allow_pickle)
        check_weights(spec.aesthetic_model, key="eval.aesthetic_model", allow_pickle=allow_pickle)
        problem = predictor_problem(spec.aesthetic_model)[1] if spec.aesthetic_model else None
        if problem:
            raise ConfigError(f"eval.aesthetic_model={spec.aesthetic_model}: the folder {problem}. {PREDICTOR_FIX}, "
                              "or eval.aesthetic_model=null.")
    metric = setting(cfg, "optimized_metric")
    if isinstance(metric, str):
        check_optimized_metric(metric, spec)
