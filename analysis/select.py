"""``python -m analysis select``: pick a run's checkpoint on held-out validation data, never on the test benchmarks.

The reference code picks each run's best checkpoint by its score on the test benchmarks themselves, which is
optimistic. This command picks by validation accuracy, and (when test scores are available) reports that choice next
to the test-best one, so the gap is visible::

    python -m analysis select --run runs/steer                              # val accuracy from the metrics file
    python -m analysis select --run runs/steer --val procedural:mixed:200   # evaluate every checkpoint on a val set
    python -m analysis select --run runs/steer --benchmarks six --seeds 0 1 2     # also evaluate them on test sets
    python -m analysis select --run runs/steer --test-results eval/results.json   # or read an evaluate run

Validation accuracy comes from the run's metrics file (the config's ``metrics_file``, which the run records in
``RUN/run.json``; or ``--metrics``): lines with ``eval_accuracy`` at a ``step`` (the key is ``--val-key``), matched to
the ``RUN/checkpoint-<step>/`` directories; or from evaluating every checkpoint on ``--val``. Ties go to the earliest
step. Writes ``OUT/select.json`` (``OUT`` defaults to ``RUN``) and prints::

    validation-selected: checkpoint-X (val a, test b); test-best (as the reference code picks, optimistic): checkpoint-Y (test c)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from analysis import cli, output, settings, table
from analysis.cli import UsageError
from steering.vectors import CheckpointError


def find_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``[(step, dir)]`` of the complete ``checkpoint-<step>`` directories of a run (those whose save finished, see
    ``train.checkpointing``), by step."""
    from train.checkpointing import checkpoint_step, run_checkpoints

    return [(checkpoint_step(d), d) for d in run_checkpoints(run)]


def read_val_metrics(path: Path, key: str = "eval_accuracy") -> tuple[dict[int, float], int]:
    """``({step: value}, bad_lines)`` from a run's metrics file (read by ``train.checkpointing.read_metrics``); the
    last value logged at a step wins. Unreadable lines (e.g. the one a running trainer is writing) and non-numeric
    values are counted, not fatal."""
    from train.checkpointing import read_metrics

    rows, bad = read_metrics(path)
    values: dict[int, float] = {}
    for rec in rows:
        if rec.get(key) is None or "step" not in rec:
            continue
        try:
            step, value = int(rec["step"]), float(rec[key])
        except (TypeError, ValueError):
            bad += 1
            continue
        if math.isfinite(value):
            values[step] = value
    return values, bad


def _metrics_file(run_dir: Path, given: str | None) -> Path:
    """``--metrics``, else the metrics file the run recorded (``train.checkpointing.metrics_path``)."""
    from train.checkpointing import metrics_path

    if given:
        return Path(given)
    try:
        return metrics_path(run_dir)
    except CheckpointError as e:
        raise UsageError(f"{e}; give the metrics file with --metrics FILE") from None


def pick_best(scores: dict[str, float], order: list[str]) -> str | None:
    """Highest score; ties go to the earliest in ``order``."""
    best = None
    for name in order:
        if name in scores and (best is None or scores[name] > scores[best]):
            best = name
    return best


