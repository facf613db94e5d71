"""Run one recipe through the real data-juicer library, in this process.

The survivors of the pre-checks are written as data-juicer's input jsonl
(``{"text", "images": [abs path], "sdtune_id"}``); ``init_configs`` + the executor run the recipe;
the exported jsonl says which ``sdtune_id`` survived (with its possibly rewritten caption) and the
tracer files say which op dropped the rest:

* ``trace/sample_trace-<op>.jsonl`` (``filter-<op>.jsonl`` in older data-juicer): every sample a
  filter dropped, with its ``__dj__stats__``;
* ``trace/duplicate-<op>.jsonl``: ``dup1``/``dup2`` pairs from a deduplicator.

data-juicer's loguru output goes to ``<work>/data-juicer.log``; only errors reach the terminal
(``verbose`` shows everything); the config table it prints on stdout goes to a file there too.
Files that ops produce land under the work folder (``DJ_PRODUCED_DATA_DIR``), never next to RAW.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.captioning import CAPTION_BY
from data_pipeline.dj import load_data_juicer
from data_pipeline.errors import RUN_EXIT, PipelineError
from data_pipeline.recipe import build_config

TRACE_PREFIXES = ("sample_trace-", "filter-")
DUP_PREFIX = "duplicate-"


@dataclass
class JuicerResult:
    """What came out of data-juicer: survivors by id, and trace records per op name."""

    kept: dict[int, tuple[str, str]]  # sdtune_id -> (caption, image path)
    filtered: dict[str, list[dict]] = field(default_factory=dict)  # op -> dropped samples
    duplicates: dict[str, list[dict]] = field(default_factory=dict)  # op -> {dup1, dup2} pairs
    caption_by: dict[int, str] = field(default_factory=dict)  # sdtune_id -> model that wrote its caption


def _one_line(record) -> str:
    """loguru format for the terminal: level and message, never the exception's traceback."""
    return "data-juicer {level}: {message}\n"


@contextlib.contextmanager
def _data_juicer_logging(log_file: Path, verbose: bool):
    """Send loguru to a file (and errors to stderr) instead of data-juicer's own set-up."""
    import datasets
    from data_juicer.utils import logger_utils
    from loguru import logger

    logger_utils.LOGGER_SETUP = True  # its set-up would also redirect sys.stdout/stderr into loguru
    logger.remove()
    handlers = [
        logger.add(log_file, level="INFO"),
        # one line per record on the terminal: the traceback (with every local's value) stays in the log file;
        # the stage's own "data-juicer failed ..." message names the error and the log
        logger.add(sys.stderr, level="INFO" if verbose else "ERROR", format=_one_line, backtrace=False, diagnose=False),
    ]
    ds_level = datasets.logging.get_verbosity()
    if not verbose:
        datasets.logging.set_verbosity_error()  # e.g. "Setting num_proc from 2 back to 1 ..."
    try:
        yield
    finally:
        datasets.logging.set_verbosity(ds_level)
        for handler in handlers:
            logger.remove(handler)


@contextlib.contextmanager
def _datasets_cache_restored():
    """data-juicer points HF datasets' cache at our temporary folder; point it back afterwards."""
    from datasets import config

    names = ("HF_DATASETS_CACHE", "DEFAULT_DOWNLOADED_DATASETS_PATH", "DOWNLOADED_DATASETS_PATH",
             "DEFAULT_EXTRACTED_DATASETS_PATH", "EXTRACTED_DATASETS_PATH")  # fmt: skip
    saved = {n: getattr(config, n) for n in names if hasattr(config, n)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _plain_text(text) -> str:
    """The caption without data-juicer's special tokens (``<__dj__image>``, ``<|__dj__eoc|>``), which
    an op may have left in it; text without them comes back byte for byte."""
    from data_juicer.utils.mm_utils import SpecialTokens  # data-juicer is imported by now

    text = str(text or "")
    tokens = [v for k, v in vars(SpecialTokens).items() if not k.startswith("_") and isinstance(v, str)]
    if not any(t in text for t in tokens):
        return text
    for token in tokens:
        text = text.replace(token, " ")
    return " ".join(text.split())


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _collect_traces(work: Path, result: JuicerResult) -> None:
    for trace in sorted(work.rglob("trace/*.jsonl")):
        name = trace.name[: -len(".jsonl")]
        if name.startswith(DUP_PREFIX):
            result.duplicates.setdefault(name[len(DUP_PREFIX) :], []).extend(_read_jsonl(trace))
            continue
        for prefix in TRACE_PREFIXES:
            if name.startswith(prefix):
                result.filtered.setdefault(name[len(prefix) :], []).extend(_read_jsonl(trace))


def run_recipe(
    recipe: dict, recipe_path: Path, samples: list[dict], work: Path, np_workers: int, verbose: bool = False
) -> JuicerResult:
    """Run ``recipe`` on ``samples`` (dicts with text, images, sdtune_id) inside ``work``."""
    load_data_juicer()  # sdtune's ops must be registered before the config is parsed
    from data_juicer.config import init_configs
    from data_juicer.core.executor.factory import ExecutorFactory

    work.mkdir(parents=True, exist_ok=True)
    dataset, export = work / "input.jsonl", work / "export" / "kept.jsonl"
    with open(dataset, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    cfg_dict = build_config(
        recipe, work=work, dataset=dataset, export=export, np_workers=np_workers, n_samples=len(samples)
    )
    cfg_path = work / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict, allow_unicode=True, sort_keys=False), encoding="utf-8")

    log_file = work / "data-juicer.log"
    produced = _env("DJ_PRODUCED_DATA_DIR", str(work / "produced"))
    with _data_juicer_logging(log_file, verbose), produced, _datasets_cache_restored():
        try:
            with open(work / "config-table.txt", "w", encoding="utf-8") as table, contextlib.redirect_stdout(table):
                cfg = init_configs(args=["--config", str(cfg_path)])
            executor = ExecutorFactory.create_executor(cfg.get("executor_type", "default"))(cfg)
            executor.run()
        except (Exception, SystemExit) as err:  # jsonargparse exits on bad configs
            detail = f"{type(err).__name__}: {err}".strip()
            raise PipelineError(
                f"data-juicer failed running recipe {recipe_path}: {detail}\nlog: {log_file}", code=RUN_EXIT
            ) from None
    if not export.is_file():
        raise PipelineError(f"data-juicer wrote no output for recipe {recipe_path}; log: {log_file}", code=RUN_EXIT)
    result = JuicerResult(kept={})
    for row in _read_jsonl(export):
        images = row.get("images") or []
        sid = row.get("sdtune_id")
        if isinstance(sid, int) and images and sid not in result.kept:
            result.kept[sid] = (_plain_text(row.get("text", "")), str(images[0]))
            if row.get(CAPTION_BY):
                result.caption_by[sid] = str(row[CAPTION_BY])
    _collect_traces(work, result)
    return result
