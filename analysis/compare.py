"""``python -m analysis compare``: paired differences between evaluation runs written at different times.

Two ``evaluate`` runs (two checkpoints of a run, two sets of seeds, a model evaluated last month and today) are
compared on the problems they share, with the statistics ``evaluate`` gives its own rows (``steering.statistics``):
per benchmark and on the Avg, the difference, its paired bootstrap interval over problems, the sign-flip test's
p-value and the smallest difference a paired test detects there::

    python -m analysis compare eval/ckpt-100 eval/ckpt-200 --out eval/ckpt-100-vs-200
    python -m analysis compare old=eval/jan/results.json new=eval/feb/results.json \\
        --pair new/Steering old/Steering --out eval/jan-vs-feb

Each input is an ``evaluate`` ``results.json`` or its directory, optionally named ``NAME=PATH`` (default name: the
directory's name); its rows are ``NAME/LABEL``. By default each row of every later run is compared with the row of
the first run that has the same label (or, when both runs have one row, with that row); ``--pair A B`` names pairs
(``A`` or ``B`` may be just ``NAME`` when that run has one row). Problems are matched by content (question and
answer), benchmarks by name. Runs are comparable only when the settings that decide a verdict agree (template,
answer format, temperature, top-p, top-k, max tokens or max length, grading options, reward); otherwise the command
stops with exit code 2 naming the difference. Writes ``OUT/result.json`` and ``OUT/differences.png`` (a forest
plot: each pair's difference and interval per benchmark).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis import cli, output, plots, settings
from analysis.cli import UsageError
from analysis.table import benchmark_scores, forest_groups, render_differences, render_pair_detectable
from steering import statistics as stats

# The settings that decide what a verdict means: a run-level key, or a row's sampling key.
RUN_SETTINGS = ("template", "answer_format", "max_length", "reward_style", "grading_options")
ROW_SETTINGS = ("temperature", "top_p", "top_k", "max_new_tokens")


def read_run(item: str) -> dict[str, Any]:
    """``{"name", "path", "results"}`` of a ``[NAME=]PATH`` argument, checked to be an evaluate results.json with
    per-problem counts."""
    name, sep, path_text = item.partition("=")
    if not sep or Path(item).exists():
        name, path_text = "", item
    path = Path(path_text)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"{item}: no such file (give an evaluate results.json or its directory)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"{path}: not a readable results.json ({e})") from None
    if not isinstance(results, dict) or not all(isinstance(results.get(k), t) for k, t in
                                                (("rows", list), ("benchmarks", list), ("settings", dict))):
        raise UsageError(f"{path}: not an evaluate results.json (needs rows, benchmarks and settings)")
    if not all("problem_keys" in b for b in results["benchmarks"]):
        raise UsageError(f"{path}: has no per-problem records (written before they were kept); evaluate again")
    return {"name": name or path.parent.resolve().name, "path": str(path.resolve()), "results": results}


def _rows(runs: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """``{"NAME/LABEL": (run, row)}``."""
    return {f"{run['name']}/{row['label']}": (run, row) for run in runs for row in run["results"]["rows"]}


def run_pairs(runs: Sequence[Mapping[str, Any]], named: Sequence[Sequence[str]] | None) -> list[tuple[str, str]]:
    """The pairs of ``NAME/LABEL`` rows to compare: ``named`` (a bare ``NAME`` stands for that run's only row), or
    each row of a later run against the first run's row of the same label (or its only row)."""
    rows = _rows(runs)
    only = {run["name"]: f"{run['name']}/{run['results']['rows'][0]['label']}" for run in runs
            if len(run["results"]["rows"]) == 1}

    def find(name: str) -> str:
        if name in rows or name in only:
            return only.get(name, name)
        raise UsageError(f"--pair: no row {name!r}; the rows are {sorted(rows)}")

    if named:
        return [(find(a), find(b)) for a, b in named]
    first, pairs = runs[0], []
    labels = {row["label"] for row in first["results"]["rows"]}
    for run in runs[1:]:
        for row in run["results"]["rows"]:
            if row["label"] in labels:
                pairs.append((f"{run['name']}/{row['label']}", f"{first['name']}/{row['label']}"))
        if not any(p[0].startswith(f"{run['name']}/") for p in pairs) and run["name"] in only and first["name"] in only:
            pairs.append((only[run["name"]], only[first["name"]]))
    if not pairs:
        raise UsageError(f"no row of the later runs has the label of a row of {first['name']}; name the rows to "
                         f"compare with --pair A B (the rows are {sorted(rows)})")
    return pairs


def _settings(run: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    s = run["results"]["settings"]
    sampling = row.get("sampling") or s.get("sampling") or {}
    out = {key: s.get(key) for key in RUN_SETTINGS}
    out.update({key: sampling.get(key) for key in ROW_SETTINGS})
    if out["max_length"] is not None:  # a max length overrides max new tokens
        out.pop("max_new_tokens")
    return out


def check_comparable(a: str, b: str, rows: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
    """UsageError naming every setting that differs between rows ``a`` and ``b``."""
    sa, sb = _settings(*rows[a]), _settings(*rows[b])
    differ = [f"{key} {sa.get(key)!r} vs {sb.get(key)!r}" for key in sorted(set(sa) | set(sb))
              if sa.get(key) != sb.get(key)]
    if differ:
        raise UsageError(f"{a} and {b} are not comparable: {'; '.join(differ)}")


def shared_scores(a: tuple[Mapping[str, Any], Mapping[str, Any]], b: tuple[Mapping[str, Any], Mapping[str, Any]]):
    """``(scores_a, scores_b, shared)``: per benchmark both rows have, their per-problem scores on the problems both
    runs evaluated (in ``a``'s order), and how many problems each had and shared."""
    keys = [{bench["name"]: bench["problem_keys"] for bench in run["results"]["benchmarks"]} for run in (a[0], b[0])]
    try:
        scores = [benchmark_scores(row) for _, row in (a, b)]
    except ValueError as e:
        raise UsageError(str(e)) from None
    out_a, out_b, shared = {}, {}, {}
    for name in (n for n in scores[0] if n in scores[1]):
        where_b = {key: i for i, key in enumerate(keys[1][name])}
        pos = [(i, where_b[key]) for i, key in enumerate(keys[0][name]) if key in where_b]
        shared[name] = {"a": len(keys[0][name]), "b": len(keys[1][name]), "shared": len(pos)}
        if pos:
            ia, ib = (np.array(p) for p in zip(*pos))
            out_a[name], out_b[name] = scores[0][name][ia], scores[1][name][ib]
    return out_a, out_b, shared


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "compare", run, __doc__,
                        help="paired differences between evaluate runs (intervals, p-values, detectable differences)")
    p.add_argument("results", nargs="+", metavar="[NAME=]RESULTS",
                   help="two or more evaluate results.json files (or their directories); NAME defaults to the "
                        "directory's name")
    p.add_argument("--pair", nargs=2, action="append", default=None, metavar=("A", "B"),
                   help="difference A − B to report (repeatable): rows as NAME/LABEL, or NAME for a run with one "
                        "row; default: each row of a later run against the first run's row of the same label")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (result.json, differences.png)")
    settings.add_statistics_arguments(p)


def run(args: argparse.Namespace) -> int:
    settings.check_statistics(args)
    if len(args.results) < 2:
        raise UsageError("give at least two results to compare")
    runs = [read_run(item) for item in args.results]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"two inputs are named alike ({names}); name them with NAME=PATH")
    rows = _rows(runs)
    pairs = run_pairs(runs, args.pair)
    inputs = []
    for a, b in pairs:
        check_comparable(a, b, rows)
        scores_a, scores_b, shared = shared_scores(rows[a], rows[b])
        if not scores_a:
            raise UsageError(f"{a} and {b} share no problem (benchmarks {sorted(shared) or 'none in common'})")
        inputs.append((a, b, scores_a, scores_b, shared))
    out = output.prepare_out(args.out, inputs=[r["path"] for r in runs])
    differences = [_difference(a, b, sa, sb, shared, args) for a, b, sa, sb, shared in inputs]
    result = {"inputs": [{"name": r["name"], "path": r["path"],
                          "rows": [row["label"] for row in r["results"]["rows"]]} for r in runs],
              "settings": {"statistics": {"confidence": stats.CONFIDENCE, "resamples": args.resamples,
                                          "seed": args.stats_seed, "alpha": stats.ALPHA, "power": stats.POWER,
                                          "pairs": [list(p) for p in pairs]},
                           "compared": {name: _settings(*rows[name]) for pair in pairs for name in pair}},
              "differences": differences}
    result["table"] = render_differences(result)
    plots.forest_plot(out / "differences.png", forest_groups(differences),
                      title="Paired differences between runs (points), 95 % intervals", xlabel="A − B (points)")
    print(result["table"] + render_pair_detectable(differences))
    return output.finish(out, result, f"wrote {out / 'differences.png'}")


def _difference(a: str, b: str, scores_a: Mapping[str, np.ndarray], scores_b: Mapping[str, np.ndarray],
                shared: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    boot = stats.Bootstrap({name: s.size for name, s in scores_a.items()}, args.resamples, args.stats_seed)
    return {"a": a, "b": b, **stats.paired_difference(scores_a, scores_b, boot), "problems": dict(shared)}
