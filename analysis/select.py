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
step. Writes ``OUT/select.json`` (``OUT`` defaults to ``RUN``), with ``--val`` / ``--benchmarks`` the evaluations under
``OUT/select-val/`` / ``OUT/select-test/``; these three are all it replaces in ``OUT`` (the new ones only once the
command is done; an earlier run's that this one does not write are removed). It prints::

    validation-selected: checkpoint-X (val a, test b); test-best (as the reference code picks, optimistic): checkpoint-Y (test c)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis import cli, output, settings, table
from analysis.cli import UsageError
from steering.vectors import CheckpointError

ENTRIES = ("select.json", "select-val", "select-test")  # what select writes into OUT; nothing else there is its


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
    settings.check(args)
    run_dir = Path(args.run)
    checkpoints = _run_checkpoints(run_dir, args.run, args.benchmarks, args.test_results)
    paths = {d.name: d for _, d in checkpoints}
    steps = {d.name: s for s, d in checkpoints}

    # ---- check everything before any model loads
    val_benches = _validation_benchmarks(args) if args.val else None
    test_benches = cli.load_benchmarks(args.benchmarks, args) if args.benchmarks else None
    test_results = _read_test_results(args.test_results) if args.test_results else None
    if val_benches is None:
        val_scores, val_source = _logged_val_scores(_metrics_file(run_dir, args.metrics), args.val_key, steps)
        candidates = [n for n in paths if n in val_scores]
    else:
        candidates = list(paths)
    rows, template = [], None
    if val_benches is not None or test_benches is not None:
        rows, template = _candidate_rows(candidates, paths, args.model, args.template)
    # Only select's own entries of OUT are replaced: OUT defaults to the run directory, whose checkpoints it holds.
    out = output.prepare_entries(args.out or run_dir, ENTRIES, inputs=[args.test_results, args.metrics])

    # ---- evaluate what needs evaluating
    if val_benches is not None:
        val_scores, val_source = _evaluated_scores(rows, val_benches, args, template, out / "select-val")
    test_scores: dict[str, float] = {}
    test_source: dict[str, Any] | None = None
    if test_benches is not None:
        test_scores, test_source = _evaluated_scores(rows, test_benches, args, template, out / "select-test")
    elif test_results is not None:
        test_scores, test_source = _read_test_scores(test_results, args.test_results,
                                                     {n: paths[n] for n in candidates})

    # ---- choose, write
    selected = pick_best(val_scores, candidates)
    test_best = pick_best(test_scores, candidates) if test_scores else None
    scores = _Scores(paths, steps, val_scores, test_scores)
    output.write_json(out / "select.json", {
        "run": str(run_dir.resolve()),
        "criterion": "highest validation accuracy; ties -> earliest step",
        "val_source": val_source,
        "test_source": test_source,
        "validation_selected": scores.entry(selected),
        "test_best": scores.entry(test_best),
        "test_best_minus_selected": scores.test_gap(test_best, selected),
        "candidates": [scores.entry(n) for n in candidates],
        "note": "Report validation_selected. test_best is chosen on the test benchmarks themselves (what the reference "
                "code does) and is optimistic.",
    })
    print(_summary_line(selected, test_best, val_scores, test_scores if test_source is not None else None))
    print(f"wrote {output.complete(out) / 'select.json'}")
    return 0


def _run_checkpoints(run_dir: Path, run_arg: str, benchmarks: list[str] | None,
                     test_results: str | None) -> list[tuple[int, Path]]:
    """The run's complete checkpoints, by step (a usage error if there are none, or if both test sources are given)."""
    if not run_dir.is_dir():
        raise UsageError(f"--run {run_arg}: no such directory")
    if benchmarks and test_results:
        raise UsageError("give --benchmarks or --test-results, not both")
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        raise UsageError(f"--run {run_arg}: no complete checkpoint-<step>/ directories")
    return checkpoints


def _validation_benchmarks(args: argparse.Namespace) -> list[Any]:
    """The ``--val`` benchmarks, checked to be held out from the ``--benchmarks`` test sets."""
    from steering.problems import expand_specs, split_label

    try:
        val_specs = {split_label(s)[1] for s in expand_specs(args.val)}
        test_specs = {split_label(s)[1] for s in expand_specs(args.benchmarks)} if args.benchmarks else set()
    except ValueError as e:
        raise UsageError(str(e)) from None
    overlap = val_specs & test_specs
    if overlap:
        raise UsageError(f"--val and --benchmarks share {sorted(overlap)}: validation must be held out from the "
                         "test benchmarks")
    return cli.load_benchmarks(args.val, args)


def _read_test_results(path: str) -> dict[str, Any]:
    """An evaluate results.json (``--test-results``); a usage error if it is missing or not one."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--test-results {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--test-results {path}: not a readable results.json ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise UsageError(f"--test-results {path}: not an evaluate results.json (no 'rows')")
    return results


def _logged_val_scores(metrics: Path, key: str, steps: dict[str, int]) -> tuple[dict[str, float], dict[str, Any]]:
    """``({checkpoint: val accuracy}, val_source)`` from the metrics file; checkpoints without a logged value are
    named on stderr (they are no candidates)."""
    if not metrics.is_file():
        raise UsageError(f"{metrics}: no such file; evaluate the checkpoints on a validation set with --val SPEC")
    try:
        by_step, bad = read_val_metrics(metrics, key)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{metrics}: cannot read ({e})") from None
    val_scores = {n: by_step[s] for n, s in steps.items() if s in by_step}
    if not val_scores:
        raise UsageError(f"{metrics}: no {key!r} logged at any checkpoint step {sorted(steps.values())} "
                         f"(logged at steps {sorted(by_step)[:20]}); evaluate them with --val SPEC")
    skipped = [n for n in steps if n not in val_scores]
    if skipped:
        print(f"select: no validation accuracy logged for {skipped}; they are not candidates", file=sys.stderr)
    return val_scores, {"kind": "metrics", "path": str(metrics.resolve()), "key": key, "skipped_lines": bad}


def _candidate_rows(candidates: list[str], paths: dict[str, Path], model: str | None,
                    template_name: str | None) -> tuple[list[table.RowSpec], Any]:
    """One evaluate row per candidate checkpoint (labelled by its name) and the prompt template; checked loadable."""
    rows = table.build_rows([f"{n}={paths[n]}" for n in candidates], [], model, False, False)
    for r, n in zip(rows, candidates):
        r.role = "other"
        r.label = n
    template = cli.resolve_template(template_name, [str(paths[n]) for n in candidates])
    table.check_loadable(rows, template)
    return rows, template


def _evaluated_scores(rows: list[table.RowSpec], benches: list[Any], args: argparse.Namespace, template: Any,
                      out: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """``({checkpoint: Avg accuracy}, source)``: every candidate evaluated on ``benches``, results under ``out``."""
    from analysis.evaluate import evaluate_rows

    out.mkdir()  # in select's staging directory, which is new
    res = evaluate_rows(rows, benches, args, template, out)
    return ({r["label"]: r["avg"]["mean"] for r in res["rows"]},
            {"kind": "evaluated", "benchmarks": [b["name"] for b in res["benchmarks"]],
             "results": str(output.final(out / "results.json").resolve())})


def _read_test_scores(results: dict[str, Any], path: str,
                      candidates: dict[str, Path]) -> tuple[dict[str, float], dict[str, Any]]:
    """``({checkpoint: test Avg}, source)`` from an evaluate results.json (no matching row: said on stderr)."""
    scores = _match_results(results, candidates)
    source = {"kind": "results", "path": str(Path(path).resolve()),
              "benchmarks": [b.get("name") for b in results.get("benchmarks", [])]}
    if not scores:
        print(f"select: {path} has no row for any candidate checkpoint", file=sys.stderr)
    return scores, source


@dataclass
class _Scores:
    """Every checkpoint's path, step and scores, as select.json reports them."""

    paths: dict[str, Path]
    steps: dict[str, int]
    val: dict[str, float]
    test: dict[str, float]

    def entry(self, name: str | None) -> dict[str, Any] | None:
        if name is None:
            return None
        return {"checkpoint": name, "path": str(self.paths[name].resolve()), "step": self.steps[name],
                "val_accuracy": self.val.get(name), "test_accuracy": self.test.get(name)}

    def test_gap(self, test_best: str | None, selected: str | None) -> float | None:
        """How much the test-best checkpoint's test score exceeds the validation-selected one's."""
        if test_best is None or selected not in self.test:
            return None
        return self.test[test_best] - self.test[selected]


def _summary_line(selected: str | None, test_best: str | None, val_scores: dict[str, float],
                  test_scores: dict[str, float] | None) -> str:
    """The line select prints; ``test_scores`` None: no test source was given."""
    line = f"validation-selected: {selected} (val {_pct(val_scores.get(selected))}"
    if test_scores is None:
        return line + ")"
    line += f", test {_pct(test_scores.get(selected))})"
    return line + ((f"; test-best (as the reference code picks, optimistic): {test_best} "
                    f"(test {_pct(test_scores.get(test_best))})") if test_best else "; test-best: n/a")
