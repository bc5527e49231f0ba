"""The papers' results table: one row per model (Base / Steering / LoRA / Full ...), one column per benchmark, Avg,
Relative and Relative Improvement. Accuracies are fractions in ``results.json`` and percentages here.

- :func:`relative`: Relative (%) = method / full-tune * 100.
- :func:`relative_improvement`: Relative Improvement (%) = (method - base) / (full - base) * 100; with ``scale=1``
  the same ratio as a fraction, which the analysis commands report as their scores (how much of the gap between a
  reference and a target a variant closes).
"""

from __future__ import annotations

import math
from typing import Any


def relative(method: float, full: float) -> float | None:
    """Relative (%) = method / full * 100; None when the full-tune score is 0."""
    if full == 0:
        return None
    return 100.0 * method / full


def relative_improvement(method: float | None, base: float | None, full: float | None, *,
                         scale: float = 100.0) -> float | None:
    """``scale * (method - base) / (full - base)``; None when a term is missing or ``full - base`` is 0 or not
    finite."""
    if method is None or base is None or full is None:
        return None
    gap = full - base
    if gap == 0 or not math.isfinite(gap):
        return None
    return scale * (method - base) / gap


def format_mean_std(mean: float | None, std: float | None = None, *, scale: float = 100.0, digits: int = 2,
                    show_std: bool = True) -> str:
    """``"12.34 ± 0.56"`` (values scaled by ``scale``); ``"–"`` for a missing value."""
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if show_std and std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text


def _role_row(rows: list[dict[str, Any]], role: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["role"] == role), None)


def add_relative(rows: list[dict[str, Any]]) -> None:
    """Fill each row's ``relative`` / ``relative_improvement`` (percent, on the Avg) where the rows they need exist:
    Full (role full) for Relative, and Base (role base, else base_greedy) and Full for Relative Improvement."""
    full = _role_row(rows, "full")
    base = _role_row(rows, "base") or _role_row(rows, "base_greedy")
    for r in rows:
        avg = r["avg"]["mean"] if r.get("avg") else None
        r["relative"] = relative(avg, full["avg"]["mean"]) if full and avg is not None else None
        r["relative_improvement"] = (relative_improvement(avg, base["avg"]["mean"], full["avg"]["mean"])
                                     if full and base else None)
    for r in rows:
        r["relative_to"] = {"full": full["label"] if full else None, "base": base["label"] if base else None}


def render_table(results: dict[str, Any], digits: int = 2) -> str:
    """The papers' table in markdown: one row per model, one column per benchmark, Avg, Relative, Rel. Improvement."""
    rows = results["rows"]
    benches = results["benchmarks"]
    has_full = any(r["role"] == "full" for r in rows)
    has_base = any(r["role"] in ("base", "base_greedy") for r in rows)
    head = ["Model"] + [f"{b['name']} ({b['metric']})" for b in benches] + ["Avg"]
    if has_full:
        head.append("Relative (%)")
    if has_full and has_base:
        head.append("Rel. Improvement (%)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["label"]]
        for b in benches:
            res = r["results"].get(b["name"])
            cells.append(format_mean_std(res["accuracy"], res["std"], digits=digits) if res else "–")
        cells.append(format_mean_std(r["avg"]["mean"], r["avg"]["std"], digits=digits) if r.get("avg") else "–")
        if has_full:
            cells.append("–" if r["relative"] is None else f"{r['relative']:.{digits}f}")
        if has_full and has_base:
            cells.append("–" if r["relative_improvement"] is None else f"{r['relative_improvement']:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    samp = s["sampling"]
    seeds = s["seeds"]
    limit = (f"max length (prompt + completion) = {s['max_length']}" if s.get("max_length")
             else f"max new tokens = {samp['max_new_tokens']}")
    notes = [
        "",
        f"Accuracy (%), mean ± std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))}); T = {samp['temperature']}, top-p = {samp['top_p']}, {limit}, "
        f"template = {s['template']}. avg@k = mean correctness over k samples per problem; pass@1 = one sample.",
    ]
    if any(r["role"] == "base_greedy" for r in rows):
        notes.append("Base (greedy): T = 0, one sample, one seed.")
    if has_full:
        notes.append("Relative = Avg / Full Avg × 100" + ("; Rel. Improvement = (Avg − Base Avg) / (Full Avg − Base "
                                                            "Avg) × 100." if has_base else "."))
    return "\n".join(lines + notes) + "\n"
