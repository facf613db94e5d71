"""The stage end to end: read RAW, pre-check, run the recipe, write OUT, print a summary.

``run`` returns a :class:`Summary`; ``__main__`` turns it (or a :class:`PipelineError`) into the
exit status. RAW is only ever read. data-juicer's own work files (input jsonl, traces, logs)
live in a temporary folder that is removed afterwards unless ``keep_work`` is set or
data-juicer failed (then the log is worth reading).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .candidates import Drop
from .juicer import JuicerResult, run_recipe
from .output import KeptFile, check_out, write_dataset
from .precheck import run_prechecks
from .reasons import NO_TRACE, attribute
from .recipe import load_recipe, op_list, resolve_np, validate_recipe
from .sources import read_raw


@dataclass
class Summary:
    """Counts and timings of one run (timings are printed, never written to OUT)."""

    out: Path
    form: str
    recipe: Path
    ops: list[str]
    n_in: int
    kept: int
    drops: list[Drop]
    seconds: dict[str, float] = field(default_factory=dict)

    def dropped_by(self) -> dict[str, int]:
        """Drop counts: pre-check reasons (sorted), then ops in recipe order, then untraced."""
        counts = Counter(d.stage for d in self.drops)
        order = sorted(s for s in counts if s.startswith("pre-check:"))
        order += [op for op in dict.fromkeys(self.ops) if op in counts] + [NO_TRACE] * (NO_TRACE in counts)
        return {stage: counts[stage] for stage in order}


def _report(summary: Summary, raw: Path) -> dict:
    return {
        "raw": str(raw),
        "input_form": summary.form,
        "recipe": str(summary.recipe),
        "operators": summary.ops,
        "counts": {"in": summary.n_in, "kept": summary.kept, "dropped": len(summary.drops)},
        "dropped_by": summary.dropped_by(),
    }


def _kept_files(passed, result: JuicerResult) -> list[KeptFile]:
    kept = []
    for sid, (cand, _info) in enumerate(passed):
        if sid not in result.kept:
            continue
        caption, image = result.kept[sid]
        source, dest = Path(image), cand.dest
        if source.suffix.lower() != cand.path.suffix.lower():  # an op wrote a new file in another format
            dest = str(Path(dest).with_suffix(source.suffix))
        kept.append(KeptFile(dest, source, caption.strip() or cand.caption))
    return kept


def run(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    recipe: str | os.PathLike,
    np_workers: int | None = None,
    link: str = "copy",
    keep_work: bool = False,
    verbose: bool = False,
) -> Summary:
    """Clean ``raw`` into ``out`` with ``recipe``; raises :class:`PipelineError` on user errors."""
    clock = time.perf_counter()
    recipe_path = Path(os.path.abspath(recipe))
    recipe_cfg = load_recipe(recipe_path)
    np_workers = resolve_np(np_workers, recipe_cfg)
    raw_input = read_raw(raw)
    raw_root = Path(os.path.abspath(os.path.expanduser(raw)))
    out = Path(os.path.abspath(os.path.expanduser(out)))
    check_out(out, raw_root)
    seconds = {"read": time.perf_counter() - clock}

    clock = time.perf_counter()
    validate_recipe(recipe_cfg, recipe_path)  # imports data-juicer: fail fast, before touching images
    ops = op_list(recipe_cfg)
    seconds["data-juicer"] = time.perf_counter() - clock

    clock = time.perf_counter()
    passed, drops = run_prechecks(raw_input.candidates, np_workers)
    seconds["pre-check"] = time.perf_counter() - clock

    clock = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sdtune-data-"))
    failed = True
    try:
        samples = [{"text": c.caption, "images": [str(c.path)], "sdtune_id": i} for i, (c, _) in enumerate(passed)]
        result = (
            run_recipe(recipe_cfg, recipe_path, samples, work, np_workers, verbose) if samples else JuicerResult({})
        )
        ids = {i: c.key for i, (c, _) in enumerate(passed)}
        sizes = {i: info[:2] for i, (_, info) in enumerate(passed)}
        drops += attribute(ids, sizes, result, ops)
        seconds["data-juicer"] += time.perf_counter() - clock

        clock = time.perf_counter()
        kept = _kept_files(passed, result)
        names = [name for name, _ in ops]
        summary = Summary(out, raw_input.form, recipe_path, names, len(raw_input.candidates), len(kept), drops, seconds)
        write_dataset(out, kept, drops, _report(summary, raw_root), link)
        seconds["write"] = time.perf_counter() - clock
        failed = False
    finally:
        if keep_work or failed:
            print(f"data-juicer work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def format_table(summary: Summary, link: str) -> str:
    """The short table printed after a run."""
    by = summary.dropped_by()
    pre = {k: v for k, v in by.items() if k.startswith("pre-check:")}
    dj = {k: v for k, v in by.items() if not k.startswith("pre-check:")}
    after_pre = summary.n_in - sum(pre.values())
    s = summary.seconds
    rows = [
        ("stage", "in", "dropped", "kept", "seconds"),
        (f"read RAW ({summary.form})", "", "", summary.n_in, f"{s.get('read', 0):.2f}"),
        ("pre-check", summary.n_in, sum(pre.values()), after_pre, f"{s.get('pre-check', 0):.2f}"),
        *[(f"  {k[len('pre-check: ') :]}", "", v, "", "") for k, v in pre.items()],
        (
            f"data-juicer ({summary.recipe.name})",
            after_pre,
            sum(dj.values()),
            summary.kept,
            f"{s.get('data-juicer', 0):.2f}",
        ),
        *[(f"  {k}", "", v, "", "") for k, v in dj.items()],
        (f"write OUT ({link})", summary.kept, "", summary.kept, f"{s.get('write', 0):.2f}"),
        ("total", summary.n_in, len(summary.drops), summary.kept, f"{sum(s.values()):.2f}"),
    ]
    width = max(len(str(r[0])) for r in rows) + 2
    lines = [f"{r[0]:<{width}}{r[1]!s:>6}{r[2]!s:>9}{r[3]!s:>7}{r[4]!s:>9}" for r in rows]
    return "\n".join(lines)
