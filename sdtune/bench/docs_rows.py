"""``bench.write_docs=true``: a GPU bench run writes its own row into docs/benchmarks.md.

The "GPU rows" table sits between two marker comments (:data:`BEGIN`, :data:`END`); each row is
keyed by its preset (first cell, e.g. ``gpu_sdxl``). :func:`update_rows` is a pure function of the
markdown text and one row: that preset's row is replaced (or appended), every other byte of the
file stays as it was, and running it again with the same row changes nothing. :func:`write_row`
reads the file, applies it and writes the result atomically (temp file, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdtune.utils.errors import ConfigError
from sdtune.utils.io import atomic_path

BEGIN = "<!-- bench:gpu-rows:begin -->"
END = "<!-- bench:gpu-rows:end -->"
HEADER = ("preset", "target", "command", "GPU", "versions", "date", "figures", "result")


def _cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|") or "—"


def format_row(row: Mapping[str, Any]) -> str:
    return "| " + " | ".join(_cell(row.get(k, "")) for k in HEADER) + " |"


def _key(line: str) -> str | None:
    """The preset of a table row, None for anything else (header, separator, text)."""
    stripped = line.strip()
    if not stripped.startswith("|") or set(stripped) <= set("|-: "):
        return None
    key = stripped.strip("|").split("|", 1)[0].strip()
    return None if key == HEADER[0] else key


def update_rows(markdown: str, row: Mapping[str, Any], *, source: str = "docs/benchmarks.md") -> str:
    """``markdown`` with ``row`` (keyed by ``row["preset"]``) in the table between the markers."""
    start, end = markdown.find(BEGIN), markdown.find(END)
    if start < 0 or end < start:
        raise ConfigError(f"{source} has no GPU rows table between {BEGIN} and {END}. Fix: put those two lines "
                          "around the table (as in the repository's docs/benchmarks.md), or run without bench.write_docs=true.")
    body_start = start + len(BEGIN)
    newline = "\r\n" if "\r\n" in markdown[body_start:end] else "\n"
    lines = markdown[body_start:end].split(newline)
    new = format_row(row)
    keyed = [i for i, line in enumerate(lines) if _key(line) == _cell(row["preset"])]
    if keyed:
        lines[keyed[0]] = new
        for i in reversed(keyed[1:]):  # a duplicate row of the same preset: keep one
            del lines[i]
    else:
        table = [i for i, line in enumerate(lines) if line.strip().startswith("|")]
        if not table:  # an empty block: header and separator first
            lines[1:1] = [format_row(dict(zip(HEADER, HEADER))), "|" + "---|" * len(HEADER)]
            table = [1, 2]
        lines.insert(table[-1] + 1, new)
    return markdown[:body_start] + newline.join(lines) + markdown[end:]


def figures(rows: Sequence[Mapping[str, str]], cases: Sequence[str]) -> str:
    """The measured numbers of the target cases: ms/step, img/s, peak MiB and MFU."""
    out = []
    for r in rows:
        if r["case"] in cases:
            out.append(f"{r['case']}: {r['ms_per_step']} ms/step, {r['images_per_s']} img/s, "
                       f"peak {r['peak_mem_mib']} MiB, MFU {r['mfu_pct']}%")
    return "; ".join(out)


def bench_row(preset: str, bench: Mapping[str, Any], rows: Sequence[Mapping[str, str]], info: Mapping[str, Any]) -> dict[str, str]:
    """The docs row of one finished bench run (``info`` as written to bench.json)."""
    targets = bench.get("targets") or []
    versions = info["versions"]
    verdicts = [line for line in info["targets"]] + [f"error: {e}" for e in info["errors"]]
    return {
        "preset": preset,
        "target": bench.get("description") or ", ".join(f"{t['case']} {t['metric']}" for t in targets),
        "command": f"`{info['command'].strip()}`",
        "GPU": info["device"],
        "versions": f"torch {versions['torch']}, diffusers {versions['diffusers']}",
        "date": info["date"],
        "figures": figures(rows, sorted({t["case"] for t in targets})) or "—",
        "result": "; ".join(f"**{v}**" if v.startswith(("PASS", "FAIL")) else v for v in verdicts) or "no target",
    }


def read_text(path: str | os.PathLike) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": \r\n stays \r\n
        return f.read()


def write_row(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Replace ``row``'s preset row of the GPU table in ``path`` (atomically)."""
    path = Path(path)
    text = update_rows(read_text(path), row, source=str(path))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
