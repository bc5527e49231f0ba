"""``python -m analysis evaluate``: accuracy of a base model, steering / LoRA / full checkpoints on math benchmarks.

The rows are the unsteered base (``--model`` alone, or ``--include-base``) and the checkpoints (``--checkpoint``,
repeatable: a steering checkpoint, a PEFT adapter dir (LoRA, IA3, ...), or a full model dir), each on every
``--benchmarks`` spec::

    python -m analysis evaluate --model Qwen/Qwen2.5-Math-1.5B --include-base --base-greedy \\
        --checkpoint steering=runs/steer/checkpoint-314 --checkpoint lora=runs/lora/checkpoint-314 \\
        --checkpoint full=runs/full/checkpoint-314 --benchmarks six --seeds 0 1 2 --out eval/qwen-math-1.5b

writes ``OUT/results.json`` (every number, per row, benchmark and seed, with the exact settings, and every problem's
correct count per row, benchmark and seed), ``OUT/table.md`` (the papers' table: rows Base / Steering / LoRA / Full,
one column per benchmark, Avg, Relative and Relative Improvement, mean ± std over seeds and a 95 % interval from a
bootstrap over problems; the smallest difference each benchmark can detect; the paired differences between rows
(``--pair``, default each row against Base and Steering against Full and LoRA) with intervals and sign-flip
p-values), ``OUT/samples.jsonl`` (every completion, its extracted answer and verdict) and ``OUT/differences.png``
(a forest plot of the differences).

The evaluation itself (generate, score, avg@k / pass@k) is ``steering.evaluation``; the benchmarks are
``steering.problems``; the rows (the four kinds of model), the table and the statistics on it are ``analysis.table``
and ``steering.statistics`` (docs/evaluation.md explains the scheme); the arguments are ``analysis.settings`` and
``analysis.cli``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from analysis import cli, output, plots, settings
from analysis.cli import UsageError
from analysis.table import (RowSpec, add_relative, add_statistics, build_rows, check_loadable, check_vllm_rows,
                            forest_groups, load_row_model, render_table, resolve_pairs)
from steering import statistics as stats
from steering.evaluation import (EvalResult, EvalSettings, as_problems, evaluate_model, mean_std, metric_name,
                                 problem_key)


def environment() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "trl", "math_verify", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed / no version attribute
            out[mod] = None
    from steering.vllm_engine import vllm_version

    out["vllm"] = vllm_version()  # from the package metadata: importing vLLM takes seconds
    return out


def evaluate_rows(rows: list[RowSpec], benches: list[Any], args: argparse.Namespace, template: Any,
                  out: Path | None = None, *, pairs: list[tuple[str, str]] | None = None,
                  resamples: int = stats.DEFAULT_RESAMPLES, stats_seed: int = stats.DEFAULT_SEED) -> dict[str, Any]:
    """Evaluate every row on every benchmark; write samples.jsonl / results.json / table.md (and differences.png when
    rows are compared) under ``out`` (if given). ``pairs``: the rows to difference (default
    ``analysis.table.default_pairs``); ``resamples`` / ``stats_seed``: the bootstrap's and the paired test's.
    Returns the results dict (the content of results.json)."""
    from tqdm.auto import tqdm

    device, dtype = cli.device_and_dtype(args)
    evals = settings.from_args(args)
    bench_meta = [_bench_meta(b, evals) for b in benches]
    results: dict[str, Any] = {
        "settings": _settings(args, evals, template, device, dtype, bench_meta),
        "benchmarks": bench_meta,
        "rows": [],
    }
    samples_f = open(out / "samples.jsonl", "w", encoding="utf-8") if out is not None else None
    units = sum(len(benches) * (1 if r.greedy else len(args.seeds)) for r in rows)
    bar = tqdm(total=units, desc="evaluate", unit="run", disable=args.no_progress, file=sys.stderr)
    try:
        for row in rows:
            bar.set_postfix_str(f"loading {row.label}")
            model, tokenizer = load_row_model(row, dtype=dtype, device=device, backend=evals.backend,
                                              vllm_options=evals.vllm_options())
            row_params = evals.sampling_params(greedy=row.greedy)
            seeds = list(evals.seeds[:1]) if row.greedy else list(evals.seeds)
            row_out: dict[str, Any] = {**row.describe(), "seeds": seeds, "sampling": asdict(row_params),
                                       "results": {}}
            for b in benches:
                k = evals.samples_for(b.default_samples, greedy=row.greedy)
                per_seed_results = []
                for seed in seeds:
                    bar.set_postfix_str(f"{row.label} | {b.name} | seed {seed}")
                    res = evaluate_model(model, tokenizer, b.problems, template=template, params=row_params,
                                         num_samples=k, seeds=[seed], batch_size=evals.batch_size,
                                         timeout_s=evals.timeout_s, options=evals.grading, backend=evals.backend,
                                         progress=not args.no_progress, max_length=evals.max_length)
                    per_seed_results.append(res.seeds[0])
                    if samples_f is not None:
                        for rec in res.records():
                            samples_f.write(json.dumps({"row": row.label, "kind": row.kind, "path": row.path,
                                                        "benchmark": b.name, **rec}, ensure_ascii=False) + "\n")
                        samples_f.flush()
                    bar.update(1)
                full = EvalResult(res.problems, k, per_seed_results, res.settings)
                summ = full.summary(args.pass_k)
                summ["metric"] = metric_name(k)
                row_out["results"][b.name] = summ
            per_seed_avg = [sum(row_out["results"][b.name]["per_seed"][i]["accuracy"] for b in benches) / len(benches)
                            for i in range(len(seeds))]
            mean, std = mean_std(per_seed_avg)
            row_out["avg"] = {"mean": mean, "std": std, "per_seed": per_seed_avg}
            results["rows"].append(row_out)
            del model, tokenizer
            gc.collect()
            _empty_cuda_cache()
            add_relative(results["rows"])
            if out is not None:  # partial results after every row: a run killed outright leaves them in its
                # staging directory (analysis.output) until the next run into the same --out
                output.write_json(out / "results.json", results)
    finally:
        bar.close()
        if samples_f is not None:
            samples_f.close()
    add_relative(results["rows"])
    pairs = resolve_pairs(results["rows"], None) if pairs is None else pairs
    add_statistics(results, pairs, resamples=resamples, seed=stats_seed)
    results["settings"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results["table"] = render_table(results)
    if out is not None:
        _write(results, out)
    return results


def _settings(args: argparse.Namespace, evals: EvalSettings, template: Any, device: str, dtype: str,
              bench_meta: list[dict[str, Any]]) -> dict[str, Any]:
    """The exact settings of a run, as results.json records them."""
    return {
        "template": template.name, "answer_format": template.answer_format,
        "sampling": asdict(evals.sampling_params()), "seeds": list(evals.seeds), "batch_size": evals.batch_size,
        "limit": args.limit, "dtype": dtype, "device": device, "backend": evals.backend,
        "max_length": evals.max_length, "reward_style": "pm1", "reward_timeout_s": evals.timeout_s,
        "grading_options": asdict(evals.grading),
        "pass_k": list(args.pass_k),
        "num_samples": {b["name"]: b["num_samples"] for b in bench_meta},
        "greedy_rule": "temperature 0 -> 1 sample per problem",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "argv": list(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": environment(),
    }


def _bench_meta(bench: Any, evals: EvalSettings) -> dict[str, Any]:
    """A benchmark's entry in results.json, with its problems' ids and content keys: every row's per-problem counts
    follow this order, and ``compare`` matches problems across runs by the keys."""
    k = evals.samples_for(bench.default_samples)
    problems = as_problems(bench.problems)
    return {**bench.describe(), "num_samples": k, "metric": metric_name(k),
            "problem_ids": [p["id"] for p in problems], "problem_keys": [problem_key(p) for p in problems]}


def _write(results: dict[str, Any], out: Path) -> None:
    """The finished run's results.json, table.md and, when rows were compared, the forest plot differences.png."""
    output.write_json(out / "results.json", results)
    (out / "table.md").write_text(results["table"], encoding="utf-8")
    if results["differences"]:
        plots.forest_plot(out / "differences.png", forest_groups(results["differences"]),
                          title="Paired differences (points), 95 % intervals", xlabel="A − B (points)")


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "evaluate", run, __doc__,
                        help="accuracy of a base / steering / LoRA / full model on math benchmarks (the papers' table)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]DIR",
                   help="checkpoint to evaluate (repeatable). LABEL base/steering/lora/full names the paper row; the "
                        "kind is read from the dir: steering.json -> steering, adapter_config.json with peft_type "
                        "LORA -> LoRA, config.json -> full model; anything else is refused")
    p.add_argument("--label", action="append", default=[], help="row label for each --checkpoint, in order")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="base model (Hub id or dir): alone, evaluates the unsteered base; with checkpoints, the base "
                        "they load onto (default: the base recorded in the checkpoint)")
    p.add_argument("--include-base", action="store_true", help="also evaluate the unsteered base as row 'Base'")
    p.add_argument("--base-greedy", action="store_true",
                   help="also evaluate the base greedily (T=0, one sample, first seed) as row 'Base (greedy)'")
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="SPEC",
                   help="comma/space separated: aime24 aime25 amc23 math500 minerva olympiadbench gsm8k math, six "
                        "(the papers' six), file:PATH (.json/.jsonl/.parquet), procedural:TASK[:N][:key=value]; "
                        "prefix LABEL= to rename")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--pair", nargs=2, action="append", default=None, metavar=("A", "B"),
                   help="difference A − B to report (repeatable; a row label or role: base, steering, lora, full), "
                        "with its paired interval and p-value; default: each row against Base, and Steering against "
                        "Full and LoRA when present")
    settings.add_arguments(p)
    settings.add_statistics_arguments(p)