def _match_results(results: dict[str, Any], candidates: dict[str, Path]) -> dict[str, float]:
    """Test Avg per checkpoint name from an evaluate results.json: rows matched by path, else by label."""
    by_path = {str(p.resolve()): name for name, p in candidates.items()}
    out: dict[str, float] = {}
    for row in results.get("rows", []):
        avg = (row.get("avg") or {}).get("mean")
        if avg is None:
            continue
        name = None
        if row.get("path"):
            name = by_path.get(str(Path(row["path"]).resolve()))
        if name is None and row.get("label") in candidates:
            name = row["label"]
        if name is not None:
            out[name] = float(avg)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "select", run, __doc__,
                        help="pick a run's checkpoint by validation accuracy; report it next to the test-best one")
    p.add_argument("--run", required=True, metavar="DIR", help="training run directory (checkpoint-<step>/ dirs)")
    p.add_argument("--metrics", default=None, metavar="FILE",
                   help="metrics file (default: the one the run recorded in RUN/run.json)")
    p.add_argument("--val-key", default="eval_accuracy", help="validation accuracy key in the metrics file (default eval_accuracy)")
    p.add_argument("--val", nargs="+", default=None, metavar="SPEC",
                   help="evaluate every checkpoint on this validation benchmark instead of reading the metrics file")
    p.add_argument("--benchmarks", nargs="+", default=None, metavar="SPEC",
                   help="test benchmarks to score the candidates on (as in evaluate)")
    p.add_argument("--test-results", default=None, metavar="FILE",
                   help="an evaluate results.json holding the candidates' test scores (rows matched by path or label)")
    p.add_argument("--model", default=None, metavar="BASE", help="base model (default: recorded in the checkpoints)")
    p.add_argument("--out", default=None, metavar="DIR", help="where select.json goes (default: RUN)")
    settings.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from analysis.evaluate import evaluate_rows
    from steering.problems import expand_specs, split_label

    settings.check(args)
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UsageError(f"--run {args.run}: no such directory")
    if args.benchmarks and args.test_results:
        raise UsageError("give --benchmarks or --test-results, not both")
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        raise UsageError(f"--run {args.run}: no complete checkpoint-<step>/ directories")
    names = [d.name for _, d in ckpts]
    paths = {d.name: d for _, d in ckpts}
    steps = {d.name: s for s, d in ckpts}

    # ---- check everything before any model loads
    val_benches = test_benches = None
    test_results = None
    if args.val:
        try:
            val_specs = {split_label(s)[1] for s in expand_specs(args.val)}
            test_specs = {split_label(s)[1] for s in expand_specs(args.benchmarks)} if args.benchmarks else set()
        except ValueError as e:
            raise UsageError(str(e)) from None
        overlap = val_specs & test_specs
        if overlap:
            raise UsageError(f"--val and --benchmarks share {sorted(overlap)}: validation must be held out from the "
                             "test benchmarks")
        val_benches = cli.load_benchmarks(args.val, args)
    if args.benchmarks:
        test_benches = cli.load_benchmarks(args.benchmarks, args)
    if args.test_results:
        try:
            test_results = json.loads(Path(args.test_results).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"--test-results {args.test_results}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise UsageError(f"--test-results {args.test_results}: not a readable results.json ({e})") from None
        if not isinstance(test_results, dict) or not isinstance(test_results.get("rows"), list):
            raise UsageError(f"--test-results {args.test_results}: not an evaluate results.json (no 'rows')")

    val_scores: dict[str, float] = {}
    val_source: dict[str, Any]
    if val_benches is None:
        metrics = _metrics_file(run_dir, args.metrics)
        if not metrics.is_file():
            raise UsageError(f"{metrics}: no such file; evaluate the checkpoints on a validation set with --val SPEC")
        try:
            by_step, bad = read_val_metrics(metrics, args.val_key)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{metrics}: cannot read ({e})") from None
        val_scores = {n: by_step[steps[n]] for n in names if steps[n] in by_step}
        if not val_scores:
            raise UsageError(f"{metrics}: no {args.val_key!r} logged at any checkpoint step {sorted(steps.values())} "
                             f"(logged at steps {sorted(by_step)[:20]}); evaluate them with --val SPEC")
        val_source = {"kind": "metrics", "path": str(metrics.resolve()), "key": args.val_key,
                      "skipped_lines": bad}
        candidates = [n for n in names if n in val_scores]
        skipped = [n for n in names if n not in val_scores]
        if skipped:
            print(f"select: no validation accuracy logged for {skipped}; they are not candidates", file=sys.stderr)
    else:
        candidates = list(names)

    rows: list[table.RowSpec] = []
    template = None
    if val_benches is not None or test_benches is not None:
        rows = table.build_rows([f"{n}={paths[n]}" for n in candidates], [], args.model, False, False)
        for r, n in zip(rows, candidates):
            r.role = "other"
            r.label = n
        template = cli.resolve_template(args.template, [str(paths[n]) for n in candidates])
        table.check_loadable(rows)
    out = output.prepare_out(args.out or run_dir)

    # ---- evaluate what needs evaluating
    if val_benches is not None:
        res = evaluate_rows(rows, val_benches, args, template, output.prepare_out(out / "select-val"))
        val_scores = {r["label"]: r["avg"]["mean"] for r in res["rows"]}
        val_source = {"kind": "evaluated", "benchmarks": [b["name"] for b in res["benchmarks"]],
                      "results": str((out / "select-val" / "results.json").resolve())}
    test_scores: dict[str, float] = {}
    test_source: dict[str, Any] | None = None
    if test_benches is not None:
        res = evaluate_rows(rows, test_benches, args, template, output.prepare_out(out / "select-test"))
        test_scores = {r["label"]: r["avg"]["mean"] for r in res["rows"]}
        test_source = {"kind": "evaluated", "benchmarks": [b["name"] for b in res["benchmarks"]],
                       "results": str((out / "select-test" / "results.json").resolve())}
    elif test_results is not None:
        test_scores = _match_results(test_results, {n: paths[n] for n in candidates})
        test_source = {"kind": "results", "path": str(Path(args.test_results).resolve()),
                       "benchmarks": [b.get("name") for b in test_results.get("benchmarks", [])]}
        if not test_scores:
            print(f"select: {args.test_results} has no row for any candidate checkpoint", file=sys.stderr)

    # ---- choose
    selected = pick_best(val_scores, candidates)
    test_best = pick_best(test_scores, candidates) if test_scores else None

    def entry(n: str | None) -> dict[str, Any] | None:
        if n is None:
            return None
        return {"checkpoint": n, "path": str(paths[n].resolve()), "step": steps[n],
                "val_accuracy": val_scores.get(n), "test_accuracy": test_scores.get(n)}

    gap = None
    if test_best is not None and selected in test_scores:
        gap = test_scores[test_best] - test_scores[selected]
    report = {
        "run": str(run_dir.resolve()),
        "criterion": "highest validation accuracy; ties -> earliest step",
        "val_source": val_source,
        "test_source": test_source,
        "validation_selected": entry(selected),
        "test_best": entry(test_best),
        "test_best_minus_selected": gap,
        "candidates": [entry(n) for n in candidates],
        "note": "Report validation_selected. test_best is chosen on the test benchmarks themselves (what the reference "
                "code does) and is optimistic.",
    }
    output.write_json(out / "select.json", report)
    line = f"validation-selected: {selected} (val {_pct(val_scores.get(selected))}"
    if test_source is not None:
        line += f", test {_pct(test_scores.get(selected))})"
        line += (f"; test-best (as the reference code picks, optimistic): {test_best} "
                 f"(test {_pct(test_scores.get(test_best))})") if test_best else "; test-best: n/a"
    else:
        line += ")"
    print(line)
    print(f"wrote {out / 'select.json'}")
    return 0
