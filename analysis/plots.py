"""PNG figures shared by the analysis commands: heatmaps, per-layer curves, bar charts, token tables and text with
per-token highlights. Headless (Agg backend); every function writes one PNG and returns its path.

Missing values (None / NaN) are drawn blank (grey) and never break a plot.

Token text is drawn legibly whatever its script (:func:`legible`): characters the plot fonts have are drawn as they
are; CJK and other scripts are drawn in an installed font that covers them (:data:`FALLBACK_FONTS`, e.g. Debian's
``fonts-noto-cjk``), and characters no installed font covers are written out as their script and code point,
``[Han 522B]``, instead of the empty boxes matplotlib would draw.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_MISSING = "#dddddd"

TOKEN_FONT = "DejaVu Sans Mono"  # matplotlib's own monospace font: always there
# Fonts with CJK (and other non-Latin) coverage, used for token text when installed (in this order).
FALLBACK_FONTS = ("Noto Sans Mono CJK SC", "Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC",
                  "WenQuanYi Zen Hei Mono", "WenQuanYi Zen Hei", "Droid Sans Fallback", "Noto Sans")


@functools.cache
def token_fonts() -> tuple[str, ...]:
    """The font families token text is drawn with: the monospace font, then the installed fallback fonts."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return (TOKEN_FONT, *[name for name in FALLBACK_FONTS if name in installed])


