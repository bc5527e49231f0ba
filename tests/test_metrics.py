"""Metric functions of steering.evaluation and the table's relative columns (analysis.table) against hand-computed
values."""

import math
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import table
from steering import evaluation


def test_avg_at_k_hand_computed():
    # problem 0: 3/4, problem 1: 0/4, problem 2: 4/4 -> (0.75 + 0 + 1) / 3
    correct = [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert evaluation.avg_at_k(correct) == pytest.approx(1.75 / 3)
    # one sample per problem: plain accuracy
    assert evaluation.avg_at_k([[True], [False], [True], [True]]) == 0.75


def test_avg_at_k_weights_problems_equally():
    # unequal sample counts: a mean of per-problem means, not a pooled mean
    assert evaluation.avg_at_k([[1, 1], [0, 0, 0, 0, 0, 0]]) == pytest.approx(0.5)


def test_pass_at_1_uses_first_sample():
    correct = [[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert evaluation.pass_at_1(correct) == 0.5


def test_pass_at_k_hand_computed():
    # n=4, c=1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2, pass@4 = 1
    assert evaluation.pass_at_k_single(4, 1, 1) == pytest.approx(0.25)
    assert evaluation.pass_at_k_single(4, 1, 2) == pytest.approx(0.5)
    assert evaluation.pass_at_k_single(4, 1, 4) == 1.0
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert evaluation.pass_at_k_single(5, 2, 2) == pytest.approx(0.7)
    assert evaluation.pass_at_k_single(5, 0, 3) == 0.0
    correct = [[1, 0, 0, 0], [1, 1, 0, 0]]
    # problem 1: n=4, c=2, k=2 -> 1 - C(2,2)/C(4,2) = 5/6
    assert evaluation.pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6) / 2)
    # pass@1 estimator equals avg@k
    assert evaluation.pass_at_k(correct, 1) == pytest.approx(evaluation.avg_at_k(correct))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    """The estimator is the probability that a random k-subset of the n samples holds a correct one."""
    n, c, k = nck
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert evaluation.pass_at_k_single(n, c, k) == pytest.approx(exact)


def test_pass_at_k_rejects_bad_k():
    with pytest.raises(ValueError):
        evaluation.pass_at_k([[1, 0]], 3)
    with pytest.raises(ValueError):
        evaluation.pass_at_k_single(4, 1, 0)
    with pytest.raises(ValueError):
        evaluation.avg_at_k([])


def test_mean_std():
    mean, std = evaluation.mean_std([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4)
    assert std == pytest.approx(0.2)  # sample std: sqrt((0.04 + 0 + 0.04) / 2)
    mean, std = evaluation.mean_std([0.2, 0.4, 0.6], ddof=0)
    assert std == pytest.approx(math.sqrt(0.08 / 3))
    # one seed: std 0
    assert evaluation.mean_std([0.37]) == (pytest.approx(0.37), 0.0)


def test_relative_and_relative_improvement():
    # Steering 0.75, base 0.25, full 0.85
    assert table.relative(0.75, 0.85) == pytest.approx(100 * 0.75 / 0.85)
    assert table.relative_improvement(0.75, 0.25, 0.85) == pytest.approx(100 * 0.5 / 0.6)
    assert table.relative(0.85, 0.85) == pytest.approx(100.0)
    assert table.relative_improvement(0.25, 0.25, 0.85) == 0.0
    assert table.relative_improvement(0.85, 0.25, 0.85) == pytest.approx(100.0)
    # undefined cases
    assert table.relative(0.5, 0.0) is None
    assert table.relative_improvement(0.5, 0.3, 0.3) is None
    # paper sanity row (Qwen2.5-Math-1.5B, GSM8K): base 29.26, full 86.49, steering 79.89
    assert table.relative_improvement(79.89, 29.26, 86.49) == pytest.approx(100 * 50.63 / 57.23)


def test_format_mean_std():
    assert table.format_mean_std(0.12345, 0.01) == "12.35 ± 1.00"
    assert table.format_mean_std(0.5, None) == "50.00"
    assert table.format_mean_std(None) == "–"
