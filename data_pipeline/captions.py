"""``--caption MODEL``: the captioning op the stage appends to a recipe, and what report.json says.

``caption_op`` turns the command-line knobs into one recipe entry: ``sdtune_image_tagger`` when
MODEL is a WD14 tagger (a folder holding ``model.onnx`` or ``selected_tags.csv``: the model check
then names the one missing; or a Hub id
whose name holds "tagger", as SmilingWolf's do), ``sdtune_image_captioner`` otherwise.
``with_caption`` appends it as the LAST op, after every filter and the deduplicator, so that no
image that gets dropped costs a forward pass. A recipe may also name either op itself.

``caption_report`` is the ``captions`` section of report.json: the ops' models and modes, how many
kept captions a model wrote and how many were kept as they came, and per file the model that wrote
its caption.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from data_pipeline.captioning import MODES
from data_pipeline.errors import PipelineError

CAPTIONER, TAGGER = "sdtune_image_captioner", "sdtune_image_tagger"
CAPTION_OPS = (CAPTIONER, TAGGER)


def is_tagger(model: str) -> bool:
    local = Path(model).expanduser()
    if local.is_dir():
        return (local / "model.onnx").is_file() or (local / "selected_tags.csv").is_file()  # the check names a missing one
    return not local.exists() and "tagger" in model.rsplit("/", 1)[-1].lower()


def caption_op(model: str, mode: str = "missing", prompt: str | None = None, trigger: str | None = None,
               max_tokens: int | None = None, batch: int | None = None) -> dict:
    """The recipe entry ``{op_name: {params}}`` for ``--caption MODEL`` and its knobs."""
    if mode not in MODES:
        raise PipelineError(f"--caption-mode {mode!r} is not one of {', '.join(MODES)}. Fix: CAPTION_MODE=missing "
                            "(caption only images without one), replace, or prefix (existing caption, then the new).")
    for flag, value in (("--caption-max-tokens", max_tokens), ("--caption-batch", batch)):
        if value is not None and value < 1:
            raise PipelineError(f"{flag} {value} must be a positive integer.")
    params: dict = {"model": model, "mode": mode}
    if trigger:
        params["trigger"] = trigger
    if batch is not None:
        params["batch_size"] = batch
    if is_tagger(model):
        if prompt or max_tokens is not None:
            raise PipelineError(f"--caption {model} is a WD14 tagger: it takes no --caption-prompt or "
                                "--caption-max-tokens (those are for captioners). Fix: leave them out, or set "
                                "general_threshold/max_tags on sdtune_image_tagger in a recipe.")
        return {TAGGER: params}
    if prompt:
        params["prompt"] = prompt
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    return {CAPTIONER: params}


def with_caption(recipe: dict, op: dict | None) -> dict:
    """``recipe`` with ``op`` appended as its last process entry (a copy; ``recipe`` is unchanged)."""
    if op is None:
        return recipe
    return {**recipe, "process": [*recipe["process"], op]}


def caption_report(ops: list[tuple[str, dict]], kept_files, caption_by: dict[str, str]) -> dict | None:
    """report.json's ``captions``: None when no captioning op ran. ``caption_by``: OUT file -> model."""
    runs = [{"op": name, "model": str(p.get("model", "")), "mode": p.get("mode", "missing")}
            for name, p in ops if name in CAPTION_OPS]  # fmt: skip
    if not runs:
        return None
    written = {f: m for f, m in caption_by.items() if m}
    return {
        "ops": runs,
        "written": len(written),
        "kept": sum(1 for k in kept_files if k.caption and k.dest not in written),
        "uncaptioned": sum(1 for k in kept_files if not k.caption),
        "written_by_model": dict(Counter(written.values())),
        "files": {f"images/{dest}": m for dest, m in sorted(written.items())},
    }


def caption_lines(captions: dict | None) -> list[str]:
    """What the captioning did, under the table: captions written per model, kept, still empty."""
    if not captions:
        return []
    modes = ", ".join(sorted({r["mode"] for r in captions["ops"]}))
    lines = [f"\ncaptions (mode {modes}): {captions['written']} written, {captions['kept']} kept as they were, "
             f"{captions['uncaptioned']} empty"]
    lines += [f"  {n} written by {model}" for model, n in captions["written_by_model"].items()]
    return lines