@functools.cache
def _covered() -> frozenset[int]:
    """Code points that some font of :func:`token_fonts` has a glyph for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    points: set[int] = set()
    for family in token_fonts():
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        points.update(FT2Font(path).get_charmap())
    return frozenset(points)


# Tick labels and titles (DejaVu Sans) fall back to the same fonts.
matplotlib.rcParams["font.sans-serif"] = ["DejaVu Sans", *token_fonts()[1:],
                                          *[f for f in matplotlib.rcParams["font.sans-serif"] if f != "DejaVu Sans"]]


def _script(ch: str) -> str:
    """A short name for the script of a character: the first word of its Unicode name (``Han`` for CJK)."""
    name = unicodedata.name(ch, "")
    if unicodedata.category(ch).startswith("S"):
        return "Sym"
    word = name.split(" ")[0] if name else "U"
    return {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana"}.get(word, word.title())


def legible(text: str, *, compact: bool = False) -> str:
    """``text`` with every character no plot font can draw written as ``[Script HEX ...]`` (a run of the same script
    in one bracket; ``compact``: ``[Script×n]`` for runs of several, for short labels), so a plot never shows empty
    boxes; everything else unchanged."""
    covered = _covered()
    out: list[str] = []
    run_script, run = None, []

    def flush() -> None:
        if run:
            out.append(f"[{run_script}×{len(run)}]" if compact and len(run) > 1 else f"[{run_script} {' '.join(run)}]")
            run.clear()

    for ch in text:
        if ord(ch) in covered or ch in "\n\t\r":
            flush()
            out.append(ch)
            continue
        script = _script(ch)
        if script != run_script:
            flush()
        run_script = script
        run.append(f"{ord(ch):04X}")
    flush()
    return "".join(out)


def _array(matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)


def _finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a)]


def save(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (cropped to its content) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def show_token(text: str, limit: int = 14) -> str:
    """A token's text made visible: whitespace and control characters escaped, characters no font has spelled out
    (:func:`legible`), long tokens shortened."""
    out = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    out = legible(out, compact=True)
    out = out.replace("$", r"\$")  # matplotlib mathtext
    if out.strip() == "":
        out = out.replace(" ", "␣") or "∅"
    return out if len(out) <= limit else out[: limit - 1] + "…"


def heatmap(path: str | Path, matrix: Sequence[Sequence[float | None]], row_labels: Sequence[Any],
            col_labels: Sequence[Any], *, title: str = "", xlabel: str = "", ylabel: str = "",
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None, center: float | None = None,
            annotate: bool | None = None, fmt: str = "{:.3g}", colorbar_label: str = "") -> Path:
    """A matrix as a heatmap (rows top to bottom). ``center`` makes a diverging scale symmetric around it."""
    a = _array(matrix)
    rows, cols = a.shape if a.size else (len(row_labels), len(col_labels))
    fin = _finite(a)
    if center is not None and fin.size:
        span = float(np.max(np.abs(fin - center))) or 1.0
        vmin, vmax = center - span, center + span
    if annotate is None:
        annotate = rows * cols <= 400
    w = min(16.0, 2.5 + 0.45 * cols)
    h = min(14.0, 1.8 + 0.4 * rows)
    fig, ax = plt.subplots(figsize=(max(w, 4.0), max(h, 3.0)))
    cm = matplotlib.colormaps[cmap].with_extremes(bad=_MISSING)
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(cols))
    ax.set_xticklabels([str(c) for c in col_labels], rotation=90 if cols > 12 else 0, fontsize=8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels([str(r) for r in row_labels], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax)
    if colorbar_label:
        cb.set_label(colorbar_label)
    if annotate and a.size:
        lo, hi = im.get_clim()
        for i in range(rows):
            for j in range(cols):
                v = a[i, j]
                if np.isfinite(v):
                    frac = (v - lo) / (hi - lo) if hi > lo else 0.5
                    color = "white" if (frac < 0.5 if cmap in ("viridis", "magma", "inferno", "cividis") else
                                        abs(frac - 0.5) > 0.3) else "black"
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=color)
    return save(fig, path)


def line_plot(path: str | Path, x: Sequence[Any], series: Mapping[str, Sequence[float | None]], *, title: str = "",
              xlabel: str = "", ylabel: str = "", hlines: Mapping[str, float | None] | None = None,
              markers: bool = True, ylim: tuple[float, float] | None = None, cmap: str | None = None) -> Path:
    """Curves over a shared x axis (e.g. one per steering layer over target layers), with optional reference lines."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = None
    if cmap is not None and len(series) > 1:
        colors = [matplotlib.colormaps[cmap](i / max(len(series) - 1, 1)) for i in range(len(series))]
    for k, (label, ys) in enumerate(series.items()):
        y = np.array([np.nan if v is None else float(v) for v in ys], dtype=float)
        ax.plot(list(x)[: len(y)], y, marker="o" if markers else None, markersize=3, label=str(label),
                color=None if colors is None else colors[k])
    styles = ["--", ":", "-."]
    for k, (label, value) in enumerate((hlines or {}).items()):
        if value is not None and math.isfinite(value):
            ax.axhline(value, linestyle=styles[k % len(styles)], color=f"C{(k + 5) % 10}", label=str(label))
    if all(isinstance(v, int) for v in x):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if len(series) + len(hlines or {}) > 1:
        ax.legend(fontsize=7, ncol=1 + (len(series) + len(hlines or {})) // 12, loc="best")
    return save(fig, path)


def bar_plot(path: str | Path, labels: Sequence[str], values: Sequence[float | None], *, title: str = "",
             ylabel: str = "", xlabel: str = "", hlines: Mapping[str, float | None] | None = None,
             errors: Sequence[float | None] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(min(16.0, 2.0 + 0.45 * len(labels)), 4.0))
    vals = [np.nan if v is None else float(v) for v in values]
    errs = None if errors is None else [0.0 if e is None else float(e) for e in errors]
    ax.bar(range(len(vals)), vals, yerr=errs, color=["C0" if (v >= 0 or not np.isfinite(v)) else "C3" for v in vals])
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels([str(label) for label in labels], rotation=60 if len(labels) > 8 else 0, ha="right"
                       if len(labels) > 8 else "center", fontsize=8)
    for k, (label, value) in enumerate((hlines or {}).items()):
        if value is not None and math.isfinite(value):
            ax.axhline(value, linestyle="--", color=f"C{(k + 1) % 10}", label=str(label))
    if hlines:
        ax.legend(fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


def token_table(path: str | Path, rows: Sequence[tuple[str, Sequence[tuple[str, float]]]], *, title: str = "",
                cmap: str = "RdBu_r", value_label: str = "logit") -> Path:
    """One row per label (e.g. a layer), each a ranked list of ``(token_text, value)`` cells coloured by value.

    Used for logit-lens readouts: top tokens in one table, bottom tokens in another."""
    n_rows = len(rows)
    n_cols = max((len(cells) for _, cells in rows), default=0)
    vals = np.full((max(n_rows, 1), max(n_cols, 1)), np.nan)
    for i, (_, cells) in enumerate(rows):
        for j, (_, v) in enumerate(cells):
            vals[i, j] = v
    fin = _finite(vals)
    span = float(np.max(np.abs(fin))) if fin.size else 1.0
    fig, ax = plt.subplots(figsize=(min(22.0, 2.0 + 1.15 * n_cols), min(16.0, 1.2 + 0.36 * n_rows)))
    cm = matplotlib.colormaps[cmap].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cm, vmin=-span or -1, vmax=span or 1, aspect="auto")
    for i, (_, cells) in enumerate(rows):
        for j, (tok, _) in enumerate(cells):
            ax.text(j, i, show_token(tok), ha="center", va="center", fontsize=7, family=list(token_fonts()))
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([str(j + 1) for j in range(n_cols)], fontsize=7)
    ax.set_xlabel("rank")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=value_label)
    return save(fig, path)


