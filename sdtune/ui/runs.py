"""Run folders as the pages show them: the runs table, one run's live page, the compare images.

Everything comes from the run's own files, the same ones ``sdtune.report`` reads
(:func:`sdtune.report.load_runs`: ``.hydra/overrides.yaml``, ``logs/csv/metrics.csv``,
``summary.json``), plus ``config.yaml`` (``trainer.max_steps``), the sample grids
(``samples/stepNNNNNN.png``, ``samples.png``) and, while a job runs, the progress line its process
writes to the job log (``N/T [elapsed<remaining``). ``sdtune.report`` imports torch, so it is imported
on first use. No second record of progress is kept, so the
page and the folder can never disagree. A folder being written is read defensively: a half-written
row or file reads as "not yet".
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from sdtune.config.overrides import hydra_quote
from sdtune.run.resume import OVERRIDES

UI_DIR = ".sdtune-ui"
# the run's own bar (sdtune.run.progress), not the other bars of its log (weights loading, the text cache)
_PROGRESS = re.compile(r"training:[^\r\n]*?(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
_SAMPLE = re.compile(r"step(\d+)\.png$")


def file_url(outputs: Path, path: Path) -> str:
    """The ``/files/...`` URL of a file under ``outputs``."""
    return "/files/" + quote(path.relative_to(outputs).as_posix())


def run_folders(outputs: Path) -> list[Path]:
    """Every folder under ``outputs`` holding ``.hydra/overrides.yaml`` (the app's own folder left out)."""
    found = []
    for dirpath, dirs, _files in os.walk(outputs):
        here = Path(dirpath)
        dirs[:] = sorted(d for d in dirs if not (here == outputs and d == UI_DIR) and not d.startswith("."))
        if (here / OVERRIDES).is_file():
            found.append(here)
            dirs[:] = [d for d in dirs if (here / d / OVERRIDES).is_file()]  # a sweep's runs, not a run's insides
    return found


def seconds(text: str) -> float | None:
    """``[[h:]m]:s`` -> seconds (tqdm's clock); None for ``?``."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    total = 0.0
    for p in parts:
        total = total * 60 + p
    return total


def log_progress(log: Path, chunk: int = 65536) -> dict[str, Any] | None:
    """The last progress line of a job log: ``{step, max_steps, elapsed_seconds, eta_seconds}``."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - chunk))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    hits = _PROGRESS.findall(text)
    if not hits:
        return None
    step, total, elapsed, remaining = hits[-1]
    return {"step": int(step), "max_steps": int(total), "elapsed_seconds": seconds(elapsed),
            "eta_seconds": seconds(remaining)}


def log_tail(log: Path, lines: int = 40, chunk: int = 65536) -> str:
    """The last ``lines`` lines of a job log, a progress bar's redraws (``\\r``) collapsed to the last."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - chunk))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")[-lines:])


def max_steps(folder: Path) -> int | None:
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        value = (cfg.get("trainer") or {}).get("max_steps")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def file_state(folder: Path, summary: dict) -> str:
    """A run's state from its files alone (no job of this server ran it)."""
    if summary.get("training_finished"):
        return "finished"
    if any((folder / "checkpoints").glob("*.ckpt")):
        return "stopped"
    return "incomplete"


def _load(folder: Path):
    # deferred: sdtune.report imports torch through the sample grids (seconds); the server answers its
    # first request at once and warms this up in the background (sdtune.ui.server)
    from sdtune.report import load_runs

    try:
        return load_runs(folder)[0]
    except (OSError, ValueError, yaml.YAMLError, KeyError, IndexError):  # a folder being written, or damaged
        return None


def run_row(outputs: Path, folder: Path, job: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the runs table (``sdtune.report``'s columns, the run's state and progress)."""
    rel = folder.relative_to(outputs).as_posix()
    run = _load(folder)
    from sdtune.report import COLUMNS  # deferred: as in _load

    row: dict[str, Any] = {"run": rel, "name": folder.name}
    row.update({k: None for k in COLUMNS})
    if run is not None:
        row.update({k: v for k, v in run.row([]).items() if k != "run"})
    summary = run.summary if run is not None else {}
    steps = [s for s, _ in run.train_loss] if run is not None else []
    row["state"] = job["state"] if job else file_state(folder, summary)
    row["step"] = summary.get("global_step") if summary.get("global_step") is not None else (max(steps) if steps else 0)
    row["max_steps"] = max_steps(folder)
    try:
        row["created"] = (folder / OVERRIDES).stat().st_mtime
    except OSError:
        row["created"] = None
    return row


def run_detail(outputs: Path, rel: str, job: dict[str, Any] | None, log: Path | None,
               command: str | None) -> dict[str, Any]:
    """``GET /api/runs/<run>``: everything the run page shows (see the contract, ui_api.md)."""
    folder = outputs / rel
    run = _load(folder) if (folder / OVERRIDES).is_file() else None
    summary = run.summary if run is not None else {}
    train = [[s, v] for s, v in run.train_loss] if run is not None else []
    val = [[s, v] for s, v in run.val_loss] if run is not None else []
    live = job is not None and job["state"] in ("running", "stopping")
    progress = log_progress(log) if (live and log is not None) else None
    total = max_steps(folder) or (progress or {}).get("max_steps")
    step = (progress or {}).get("step")
    if step is None:
        step = summary.get("global_step") if summary.get("global_step") is not None else (train[-1][0] if train else 0)
    samples = []
    for path in sorted((folder / "samples").glob("step*.png")):
        hit = _SAMPLE.search(path.name)
        if hit:
            samples.append({"step": int(hit.group(1)), "url": file_url(outputs, path)})
    if (folder / "samples.png").is_file():
        samples.append({"step": summary.get("global_step", step), "url": file_url(outputs, folder / "samples.png")})
    figures = [{"name": p.name, "url": file_url(outputs, p)}
               for p in [*sorted(folder.glob("*.png")), *sorted((folder / "eval").glob("**/*.png"))] if p.is_file()]
    lora = folder / "lora.safetensors"
    note = summary.get("note") or ""
    resumable = bool(job and job.get("resumable"))
    return {
        "run": rel, "name": folder.name,
        "state": job["state"] if job else file_state(folder, summary),
        "job": job, "step": step, "max_steps": total,
        "eta_seconds": (progress or {}).get("eta_seconds") if live else (0 if summary.get("training_finished") else None),
        "elapsed_seconds": (progress or {}).get("elapsed_seconds") if live else summary.get("wall_seconds"),
        "loss": {"train": train, "val": val},
        "samples": samples, "figures": figures,
        "probe": summary.get("concept_probe"), "summary": summary or None,
        "lora_url": file_url(outputs, lora) if lora.is_file() else None,
        "command": command,
        "resume_command": note.split("resume to finish: ", 1)[1] if "resume to finish: " in note
        else (shlex.join(["python", "-m", "sdtune", f"ckpt_path={hydra_quote(str(folder))}"]) if resumable else None),
        "log_tail": log_tail(log) if log is not None else "",
    }


def compare(outputs: Path, rels: list[str], out: Path) -> dict[str, Any]:
    """``POST /api/compare``: ``sdtune.report``'s loss overlay and samples grid for the chosen runs, and
    their table rows, written into ``out``."""
    from sdtune.report import plot_losses, samples_grid, swept_keys  # deferred: as in _load

    runs = []
    for rel in rels:
        run = _load(outputs / rel)
        if run is None:
            raise ValueError(f"{rel!r} is not a readable run folder under {outputs} (no .hydra/overrides.yaml).")
        run.name = rel
        runs.append(run)
    if not runs:
        raise ValueError("choose at least one run to compare.")
    swept = swept_keys(runs)
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(runs, swept, out / "loss_curves.png")
    grid = samples_grid(runs, swept, out / "samples_grid.png")
    return {"loss_curves": file_url(outputs, out / "loss_curves.png"),
            "samples_grid": file_url(outputs, out / "samples_grid.png") if grid else None,
            "table": [r.row(swept) for r in runs]}
