"""``python -m analysis similarity``: cosine similarity between steering vectors (behaviour and RL-trained).

Every ``--vectors`` item is a steering checkpoint directory (a DiffMean checkpoint, an RL checkpoint, anything
written by ``save_checkpoint``), optionally named ``NAME=DIR``; a directory that holds checkpoints in its
subdirectories (a ``diffmean`` output) expands to all of them, named by subdirectory. No model is loaded.

Reports, over the layers all inputs share, the per-layer cosine matrices and the matrix of the vectors concatenated
across those layers; with ``--layer`` the heatmap shows that layer, otherwise one small heatmap per layer plus the
concatenated one. Writes ``OUT/result.json`` and ``OUT/similarity.png``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from analysis import cli, output
from analysis.cli import UsageError
from steering import readout
from steering import vectors as sv


def register(subparsers: argparse._SubParsersAction) -> None:
    p = cli.add_command(subparsers, "similarity", main, __doc__, help="cosine-similarity matrix between steering "
                        "vectors (DiffMean behaviour vectors, RL checkpoints), heatmap")
    p.add_argument("--vectors", nargs="+", required=True, metavar="[NAME=]DIR",
                   help="steering checkpoints, or directories of them (e.g. a `diffmean` output)")
    p.add_argument("--layer", type=int, default=None, help="show this layer (default: every shared layer)")
    p.add_argument("--out", required=True, metavar="DIR")


def expand(items: Sequence[str]) -> list[tuple[str, Path]]:
    """``[(name, checkpoint dir)]`` from ``[NAME=]DIR`` items (directories of checkpoints expand)."""
    out: list[tuple[str, Path]] = []
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        p = Path(path)
        if not p.is_dir():
            raise UsageError(f"--vectors {item}: no such directory")
        if sv.is_checkpoint(p):
            out.append((name or p.name, p))
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and sv.is_checkpoint(d))
        if not subs:
            raise UsageError(f"--vectors {item}: neither a steering checkpoint nor a directory of them")
        out += [(f"{name}/{d.name}" if name else d.name, d) for d in subs]
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--vectors: duplicate names {dup}; name them NAME=DIR")
    if len(out) < 2:
        raise UsageError("--vectors: give at least two checkpoints to compare")
    return out


def _cosines(vectors: Sequence[torch.Tensor]) -> list[list[float | None]]:
    """The cosine matrix as result-file rows: null where a vector is zero (``steering.readout.cosine_matrix``)."""
    return readout.none_for_nan(readout.cosine_matrix(vectors))


def similarity(named: Mapping[str, Mapping[int, torch.Tensor]], layer: int | None = None) -> dict[str, Any]:
    names = list(named)
    sizes = {n: {int(v.numel()) for v in vecs.values()} for n, vecs in named.items()}
    all_sizes = set().union(*sizes.values())
    if len(all_sizes) != 1:
        raise UsageError(f"the checkpoints have different hidden sizes: {sizes}")
    common = sorted(set.intersection(*(set(v) for v in named.values())))
    if not common:
        raise UsageError("the checkpoints share no layer: " + "; ".join(f"{n}: {sorted(v)}" for n, v in named.items()))
    if layer is not None and layer not in common:
        raise UsageError(f"--layer {layer}: not shared by all checkpoints (shared layers: {common})")
    per_layer = {str(layer_): _cosines([named[n][layer_] for n in names]) for layer_ in common}
    concat = _cosines([torch.cat([named[n][layer_].reshape(-1) for layer_ in common]) for n in names])
    return {"names": names, "layers": common, "per_layer": per_layer, "concatenated": concat,
            "norms": {n: {str(layer_): float(named[n][layer_].norm()) for layer_ in common} for n in names},
            "layer": layer}


def _heat(ax, mat, names, title, ylabels=True):
    import numpy as np

    mat = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=float)  # null: drawn blank
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels(names if ylabels else [], fontsize=7)
    if len(names) <= 8:
        for i, row in enumerate(mat):
            for j, v in enumerate(row):
                ax.text(j, i, "nan" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    return im


def plot(result: Mapping[str, Any], path: Path) -> Path:
    from analysis import plots

    names = result["names"]
    if result["layer"] is not None:
        panels = [(f"layer {result['layer']}", result["per_layer"][str(result["layer"])])]
    else:
        panels = [(f"layer {layer}", result["per_layer"][str(layer)]) for layer in result["layers"]]
        if len(panels) > 1:
            panels.append(("all shared layers (concatenated)", result["concatenated"]))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    size = 2.2 + 0.35 * len(names)
    fig, axes = plots.plt.subplots(rows, cols, figsize=(size * cols + 1.5, size * rows + 1), squeeze=False,
                             layout="constrained")
    im = None
    for i, (ax, (title, mat)) in enumerate(zip(axes.flat, panels)):
        im = _heat(ax, mat, names, title, ylabels=i % cols == 0)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="cosine")
    return plots.save(fig, path)


def main(args: argparse.Namespace) -> int:
    items = expand(args.vectors)
    named: dict[str, dict[int, torch.Tensor]] = {}
    for name, path in items:
        named[name] = cli.checkpoint_vectors(path)
    result = similarity(named, args.layer)
    result["paths"] = {n: str(p) for n, p in items}
    out = output.prepare_out(args.out, inputs=[p for _, p in items])
    result["plot"] = str(plot(result, out / "similarity.png"))
    return output.finish(out, result)
