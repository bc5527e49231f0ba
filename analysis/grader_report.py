"""``python -m analysis grader-report``: how the reward grades the public answer-grading corpus, next to math-verify on
the same texts.

    python -m analysis grader-report [--corpus tests/data/grader_corpus.jsonl] [--timeout S] [--json OUT]

Each corpus case (``tests/data/grader_corpus.jsonl``, built by ``scripts/extract_grader_corpus.py``) is a completion
in one of the reward's answer formats, a ground truth, the verdict its source suite expects and the grading options
it uses. Per source and per answer shape, the report prints how often the project's verdict (``score``), and
math-verify's own verdict on the same text, agree with the expectation; how often the two agree with each other; and,
counted apart, the project's false positives (correct where math-verify says incorrect) and false negatives. It also
prints the slowest single ``score`` call.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from analysis import cli
from analysis.cli import UsageError

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "grader_corpus.jsonl"


CASE_KEYS = {"id": str, "source": str, "shape": str, "answer_format": str, "completion": str, "gold": str,
             "expected": bool, "options": dict}


def load_corpus(path: str | Path = DEFAULT_CORPUS) -> list[dict]:
    """The corpus's cases, each checked (a JSON object with every key of ``CASE_KEYS``, of its type): a bad line is
    a usage error naming it, before any grading."""
    from steering.files import read_jsonl

    cases = []
    for number, case in read_jsonl(path, UsageError):
        if not isinstance(case, dict):
            raise UsageError(f"--corpus {path}:{number}: not a JSON object")
        bad = [k for k, kind in CASE_KEYS.items() if not isinstance(case.get(k), kind)]
        if bad or case["answer_format"] not in ("boxed", "answer_tag"):
            raise UsageError(f"--corpus {path}:{number}: lacks or mistypes {bad or ['answer_format']} (each case "
                             f"needs {', '.join(CASE_KEYS)}; answer_format boxed or answer_tag)")
        cases.append(case)
    if not cases:
        raise UsageError(f"--corpus {path}: no cases")
    return cases


def math_verify_text(case: dict) -> str:
    """The text math-verify reads for a case: the completion itself (``boxed``), or the last ``<answer>`` tag's
    content in a box (``answer_tag``), the project's documented rule for the r1 format. (math-verify has no notion of
    answer tags, so for ``answer_tag`` cases "project = math-verify" checks that rule is applied faithfully; the
    comparison with the suites' expectations is the independent one.)"""
    if case["answer_format"] == "boxed":
        return case["completion"]
    content = case["completion"].rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    return f"\\boxed{{{content}}}"


def math_verify_verdict(case: dict) -> bool:
    """math-verify's verdict, called directly (parse + verify with its own timeouts, the case's options)."""
    from math_verify import parse, verify

    from steering.rewards import gold_input

    # A ground truth without math delimiters is read as display math (the reward's documented convention).
    return bool(verify(parse(gold_input(case["gold"])), parse(math_verify_text(case)), **case["options"]))


def project_results(cases: list[dict], timeout_s: float = 2.0) -> tuple[list, list[float]]:
    """The reward's ``RewardResult`` for every case, one ``score`` call each, and each call's wall time."""
    from steering.rewards import GradingOptions, score, start_workers

    start_workers()
    results, seconds = [], []
    for case in cases:
        start = time.perf_counter()
        results.append(score(case["completion"], case["gold"], case["answer_format"], timeout_s=timeout_s,
                             options=GradingOptions(**case["options"])))
        seconds.append(time.perf_counter() - start)
    return results, seconds


def tally(cases: list[dict], project: list[bool], reference: list[bool], key: str) -> dict[str, dict[str, int]]:
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for case, p, m in zip(cases, project, reference):
        for name in (case[key], "all"):
            row = rows[name]
            row["cases"] += 1
            row["project_ok"] += p == case["expected"]
            row["math_verify_ok"] += m == case["expected"]
            row["same"] += p == m
            row["false_pos"] += p and not m
            row["false_neg"] += m and not p
    return {name: dict(row) for name, row in rows.items()}


def print_table(title: str, rows: dict[str, dict[str, int]], out=sys.stdout) -> None:
    print(f"\n{title}", file=out)
    header = f"{'':24} {'cases':>6} {'project=suite':>14} {'math-verify=suite':>18} {'project=mv':>11} " \
             f"{'false +':>8} {'false -':>8}"
    print(header, file=out)
    for name in sorted(rows, key=lambda n: (n == "all", n)):
        r = rows[name]
        print(f"{name:24} {r['cases']:6d} {r['project_ok']:14d} {r['math_verify_ok']:18d} {r['same']:11d} "
              f"{r['false_pos']:8d} {r['false_neg']:8d}", file=out)


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "grader-report", run, __doc__,
                        help="the reward vs math-verify vs the public grading suites, on the grading corpus")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="the corpus (JSONL; default: %(default)s)")
    p.add_argument("--timeout", type=float, default=2.0, help="the reward's timeout_s per call (default 2)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the figures and per-case verdicts here")


def run(args: argparse.Namespace) -> int:
    if not Path(args.corpus).is_file():
        raise UsageError(f"--corpus {args.corpus}: no such file")
    from steering.rewards import check_timeout

    try:
        check_timeout(args.timeout)  # the reward's own range: larger limits overflow the grading workers' timers
    except ValueError as e:
        raise UsageError(f"--timeout {e}") from None
    if args.json and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: is a directory; give a file name")
    cases = load_corpus(args.corpus)
    reference = [math_verify_verdict(c) for c in cases]
    results, seconds = project_results(cases, args.timeout)
    project = [r.correct for r in results]
    tables = report_tables(cases, project, reference)
    print(f"{len(cases)} cases from {args.corpus}; 'suite' = the expectation of the case's source")
    for title, key in (("By source", "by_source"), ("By answer format", "by_answer_format"),
                       ("By answer shape", "by_shape"),
                       ("Cases with math-verify's default options, by source", "default_options_by_source")):
        print_table(title, tables[key])
    slowest = max(range(len(cases)), key=seconds.__getitem__)
    print(f"\nSlowest score() call: {seconds[slowest]:.3f} s ({cases[slowest]['id']}); timeout {args.timeout} s; "
          f"{sum(r.timed_out for r in results)} timed out")
    if args.json:
        from steering.files import write_json_atomic

        write_json_atomic(args.json, {
            **tables, "slowest_s": seconds[slowest], "slowest_case": cases[slowest]["id"],
            "cases": [{"id": c["id"], "project": p, "math_verify": m, "expected": c["expected"], "seconds": s}
                      for c, p, m, s in zip(cases, project, reference, seconds)]})
    return 0


def report_tables(cases: list[dict], project: list[bool], reference: list[bool]) -> dict[str, dict]:
    """The report's tallies: by source, answer shape and answer format, and by source over the cases that use
    math-verify's default options."""
    default = [i for i, c in enumerate(cases) if not c["options"]]
    return {
        "by_source": tally(cases, project, reference, "source"),
        "by_shape": tally(cases, project, reference, "shape"),
        "by_answer_format": tally(cases, project, reference, "answer_format"),
        "default_options_by_source": tally([cases[i] for i in default], [project[i] for i in default],
                                           [reference[i] for i in default], "source"),
    }