def _check_pass_k(pass_k: list[int], benches: list[Any], evals: EvalSettings, rows: list[RowSpec]) -> None:
    """pass@K needs K samples per problem: a K above a benchmark's samples would be dropped from the table."""
    if not any(not row.greedy for row in rows):
        return
    for b in benches:
        k = evals.samples_for(b.default_samples)
        too_many = [p for p in pass_k if p > k]
        if too_many:
            raise UsageError(f"--pass-k {too_many[0]}: {b.name} draws {k} sample(s) per problem, and pass@K needs "
                             "K <= samples; raise -k or drop that K")


def run(args: argparse.Namespace) -> int:
    settings.check(args)
    settings.check_statistics(args)
    rows = build_rows(args.checkpoint, args.label, args.model, args.include_base, args.base_greedy)
    try:
        pairs = resolve_pairs([r.describe() for r in rows], args.pair)
    except ValueError as e:
        raise UsageError(str(e)) from None
    template = cli.resolve_template(args.template, [r.path for r in rows])
    benches = cli.load_benchmarks(args.benchmarks, args)
    _check_pass_k(args.pass_k, benches, settings.from_args(args), rows)
    check_loadable(rows, template)
    if args.backend == "vllm":
        check_vllm_rows(rows, args.device)
    files = [b.info["path"] for b in benches if b.source.startswith("file:")]  # file: benchmarks (steering.problems)
    if args.template and os.path.isfile(args.template):  # a template file, not a built-in name
        files.append(args.template)
    staging = output.prepare_out(args.out, inputs=[*(r.path for r in rows), *files])
    results = evaluate_rows(rows, benches, args, template, staging, pairs=pairs, resamples=args.resamples,
                            stats_seed=args.stats_seed)
    out = output.complete(staging)
    print(results["table"])
    plot = f", {out / 'differences.png'}" if results["differences"] else ""
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'samples.jsonl'}{plot}")
    return 0
