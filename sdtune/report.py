"""``python -m sdtune.report RUN_OR_MULTIRUN_DIR``: one table and two pictures for a sweep or one run.

Writes into MULTIRUN_DIR (or ``--out``):

* ``report.csv`` and ``report.md``: one row per run with the swept values, final and minimum train
  loss, final validation loss, trainable parameters, LoRA file size, steps per second, wall time,
  and the last evaluation against reference images (``eval/...``); ``--sort METRIC`` ranks the runs;
* ``loss_curves.png``: every run's train loss (and validation loss, dashed) on one plot;
* ``samples_grid.png``: each run's final samples with the LoRA on, rows = runs, columns = prompts.

Everything is read from the runs' own files (``.hydra/overrides.yaml``, ``logs/csv/metrics.csv``,
``summary.json``, ``samples/samples/*.png``), so the report can be rebuilt at any time.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from sdtune.inference.sampling import make_grid
from sdtune.run.plots import pyplot, read_metrics, save_figure
from sdtune.utils.io import save_image_atomic, write_text_atomic
from sdtune.utils.metrics import higher_is_better

COLUMNS = ["final_train_loss", "min_train_loss", "final_val_loss", "trainable_params", "lora_bytes", "steps_per_second", "wall_seconds"]


@dataclass
class Run:
    name: str
    folder: Path
    overrides: dict[str, str]
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def row(self, swept: list[str]) -> dict[str, object]:
        losses = [v for _, v in self.train_loss]
        row: dict[str, object] = {"run": self.name, **{k: self.overrides.get(k, "") for k in swept}}
        row["final_train_loss"] = losses[-1] if losses else None
        row["min_train_loss"] = min(losses) if losses else None
        row["final_val_loss"] = self.val_loss[-1][1] if self.val_loss else None
        for key in ("trainable_params", "lora_bytes", "steps_per_second", "wall_seconds"):
            row[key] = self.summary.get(key)
        row.update(self.eval_metrics())
        return row

    def eval_metrics(self) -> dict[str, float]:
        """The last evaluation against reference images (``summary.json``'s ``eval.final``), by metric name."""
        final = (self.summary.get("eval") or {}).get("final") or {}
        return {k: v for k, v in final.items() if k.startswith("eval/")}


def load_runs(sweep: Path) -> list[Run]:
    """The runs of a multirun folder, or the one run when ``sweep`` is a run folder itself."""
    runs = []
    if (sweep / ".hydra" / "overrides.yaml").is_file():
        jobs = [sweep]
    else:
        jobs = [p for p in sweep.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    for folder in sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        overrides = {}
        for item in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []:
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = value
        train, val = read_metrics(folder / "logs" / "csv" / "metrics.csv")
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        runs.append(Run(folder.name, folder, overrides, train, val, summary))
    return runs


def swept_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.overrides})
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    return varying or keys


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_table(rows: list[dict], out: Path) -> None:
    header = list(rows[0]) if rows else ["run"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "report.csv", buf.getvalue())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in header) + " |" for r in rows]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


def plot_losses(runs: list[Run], swept: list[str], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 5), dpi=100)
    for i, run in enumerate(runs):
        label = ", ".join(f"{k}={run.overrides.get(k)}" for k in swept) or run.name
        colour = f"C{i % 10}"
        if run.train_loss:
            ax.plot(*zip(*run.train_loss), color=colour, label=f"{label} (train)", linewidth=1.2)
        if run.val_loss:
            ax.plot(*zip(*run.val_loss), color=colour, linestyle="--", marker="o", markersize=3, label=f"{label} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def samples_grid(runs: list[Run], swept: list[str], path: Path) -> bool:
    rows, labels, prompts = [], [], []
    for run in runs:
        folder = run.folder / "samples" / "samples"
        tiles = sorted(folder.glob("*.png"))
        if (folder / "prompts.json").is_file() and not prompts:
            prompts = json.loads((folder / "prompts.json").read_text(encoding="utf-8"))
        if tiles:
            rows.append([Image.open(t).convert("RGB") for t in tiles])
            labels.append(", ".join(f"{k}={run.overrides.get(k)}" for k in swept) or run.name)
    if not rows:
        return False
    width = max(len(r) for r in rows)
    blank = Image.new("RGB", rows[0][0].size, "white")
    rows = [r + [blank] * (width - len(r)) for r in rows]
    columns = [prompts[j] if j < len(prompts) else f"prompt {j}" for j in range(width)]
    save_image_atomic(make_grid(rows, labels, columns), path)
    return True


def rank_rows(rows: list[dict], metric: str) -> list[dict]:
    """``rows`` best first by ``metric`` (similarities descending, losses and distances ascending),
    numbered in a ``rank`` column; runs without the metric last."""
    if not any(r.get(metric) is not None for r in rows):
        known = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
        raise SystemExit(f"error: --sort {metric}: no run has that metric; sortable: {', '.join(known)}")
    sign = -1.0 if higher_is_better(metric) else 1.0
    ranked = sorted(rows, key=lambda r: (r.get(metric) is None, sign * float(r.get(metric) or 0.0)))
    return [{"rank": i + 1, **r} for i, r in enumerate(ranked)]


def report(sweep: str | Path, out: str | Path | None = None, sort: str | None = None) -> list[dict]:
    sweep = Path(sweep)
    runs = load_runs(sweep) if sweep.is_dir() else []
    if not runs:
        raise SystemExit(f"error: {sweep} is no run folder and holds no runs (folders with .hydra/overrides.yaml). "
                         "Point it at a run folder (outputs/runs/<time>) or a sweep (outputs/multirun/<time>).")
    out = Path(out) if out else sweep
    out.mkdir(parents=True, exist_ok=True)
    swept = swept_keys(runs)
    rows = [r.row(swept) for r in runs]
    columns = list(dict.fromkeys(k for r in rows for k in r))  # eval metrics some runs lack: empty cells
    rows = [{k: r.get(k) for k in columns} for r in rows]
    if sort:
        rows = rank_rows(rows, sort)
    write_table(rows, out)
    plot_losses(runs, swept, out / "loss_curves.png")
    samples_grid(runs, swept, out / "samples_grid.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a run folder (outputs/runs/<time>) or a sweep (outputs/multirun/<time>)")
    parser.add_argument("--out", help="where to write the report (default: the sweep folder)")
    parser.add_argument("--sort", metavar="METRIC", help="rank runs by a column, e.g. eval/latent_dist (lower is better) "
                        "or eval/clip_i or eval/aesthetic (higher is better); similarities and aesthetic scores "
                        "sort descending, losses and distances ascending")
    args = parser.parse_args(argv)
    rows = report(args.sweep, args.out, args.sort)
    print((Path(args.out or args.sweep) / "report.md").read_text())
    print(f"{len(rows)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
