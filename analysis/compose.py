"""``python -m analysis compose``: do single-layer vectors, trained in isolation, combine?

Evaluate the unsteered base, the all-layer checkpoint (``--checkpoint``), each single-layer vector alone, and every
pair of them together (both vectors on at once, each at its own layer). For a pair (i, j)::

    score(i, j) = (acc(i+j) − max(acc(i), acc(j))) / (acc(all) − max(acc(i), acc(j)))

1 = the pair reaches all-layer steering, 0 = no better than its better half, < 0 = worse (null when the denominator is
0). Single-layer vectors come from ``--singles`` (checkpoint directories with one steered layer each, e.g. the runs of
``layer-ablation``; or the runs.json that ``layer-ablation make`` wrote). Without ``--singles``, each layer's vector of
the all-layer checkpoint is used alone (then the vectors were *not* trained in isolation: ``"isolated": false``).
Every accuracy comes from ``analysis.evaluate`` with the evaluation arguments below (default T = 1; ``--temperature
0`` for greedy).

result.json::

    {"command": "compose", "checkpoint", "base_model", "isolated": bool, "layers": [...],
     "base_accuracy", "all_layer_accuracy",
     "singles": [{"layer", "source", "accuracy"}],
     "pairs": [{"layers": [i, j], "accuracy", "max_single", "score"}],
     "score_matrix": [[...]], "pair_accuracy_matrix": [[...]],      # over layers x layers, null on the diagonal
     "detail": {label: per-benchmark accuracies}, "settings", "plots"}

Plots: ``score.png`` (the score heatmap), ``pair_accuracy.png``, ``singles.png`` (each single against base and
all-layer).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from analysis import _common
from analysis import cli, output, plots, settings
from analysis.cli import UsageError
from analysis.table import relative_improvement


def composition_score(pair: float | None, single_i: float | None, single_j: float | None,
                      all_layers: float | None) -> float | None:
    """(pair − max single) / (all-layer − max single); None if undefined."""
    if single_i is None or single_j is None:
        return None
    return relative_improvement(pair, max(single_i, single_j), all_layers, scale=1.0)


def expand_singles(items: list[str]) -> list[str]:
    """Checkpoint dirs from ``--singles`` items: checkpoint dirs, run dirs (their final checkpoint), or a
    layer-ablation runs.json."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix == ".json":
            try:
                runs = json.loads(p.read_text())["runs"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"--singles {item}: not a runs.json of layer-ablation make") from None
            for run in runs:
                ck = cli.final_checkpoint(Path(run["output_dir"]))
                if ck is None:
                    raise UsageError(f"--singles {item}: run {run['output_dir']} has no complete checkpoint yet")
                out.append(str(ck))
        elif p.is_dir():
            ck = cli.final_checkpoint(p)
            if ck is None:
                raise UsageError(f"--singles {item}: not a steering checkpoint, nor a run directory with one")
            out.append(str(ck))
        else:
            raise UsageError(f"--singles {item}: no such directory or runs.json")
    return out


def single_vectors(paths: list[str], model: Any) -> dict[int, tuple[torch.Tensor, str]]:
    """``{layer: (vector, path)}`` of the single-layer checkpoints, checked to fit ``model`` (a model or, before any
    weights load, its config)."""
    out: dict[int, tuple[torch.Tensor, str]] = {}
    for path in paths:
        vecs = cli.checkpoint_vectors(path, model)
        if len(vecs) != 1:
            raise UsageError(f"--singles {path}: steers layers {sorted(vecs)}; a single-layer checkpoint steers one")
        (layer, vec), = vecs.items()
        if layer in out:
            raise UsageError(f"--singles: two checkpoints steer layer {layer} ({out[layer][1]} and {path})")
        out[layer] = (vec, path)
    return dict(sorted(out.items()))


