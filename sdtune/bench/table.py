"""Bench rows: one per (model, case), printed as one table and written as CSV and Markdown.

Columns that could not be measured say why ("n/a (CPU)", "n/a (needs CUDA)") rather than being
blank, so a reader of the CSV knows a missing number was not a failure.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from sdtune.bench.cases import REFERENCE, Case
from sdtune.bench.measure import Timing, shared_round_ratio

COLUMNS = [
    "family", "model", "case", "variant", "device", "precision", "batch", "resolution", "steps_timed",
    "rounds", "round_spread", "ms_per_step", "images_per_s", "peak_mem_mib", "gflop_per_image", "gflop_fwd_per_image", "mfu_pct", "vs_reference",
    "vs_baseline", "baseline", "note",
]
#: Columns shown in the console table (the CSV has all of them).
SHOWN = ["family", "model", "variant", "batch", "ms_per_step", "images_per_s", "peak_mem_mib", "gflop_per_image",
         "mfu_pct", "vs_reference", "vs_baseline"]
HEADERS = {"ms_per_step": "ms/step", "images_per_s": "img/s", "peak_mem_mib": "peak MiB", "gflop_per_image": "GFLOP/img",
           "mfu_pct": "MFU %", "vs_reference": "x ref", "vs_baseline": "x base"}


def _num(value: float, digits: int = 4) -> str:
    """``digits`` significant figures, plain notation (CSV readers and humans both)."""
    if value == 0:
        return "0"
    text = f"{value:.{digits}g}"
    return f"{float(text):f}".rstrip("0").rstrip(".") if "e" in text else text


def make_row(
    *,
    case: Case,
    meta: Mapping[str, Any],
    timing: Timing | None,
    flops_per_image: float | None,
    fwd_flops_per_image: float | None,
    peak_flops: float,
    reference: Timing | None,
    baseline: Timing | None,
    unavailable: str | None,
) -> dict[str, str]:
    """One table row. ``unavailable`` (e.g. "n/a (CPU)") fills the timing columns when not timed."""
    row = {k: str(meta.get(k, "")) for k in COLUMNS}
    row.update(case=case.name, variant=case.variant, baseline=case.vs or "")
    row["gflop_per_image"] = _num(flops_per_image / 1e9) if flops_per_image else "n/a"
    row["gflop_fwd_per_image"] = _num(fwd_flops_per_image / 1e9) if fwd_flops_per_image else "n/a"
    if timing is None or not timing.seconds:
        for key in ("ms_per_step", "images_per_s", "peak_mem_mib", "mfu_pct", "vs_reference", "vs_baseline"):
            row[key] = unavailable or "n/a"
        row.update(steps_timed="0", rounds="0", round_spread="")
        return row
    # Switch rows compare with their own base case (same rounds); a ratio to the reference would
    # mix rounds the base case does not share.
    vs_ref = shared_round_ratio(timing, reference) if reference is not None and reference.seconds and not case.switch else None
    vs_base = shared_round_ratio(timing, baseline) if baseline is not None and baseline.seconds and case.vs != REFERENCE else None
    row.update(
        steps_timed=str(len(timing.seconds)),
        rounds=str(len(timing.rounds)),
        round_spread=f"{timing.spread:.2f}",
        ms_per_step=_num(timing.ms_per_step),
        images_per_s=_num(timing.images_per_s),
        peak_mem_mib=_num(timing.peak_mb),
        mfu_pct=_num(100 * flops_per_image * timing.images_per_s / peak_flops, 3) if flops_per_image else "n/a",
        vs_reference=f"{vs_ref:.3f}" if vs_ref is not None else "",
        vs_baseline=f"{vs_base:.3f}" if vs_base is not None else "",
    )
    return row


def to_csv(rows: Sequence[Mapping[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: Sequence[Mapping[str, str]], columns: Sequence[str] = SHOWN) -> str:
    head = [HEADERS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_console(rows: Sequence[Mapping[str, str]], columns: Sequence[str] = SHOWN) -> str:
    head = [HEADERS.get(c, c) for c in columns]
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in cells]
    return "\n".join(out)


def check_targets(rows: Sequence[Mapping[str, str]], targets: Sequence[Mapping[str, Any]]) -> list[str]:
    """One PASS/FAIL/SKIP line per (target, matching row): ``{case, metric, at_most|below|at_least, model?}``."""
    lines = []
    for target in targets:
        matching = [r for r in rows if r["case"] == target["case"] and target.get("model") in (None, r["model"])]
        for row in matching:
            raw = row.get(target["metric"], "")
            name = f"{row['model']} {target['case']} {target['metric']}"
            try:
                value = float(raw)
            except ValueError:
                lines.append(f"SKIP {name}: {raw or 'not measured'}")
                continue
            for op, ok in (("at_most", lambda v, t: v <= t), ("below", lambda v, t: v < t), ("at_least", lambda v, t: v >= t)):
                if op in target:
                    verdict = "PASS" if ok(value, float(target[op])) else "FAIL"
                    lines.append(f"{verdict} {name} = {raw} ({op.replace('_', ' ')} {target[op]})")
    return lines
