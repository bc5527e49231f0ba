"""The reward grades like math-verify on the public answer-grading corpus (issue 13).

tests/data/grader_corpus.jsonl holds the cases of Math-Verify's, lighteval's and the Qwen2.5-Math grader's tests,
each in a completion of the form the reward reads (built by scripts/extract_grader_corpus.py, with each case's
source named), and the project's own adversarial shapes. For every case the project's verdict must be math-verify's
own verdict on the same text (math-verify called directly, with the case's options); there must be no false
positive; and the project must agree with the suites' expectations at least as often as math-verify does.
``python -m analysis grader-report`` prints the same figures per source and per answer shape."""

import subprocess
import sys
from collections import Counter

import pytest

from analysis.grader_report import load_corpus, math_verify_verdict, project_results
from steering.rewards import ANSWER_FORMATS

CORPUS = load_corpus()
TIMEOUT_S = 2.0  # the reward's default


@pytest.fixture(scope="module")
def verdicts():
    reference = [math_verify_verdict(case) for case in CORPUS]
    results, seconds = project_results(CORPUS, TIMEOUT_S)
    return reference, results, seconds


def test_corpus_names_its_sources_and_covers_the_shapes():
    sources = Counter(case["source"] for case in CORPUS)
    assert set(sources) == {"math-verify", "lighteval", "qwen2.5-math-grader", "project-adversarial"}
    assert all(case["origin"] for case in CORPUS)
    assert {case["answer_format"] for case in CORPUS} == set(ANSWER_FORMATS)
    shapes = Counter(case["shape"] for case in CORPUS)
    for shape in ("several-boxes", "newline-in-answer", "dollar-in-answer", "brace-less-box", "fbox", "matrix",
                  "percent", "interval-or-set", "tuple-or-list", "thousands-separator", "text-or-units"):
        assert shapes[shape] > 0, shape
    assert len({case["id"] for case in CORPUS}) == len(CORPUS)


def test_project_verdict_is_math_verify_verdict_on_the_same_text(verdicts):
    reference, results, _ = verdicts
    differ = [(case["id"], case["completion"][-80:], case["gold"], result.status, mv)
              for case, result, mv in zip(CORPUS, results, reference) if result.correct != mv]
    assert not differ, f"{len(differ)} cases graded unlike math-verify:\n" + "\n".join(map(repr, differ[:20]))


def test_no_false_positives(verdicts):
    reference, results, _ = verdicts
    false_positives = [case["id"] for case, result, mv in zip(CORPUS, results, reference) if result.correct and not mv]
    assert not false_positives


def test_agreement_with_the_suites_at_least_math_verifys(verdicts):
    reference, results, _ = verdicts
    for source in {case["source"] for case in CORPUS}:
        cases = [i for i, case in enumerate(CORPUS) if case["source"] == source]
        project = sum(results[i].correct == CORPUS[i]["expected"] for i in cases)
        math_verify = sum(reference[i] == CORPUS[i]["expected"] for i in cases)
        assert project >= math_verify, (source, project, math_verify, len(cases))


def test_every_call_stays_under_the_timeout(verdicts):
    _, results, seconds = verdicts
    assert not [case["id"] for case, result in zip(CORPUS, results) if result.timed_out]
    assert max(seconds) < TIMEOUT_S


def test_report_script_runs():
    out = subprocess.run([sys.executable, "-m", "analysis", "grader-report", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--corpus" in out.stdout
