"""Turn data-juicer's trace records into one readable reason per dropped file.

Filters leave the dropped sample with its ``__dj__stats__``; a few common ops get a sentence
built from the stats and the op's effective parameters (recipe values over the op's defaults),
e.g. ``image_shape_filter: 800x1200 is below min 1024x1024``. Any other op gets its stats
listed. Deduplicator pairs name the kept file. A sample that vanished without a trace record
(an op raised on it) is still reported, so every input file is accounted for.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from data_pipeline.candidates import Drop
from data_pipeline.model_reasons import MODEL_EXPLAIN

STATS = "__dj__stats__"
NO_TRACE = "data-juicer"


def _bound(value) -> str:
    return "unlimited" if value is None or (isinstance(value, int | float) and value >= 2**62) else str(value)


def _fmt(value) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _shape(p: dict, s: dict, size) -> str | None:
    if not s.get("image_width") or not s.get("image_height"):
        return None
    w, h = s["image_width"][0], s["image_height"][0]
    if w < p["min_width"] or h < p["min_height"]:
        return f"{w}x{h} is below min {p['min_width']}x{p['min_height']}"
    if w > p["max_width"] or h > p["max_height"]:
        return f"{w}x{h} is above max {_bound(p['max_width'])}x{_bound(p['max_height'])}"
    return None


def _aspect(p: dict, s: dict, size) -> str | None:
    if not s.get("aspect_ratios"):
        return None
    ratio = s["aspect_ratios"][0]
    if p["min_ratio"] <= ratio <= p["max_ratio"]:
        return None
    dims = f" ({size[0]}x{size[1]})" if size else ""
    return f"aspect ratio {ratio:.3g}{dims} is outside [{p['min_ratio']}, {p['max_ratio']}]"


def _file_size(p: dict, s: dict, size) -> str | None:
    from data_juicer.utils.mm_utils import size_to_bytes

    if not s.get("image_sizes"):
        return None
    n = s["image_sizes"][0]
    shown = f"{n / 1024:.1f} KiB" if n >= 1024 else f"{int(n)} bytes"
    if n < size_to_bytes(p["min_size"]):
        return f"file size {shown} is below min {p['min_size']}"
    if n > size_to_bytes(p["max_size"]):
        return f"file size {shown} is above max {p['max_size']}"
    return None


def _text_len(p: dict, s: dict, size) -> str | None:
    if "text_len" not in s:
        return None
    n = s["text_len"]
    if n < p["min_len"]:
        return f"caption length {n} is below min {p['min_len']}"
    if n > p["max_len"]:
        return f"caption length {n} is above max {_bound(p['max_len'])}"
    return None


EXPLAIN: dict[str, Callable] = {
    "image_shape_filter": _shape,
    "image_aspect_ratio_filter": _aspect,
    "image_size_filter": _file_size,
    "text_length_filter": _text_len,
    **MODEL_EXPLAIN,
}


def effective_params(op_name: str, params: dict) -> dict:
    """The op's ``__init__`` defaults overlaid with the recipe's values."""
    from data_juicer.ops.base_op import OPERATORS

    cls = OPERATORS.modules.get(op_name)
    defaults = {}
    if cls is not None:
        for name, par in inspect.signature(cls.__init__).parameters.items():
            if par.default is not inspect.Parameter.empty:
                defaults[name] = par.default
    return {**defaults, **params}


def _generic(stats: dict) -> str:
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(stats.items()))
    return f"dropped ({shown})" if shown else "dropped"


def explain_filter(op_name: str, param_sets: list[dict], stats: dict, size) -> str:
    """Reason text for a sample ``op_name`` dropped (first matching instance of the op)."""
    stats = {k: v for k, v in (stats or {}).items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    explain = EXPLAIN.get(op_name)
    if explain is not None:
        for params in param_sets:
            try:
                reason = explain(effective_params(op_name, params), stats, size)
            except (KeyError, TypeError, ValueError):
                reason = None
            if reason:
                return f"{op_name}: {reason}"
    return f"{op_name}: {_generic(stats)}"


def attribute(ids: dict[int, str], sizes: dict[int, tuple], result, ops: list[tuple[str, dict]]) -> list[Drop]:
    """One :class:`Drop` for every id in ``ids`` (id -> file key) that data-juicer did not keep."""
    params: dict[str, list[dict]] = {}
    for name, p in ops:
        params.setdefault(name, []).append(p)
    reasons: dict[int, Drop] = {}
    for op_name, records in result.filtered.items():
        for rec in records:
            sid = rec.get("sdtune_id")
            if sid in ids and sid not in result.kept and sid not in reasons:
                reason = explain_filter(op_name, params.get(op_name, [{}]), rec.get(STATS), sizes.get(sid))
                reasons[sid] = Drop(ids[sid], op_name, reason)
    for op_name, pairs in result.duplicates.items():
        for pair in pairs:
            kept, dup = pair.get("dup1") or {}, pair.get("dup2") or {}
            sid = dup.get("sdtune_id")
            if sid in ids and sid not in result.kept and sid not in reasons:
                what = f"duplicate of {ids.get(kept.get('sdtune_id'), '?')}"
                if "__sdtune_distance__" in dup and any(p.get("method") == "dhash" for p in params.get(op_name, [])):
                    what += f" (dhash distance {dup['__sdtune_distance__']})"
                elif "__sdtune_distance__" in dup:
                    what += " (identical bytes)"
                reasons[sid] = Drop(ids[sid], op_name, f"{op_name}: {what}")
    for sid, key in ids.items():
        if sid not in result.kept and sid not in reasons:
            reasons[sid] = Drop(
                key, NO_TRACE, f"{NO_TRACE}: dropped without a trace record (an op failed on it; see the log)"
            )
    return [reasons[sid] for sid in sorted(reasons)]