def checked_singles(args: argparse.Namespace, paths: list[str] | None, checked: cli.CheckedCheckpoint
                    ) -> dict[int, tuple[torch.Tensor, str]]:
    """The single-layer vectors to compose (``--singles``, else the checkpoint's own, one at a time), those of
    ``--layers`` only; at least two."""
    if paths is not None:
        singles = single_vectors(paths, checked.config)
    else:
        singles = {layer: (v, f"{args.checkpoint} (layer {layer} alone)") for layer, v in checked.vectors.items()}
    if args.layers:
        wanted = cli.parse_layers(args.layers, checked.num_layers)
        missing = [layer for layer in wanted if layer not in singles]
        if missing:
            raise UsageError(f"--layers {args.layers}: no single-layer vector for layers {missing} "
                             f"(have {sorted(singles)})")
        singles = {layer: singles[layer] for layer in wanted}
    if len(singles) < 2:
        raise UsageError(f"need at least two single-layer vectors to form pairs, have {sorted(singles)}")
    return singles


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "compose", run, __doc__, help="evaluate pairs of single-layer "
                                   "vectors together: (pair − max single) / (all − max single)")
    p.add_argument("--singles", nargs="+", default=None, metavar="DIR",
                   help="single-layer checkpoints (dirs, run dirs, or layer-ablation runs.json); default: the "
                        "all-layer checkpoint's own vectors, one at a time")
    p.add_argument("--layers", default=None, help="only these single layers (and their pairs), e.g. 4,8,12")


def run(args: argparse.Namespace) -> int:
    singles_paths = expand_singles(args.singles) if args.singles else None
    cli.check_args(args)
    # The singles and --layers against the base's config.json: refused before --out is made or any weights load.
    checked = cli.check_checkpoint(args)
    singles = checked_singles(args, singles_paths, checked)
    o = cli.load_checkpoint(args, checked, inputs=singles_paths or ())
    model, tokenizer, benches, all_vectors = o.model, o.tokenizer, o.benches, o.vectors
    layers = sorted(singles)
    pairs = list(itertools.combinations(layers, 2))
    tmpl = cli.template(args)

    jobs: list[tuple[str, dict[int, torch.Tensor]]] = [("base", {}), ("all", all_vectors)]
    jobs += [(f"L{i}", {i: singles[i][0]}) for i in layers]
    jobs += [(f"L{i}+L{j}", {i: singles[i][0], j: singles[j][0]}) for i, j in pairs]
    acc: dict[str, _common.Accuracy] = {}
    for label, vecs in output.progress(jobs, desc="compose", quiet=args.no_progress):
        with _common.use_vectors(model, vecs):
            acc[label] = _common.accuracy(model, tokenizer, benches, settings.from_args(args), tmpl)

    a = {k: v.accuracy for k, v in acc.items()}
    single_rows = [{"layer": i, "source": singles[i][1], "accuracy": a[f"L{i}"]} for i in layers]
    pair_rows = []
    idx = {layer: n for n, layer in enumerate(layers)}
    score_m: list[list[float | None]] = [[None] * len(layers) for _ in layers]
    pair_m: list[list[float | None]] = [[None] * len(layers) for _ in layers]
    for i, j in pairs:
        x = a[f"L{i}+L{j}"]
        score = composition_score(x, a[f"L{i}"], a[f"L{j}"], a["all"])
        pair_rows.append({"layers": [i, j], "accuracy": x, "max_single": max(a[f"L{i}"], a[f"L{j}"]), "score": score})
        for r, c in ((idx[i], idx[j]), (idx[j], idx[i])):
            score_m[r][c] = score
            pair_m[r][c] = x
    files = [plots.heatmap(o.out / "score.png", score_m, layers, layers, cmap="RdBu_r", center=0.0,
                           title="(pair − max single) / (all-layer − max single)", xlabel="layer j",
                           ylabel="layer i").name,
             plots.heatmap(o.out / "pair_accuracy.png", pair_m, layers, layers, cmap="viridis",
                           title="accuracy of the pair", xlabel="layer j", ylabel="layer i").name,
             plots.bar_plot(o.out / "singles.png", [str(i) for i in layers], [a[f"L{i}"] for i in layers],
                            title="single-layer vectors alone", xlabel="layer", ylabel="accuracy",
                            hlines={"base": a["base"], "all layers": a["all"]}).name]
    result = {"command": "compose", "checkpoint": str(args.checkpoint), "base_model": o.base_id,
              "isolated": singles_paths is not None, "layers": layers, "base_accuracy": a["base"],
              "all_layer_accuracy": a["all"], "singles": single_rows, "pairs": pair_rows, "score_matrix": score_m,
              "pair_accuracy_matrix": pair_m, "detail": {k: v.per_benchmark for k, v in acc.items()},
              "settings": settings.record(args), "plots": files}
    return output.finish(o.out, result, f"compose: {len(pairs)} pairs of {len(layers)} layers")
