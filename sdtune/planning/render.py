"""The plan as text: a table by component and phase, the verdict for a card, the suggestions.

Kept apart from the arithmetic (:mod:`sdtune.planning.memory_plan`) so the command, the training
warning and the docs print the same thing.
"""

from __future__ import annotations

import math
from typing import Any

from sdtune.families import get_family


def size(value: float) -> str:
    """Bytes as ``812 MiB`` below a GiB, ``12.34 GiB`` above."""
    return f"{value / 2**30:.2f} GiB" if abs(value) >= 2**30 else f"{math.ceil(value / 2**20):,} MiB"


def title(cfg: dict[str, Any]) -> str:
    data, trainer = cfg["data"], cfg["trainer"]
    family = get_family(cfg["model"]["family"])
    optimizer = str(cfg["optim"]["optimizer"].get("_target_", "")).rpartition(".")[2]
    quantize = cfg["model"].get("quantize")
    return (f"Memory plan: {family.name} LoRA rank {cfg['lora'].get('rank')} on {cfg['model'].get('path')}, "
            f"{data['resolution']}², batch {data['batch_size']}, {trainer.get('precision')}, {optimizer}"
            + (f", model.quantize={quantize}" if quantize else ""))


def table(plan: Any) -> list[str]:
    """Rows by component, one column per phase; the peak phase is marked."""
    phases = list(plan.phases)
    rows: list[str] = []
    for comps in plan.phases.values():
        rows += [name for name in comps if name not in rows]
    width = max(len(r) for r in [*rows, "component"]) + 2
    heads = [f"{name}{' (peak)' if name == plan.peak_phase else ''}" for name in phases]
    col = max(14, *(len(h) + 2 for h in heads))
    lines = ["component".ljust(width) + "".join(h.rjust(col) for h in heads)]
    lines.append("-" * (width + col * len(phases)))
    for row in rows:
        cells = [size(plan.phases[p][row]) if row in plan.phases[p] else "-" for p in phases]
        lines.append(row.ljust(width) + "".join(c.rjust(col) for c in cells))
    lines.append("-" * (width + col * len(phases)))
    lines.append("total".ljust(width) + "".join(size(sum(plan.phases[p].values())).rjust(col) for p in phases))
    return lines


def render(plan: Any, gib: float | None = None) -> str:
    """The whole report for ``plan`` and a card of ``gib`` GiB (None: no verdict)."""
    lines = [title(plan.cfg), "", *table(plan), ""]
    on, off = plan.activations[True], plan.activations[False]
    lines.append(f"activations per step: {size(on)} with gradient checkpointing, {size(off)} without")
    lines.append(f"planned peak: {size(plan.peak_bytes)} ({plan.peak_phase})")
    if gib is not None:
        spare = gib * 2**30 - plan.peak_bytes
        if plan.fits(gib):
            lines.append(f"verdict: fits a {gib:g} GiB card ({size(spare)} spare)")
        else:
            lines.append(f"verdict: does NOT fit a {gib:g} GiB card ({size(-spare)} over)")
    suggestions = plan.suggestions(gib) if gib is None or not plan.fits(gib) else []
    if suggestions:
        lines += ["", "what brings the peak down (each alone, then together):" if gib is not None and len(suggestions) > 1
                  and not any(p <= gib * 2**30 for _, p in suggestions[:-1]) else "what brings the peak down (each alone):"]
        for override, peak in suggestions:
            verdict = "" if gib is None else ("  fits" if peak <= gib * 2**30 else "  does not fit")
            lines.append(f"  {override:<40} {size(peak):>12}{verdict}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