def token_highlight(path: str | Path, tokens: Sequence[str], values: Sequence[float], *, title: str = "",
                    segments: Sequence[str] | None = None, cmap: str = "Reds", vmin: float | None = None,
                    vmax: float | None = None, value_label: str = "", width: int = 110,
                    blocks: Sequence[tuple[str, Sequence[str], Sequence[float], Sequence[str] | None]] | None = None
                    ) -> Path:
    """Text drawn token by token, each token's background coloured by its value (e.g. steering magnitude).

    ``segments`` (one name per token) draws a coloured bar under each token, one colour per segment (system /
    question / generation ...), with a legend. ``blocks`` draws several texts (title, tokens, values, segments) in
    one figure instead. Line breaks in the text start new lines; long lines wrap at ``width`` characters."""
    items = list(blocks) if blocks is not None else [(title, tokens, values, segments)]
    all_vals = np.array([float(v) for _, _, vs, _ in items for v in vs if v is not None and math.isfinite(v)])
    lo = vmin if vmin is not None else (float(all_vals.min()) if all_vals.size else 0.0)
    hi = vmax if vmax is not None else (float(all_vals.max()) if all_vals.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-9
    cm = matplotlib.colormaps[cmap]
    seg_names: list[str] = []
    for _, _, _, segs in items:
        for s in segs or []:
            if s not in seg_names:
                seg_names.append(s)
    seg_color = {s: f"C{k % 10}" for k, s in enumerate(seg_names)}

    # Layout in character cells (monospace).
    layouts = []
    total_lines = 0
    for block_title, toks, vals, segs in items:
        placed = []  # (line, col, text, value, segment)
        line, col = 0, 0
        for k, tok in enumerate(toks):
            parts = tok.split("\n")
            for pi, part in enumerate(parts):
                if pi > 0:
                    # draw the newline itself as a visible marker, then break
                    placed.append((line, col, "↵", vals[k], segs[k] if segs else None))
                    line, col = line + 1, 0
                text = legible(part.replace("\t", "    "))
                if not text:
                    continue
                if col + len(text) > width and col > 0:
                    line, col = line + 1, 0
                placed.append((line, col, text, vals[k], segs[k] if segs else None))
                col += len(text)
        layouts.append((block_title, placed, line + 1))
        total_lines += line + 1 + 2
    used = max((col + len(text) for _, placed, _ in layouts for _, col, text, _, _ in placed), default=1)
    width = max(40, min(width, used + 1))
    char_w, line_h = 0.075, 0.24
    fig_w = max(4.0, width * char_w + 1.0)
    font = fig_w * 0.96 * 72 / width / 0.6 * 0.95  # monospace glyph width ~0.6 em fills one character cell
    fig_h = min(60.0, max(2.0, total_lines * line_h + 1.2))
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([0.02, 0.06, 0.96, 0.9])
    ax.set_xlim(0, width)
    ax.set_ylim(total_lines, 0)
    ax.axis("off")
    y0 = 0
    for block_title, placed, n_lines in layouts:
        ax.text(0, y0 + 0.7, legible(block_title), fontsize=9, weight="bold", va="bottom")
        y0 += 1.5
        for line, col, text, value, seg in placed:
            v = float(value) if value is not None and math.isfinite(value) else None
            face = cm((v - lo) / (hi - lo)) if v is not None else (1, 1, 1, 1)
            ax.add_patch(plt.Rectangle((col, y0 + line), len(text), 0.9, facecolor=face, edgecolor="none"))
            if seg is not None:
                ax.add_patch(plt.Rectangle((col, y0 + line + 0.88), len(text), 0.12, facecolor=seg_color[seg],
                                           edgecolor="none"))
            ax.text(col, y0 + line + 0.45, text.replace("$", r"\$"), fontsize=font, family=list(token_fonts()),
                    va="center", ha="left")
        y0 += n_lines + 0.5
    sm = matplotlib.cm.ScalarMappable(cmap=cm, norm=matplotlib.colors.Normalize(lo, hi))
    cax = fig.add_axes([0.15, 0.02, 0.4, 0.015])
    fig.colorbar(sm, cax=cax, orientation="horizontal", label=value_label)
    if seg_names:
        handles = [plt.Rectangle((0, 0), 1, 1, color=seg_color[s]) for s in seg_names]
        fig.legend(handles, seg_names, loc="lower right", ncol=len(seg_names), fontsize=7, frameon=False)
    return save(fig, path)


def forest_plot(path: str | Path, groups: Mapping[str, Sequence[tuple[str, float, Sequence[float] | None]]], *,
                title: str = "", xlabel: str = "") -> Path:
    """Estimates with their intervals, one panel per group (e.g. one pair of rows), one line per item (a benchmark:
    ``(label, estimate, (low, high) or None)``), and a dashed line at 0."""
    heights = [max(1, len(items)) for items in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.0, 1.0 + 0.3 * sum(heights) + 0.45 * len(groups)),
                             sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (name, items) in zip(axes[:, 0], groups.items()):
        ys = np.arange(len(items))[::-1]
        for y, (_, estimate, ci) in zip(ys, items):
            if ci is not None:
                ax.hlines(y, ci[0], ci[1], color="C0", linewidth=2)
            ax.plot([estimate], [y], "o", color="C0", markersize=5)
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([show_token(label, limit=28) for label, _, _ in items], fontsize=8)
        ax.set_ylim(-0.7, len(items) - 0.3)
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=10, y=1.0 + 0.25 / fig.get_figheight())  # above the first panel's title
    return save(fig, path)
