"""The stage end to end: read RAW, pre-check, run the recipe, write OUT, print a summary.

``run`` returns a :class:`Summary`; ``__main__`` turns it (or a :class:`PipelineError`) into the
exit status. RAW is only ever read. data-juicer's own work files (input jsonl, traces, logs)
live in a temporary folder ``sdtune-data-PID-*`` that is removed afterwards unless ``keep_work`` is
set or data-juicer failed (then the log is worth reading); every temporary file of the run and of
its worker processes goes inside it, so a killed run's reaper (:mod:`.lifeline`) removes them all.

A run that keeps no image never touches OUT: OUT stays as it was (absent, or the previous
dataset) and the reasons go to ``<OUT>.dropped.csv`` beside it (:class:`NothingKept`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.candidates import Drop
from data_pipeline.captions import caption_lines, caption_report, with_caption
from data_pipeline.errors import RUN_EXIT, PipelineError
from data_pipeline.juicer import JuicerResult, run_recipe
from data_pipeline.lifeline import KEPT, Lifeline, new_work_dir, recover_stale, remove_path
from data_pipeline.output import KeptFile, check_out, write_dataset, write_dropped_beside
from data_pipeline.precheck import run_prechecks
from data_pipeline.reasons import NO_TRACE, attribute
from data_pipeline.recipe import load_recipe, op_list, resolve_np, validate_recipe
from data_pipeline.sources import read_raw


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
    uncaptioned: int = 0  # kept images with the empty caption (counted after captioning)
    captions: dict | None = None  # report.json's "captions" when a captioning op ran

    def warnings(self) -> list[str]:
        """What the user should look at before training: many drops, images without captions."""
        out = []
        if self.n_in and len(self.drops) * 2 > self.n_in:
            top = ", ".join(f"{n} by {stage}" for stage, n in sorted(self.dropped_by().items(), key=lambda kv: -kv[1])[:3])
            out.append(
                f"{len(self.drops)} of {self.n_in} images were dropped ({100 * len(self.drops) // self.n_in}%): {top}. "
                f"Check that MODEL matches the base model you will train (sd15 keeps images from 512 px, sdxl and "
                f"kolors from 1024 px) or loosen the recipe {self.recipe}; dropped.csv lists every file and why."
            )
        if self.uncaptioned:
            out.append(
                f"{self.uncaptioned} of {self.kept} kept images have no caption; they train unconditionally (the empty "
                "caption). Fix, if that is not what you want: add a sidecar .txt or a text entry for each."
            )
        return out

    def dropped_by(self) -> dict[str, int]:
        """Drop counts: pre-check reasons (sorted), then ops in recipe order, then untraced."""
        counts = Counter(d.stage for d in self.drops)
        order = sorted(s for s in counts if s.startswith("pre-check:"))
        order += [op for op in dict.fromkeys(self.ops) if op in counts] + [NO_TRACE] * (NO_TRACE in counts)
        return {stage: counts[stage] for stage in order}


class NothingKept(PipelineError):
    """No image survived: OUT was left untouched; ``summary`` still says what was dropped where."""

    def __init__(self, message: str, summary: Summary):
        super().__init__(message, code=RUN_EXIT)
        self.summary = summary


@contextlib.contextmanager
def _temp_files_in(folder: Path, lifeline: Lifeline | None):
    """Make this process and every worker it forks create their temporary files where a kill's
    reaper removes them.

    :mod:`tempfile` users and spawned programs (``TMPDIR``) write into ``folder`` (inside the work
    folder). multiprocessing (stdlib and dill's fork, used by HF datasets) puts a Manager's socket
    in a ``pymp-*`` folder it makes once per process; that one gets a fresh folder in the usual
    temp dir instead (a socket path must stay under ~108 bytes), registered with ``lifeline``.
    The previous settings come back afterwards, so repeated runs in one process each get their own.
    """
    import multiprocessing.process

    configs = [multiprocessing.process.current_process()._config]
    with contextlib.suppress(ImportError):  # dill's fork of multiprocessing, used by HF datasets
        import multiprocess.process

        configs.append(multiprocess.process.current_process()._config)
    mp_dir = Path(tempfile.gettempdir()) / f"pymp-{secrets.token_hex(4)}"  # as short as multiprocessing's own
    if lifeline is not None:
        lifeline.remove_on_death(mp_dir)
    mp_dir.mkdir(mode=0o700)
    folder.mkdir(parents=True, exist_ok=True)
    saved = [cfg.get("tempdir") for cfg in configs]
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    for cfg in configs:
        cfg["tempdir"] = str(mp_dir)
    try:
        yield
    finally:
        remove_path(mp_dir)
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        for cfg, value in zip(configs, saved):
            cfg["tempdir"] = value


def _nothing_kept(summary: Summary, raw: Path) -> NothingKept:
    """Write the reasons beside OUT (OUT itself stays as it was) and build the error naming them."""
    listed = write_dropped_beside(summary.out, summary.drops)
    counts = ", ".join(f"{n} by {stage}" for stage, n in summary.dropped_by().items())
    state = "was left as it was" if summary.out.exists() else "was not created"
    return NothingKept(
        f"no image survived the cleaning: all {summary.n_in} from {raw} were dropped ({counts}). OUT {summary.out} "
        f"{state}; why each file was dropped: {listed}. Fix: loosen the recipe {summary.recipe} or fix the inputs.",
        summary,
    )


def _report(summary: Summary, raw: Path) -> dict:
    return {
        "raw": str(raw),
        "input_form": summary.form,
        "recipe": str(summary.recipe),
        "operators": summary.ops,
        "counts": {"in": summary.n_in, "kept": summary.kept, "dropped": len(summary.drops), "uncaptioned": summary.uncaptioned},
        "dropped_by": summary.dropped_by(),
        **({"captions": summary.captions} if summary.captions else {}),
    }


def _kept_files(passed, result: JuicerResult) -> tuple[list[KeptFile], dict[str, str]]:
    """The files to write, with their captions (a model's caption replaces a jsonl's alternatives), and
    for each file's ``dest`` the model that wrote its caption ("" when none did)."""
    kept, caption_by = [], {}
    for sid, (cand, _info) in enumerate(passed):
        if sid not in result.kept:
            continue
        caption, image = result.kept[sid]
        source, dest = Path(image), cand.dest
        if source.suffix.lower() != cand.path.suffix.lower():  # an op wrote a new file in another format
            dest = str(Path(dest).with_suffix(source.suffix))
        caption_by[dest] = result.caption_by.get(sid, "")
        alternatives = () if caption_by[dest] else cand.alternatives
        kept.append(KeptFile(dest, source, caption.strip() or cand.caption, alternatives))
    return kept, caption_by


def run(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    recipe: str | os.PathLike,
    np_workers: int | None = None,
    link: str = "copy",
    keep_work: bool = False,
    verbose: bool = False,
    lifeline: Lifeline | None = None,
    caption: dict | None = None,
) -> Summary:
    """Clean ``raw`` into ``out`` with ``recipe``; raises :class:`PipelineError` on user errors
    (:class:`NothingKept` when no image survives). ``lifeline`` (see :mod:`.lifeline`) is told
    about the work folder, so it is removed even if this process is killed. ``caption`` (a recipe entry,
    :func:`data_pipeline.captions.caption_op`) is appended as the recipe's last op."""
    clock = time.perf_counter()
    recipe_path = Path(os.path.abspath(recipe))
    recipe_cfg = with_caption(load_recipe(recipe_path), caption)
    np_workers = resolve_np(np_workers, recipe_cfg)
    raw_input = read_raw(raw)
    raw_root = Path(os.path.abspath(os.path.expanduser(raw)))
    out = Path(os.path.abspath(os.path.expanduser(out)))
    check_out(out, raw_root)
    recover_stale(out)  # leftovers of a killed earlier run; may put the previous OUT back
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
    with _WorkFolder(keep_work, lifeline) as work:
        result = _juice(recipe_cfg, recipe_path, passed, work, np_workers, verbose, lifeline)
        ids = {i: c.key for i, (c, _) in enumerate(passed)}
        sizes = {i: info[:2] for i, (_, info) in enumerate(passed)}
        drops += attribute(ids, sizes, result, ops)
        seconds["data-juicer"] += time.perf_counter() - clock

        clock = time.perf_counter()
        kept, caption_by = _kept_files(passed, result)
        names = [name for name, _ in ops]
        summary = Summary(out, raw_input.form, recipe_path, names, len(raw_input.candidates), len(kept), drops, seconds,
                          uncaptioned=sum(1 for k in kept if not k.caption),
                          captions=caption_report(ops, kept, caption_by))
        if not kept:
            raise _nothing_kept(summary, raw_root)
        write_dataset(out, kept, drops, _report(summary, raw_root), link)
        seconds["write"] = time.perf_counter() - clock
    return summary


class _WorkFolder:
    """data-juicer's private work folder: removed on exit, unless ``keep`` (``keep_work``, or set
    when data-juicer failed, since its log is then worth reading)."""

    def __init__(self, keep: bool, lifeline: Lifeline | None):
        self.keep, self.lifeline = keep, lifeline
        self.path = new_work_dir()

    def __enter__(self) -> _WorkFolder:
        if self.lifeline is not None:
            self.lifeline.remove_on_death(self.path)  # before it exists: a kill at any later moment is covered
        self.path.mkdir(mode=0o700)
        return self

    def __exit__(self, *exc) -> None:
        if not self.keep:
            remove_path(self.path)
            return
        (self.path / KEPT).write_text("kept on purpose; remove this folder when done with it\n", encoding="utf-8")
        if self.lifeline is not None:
            self.lifeline.keep(self.path)
        print(f"data-juicer work folder kept: {self.path}")


def _juice(recipe_cfg, recipe_path: Path, passed, work: _WorkFolder, np_workers: int, verbose: bool,
           lifeline: Lifeline | None) -> JuicerResult:
    """Run the recipe on the images that passed the pre-checks, inside ``work``."""
    samples = [{"text": c.caption, "images": [str(c.path)], "sdtune_id": i} for i, (c, _) in enumerate(passed)]
    if not samples:
        return JuicerResult({})
    try:
        with _temp_files_in(work.path / "tmp", lifeline):
            return run_recipe(recipe_cfg, recipe_path, samples, work.path, np_workers, verbose)
    except PipelineError:
        work.keep = True  # data-juicer failed: its log is worth reading
        raise


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
    return "\n".join(lines + caption_lines(summary.captions))
