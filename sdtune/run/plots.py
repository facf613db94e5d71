"""A run's loss, read back from its ``metrics.csv`` and drawn: ``loss.png`` at the end of every run
(:class:`sdtune.run.callbacks.LossPlot`) and the curves of ``python -m sdtune.report``.

The reading and drawing live here, under run/, so that the callback does not borrow them from the
report command; the report imports them from here.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sdtune.utils.io import atomic_path

Curve = list[tuple[int, float]]


def read_metrics(path: Path) -> tuple[Curve, Curve]:
    """(train loss per step, validation loss per step) from a CSV logger's ``metrics.csv``; empty when absent."""
    train, val = [], []
    if not path.is_file():
        return train, val
    with open(path, newline="", encoding="utf-8") as fh:
        for rec in csv.DictReader(fh):
            step = int(rec["step"])
            if rec.get("train/loss_step"):
                train.append((step, float(rec["train/loss_step"])))
            if rec.get("val/loss"):
                val.append((step, float(rec["val/loss"])))
    return train, val


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """TensorBoard-style exponential smoothing, debiased so the first points are not pulled to 0.

    The default weight grows with the number of points (0.6 for 10, 0.9 for 100, 0.97 for 1000).
    """
    if weight is None:
        weight = min(0.97, max(0.0, 1.0 - 4.0 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically, then free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)


def plot_run_loss(train: Curve, val: Curve, path: Path, title: str = "loss") -> None:
    """One run's loss: raw train loss faint, smoothed solid, validation loss as dots."""
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8, label="train loss")
        ax.plot(steps, smooth(list(values)), color="C0", linewidth=1.8, label="train loss (smoothed)")
    if val:
        ax.plot(*zip(*val), color="C1", marker="o", markersize=4, linewidth=1.2, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
