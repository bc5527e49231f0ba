"""Accuracy metrics of the papers' evaluation protocol, as plain functions of correctness verdicts.

Correctness is given per problem as a list of booleans, one per sample (``correct[i][j]``: sample ``j`` of problem
``i`` was verified correct). All accuracies are fractions in [0, 1]; the table code multiplies by 100.

- :func:`avg_at_k`: the mean, over problems, of the fraction of a problem's ``k`` samples that are correct. This is
  the papers' "avg@32" (AIME24, AIME25 and AMC23 at T = 1) and, with one sample, their plain accuracy. It is an
  unbiased estimate of pass@1 that uses all ``k`` samples.
- :func:`pass_at_1`: the fraction of problems whose *first* sample is correct (what one sample per problem gives;
  with greedy decoding it is the greedy accuracy).
- :func:`pass_at_k`: the unbiased pass@k estimator of Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)`` per problem
  with ``n`` samples of which ``c`` are correct, averaged over problems.
- :func:`mean_std`: mean and standard deviation over seeds (sample std, ``ddof=1``; one seed gives std 0).
- :func:`relative`: Relative (%) = method / full-tune * 100.
- :func:`relative_improvement`: Relative Improvement (%) = (method - base) / (full - base) * 100.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Correctness = Sequence[Sequence[bool]]


def _check(correct: Correctness) -> None:
    if len(correct) == 0:
        raise ValueError("no problems: correctness is empty")
    for i, row in enumerate(correct):
        if len(row) == 0:
            raise ValueError(f"problem {i} has no samples")


def avg_at_k(correct: Correctness) -> float:
    """Mean over problems of the fraction of that problem's samples that are correct (avg@k)."""
    _check(correct)
    return sum(sum(bool(x) for x in row) / len(row) for row in correct) / len(correct)


def pass_at_1(correct: Correctness) -> float:
    """Fraction of problems whose first sample is correct."""
    _check(correct)
    return sum(bool(row[0]) for row in correct) / len(correct)


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (number of samples), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k / i), numerically stable (Chen et al. 2021)
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(correct: Correctness, k: int) -> float:
    """Unbiased pass@k averaged over problems; every problem needs at least ``k`` samples."""
    _check(correct)
    return sum(pass_at_k_single(len(row), sum(bool(x) for x in row), k) for row in correct) / len(correct)


def mean_std(values: Iterable[float], ddof: int = 1) -> tuple[float, float]:
    """``(mean, std)`` of per-seed values; std uses ``ddof`` (default 1, the sample std) and is 0 for one value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    mean = sum(vals) / len(vals)
    if len(vals) <= ddof:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - ddof)
    return mean, math.sqrt(var)


def relative(method: float, full: float) -> float | None:
    """Relative (%) = method / full * 100; None when the full-tune score is 0."""
    if full == 0:
        return None
    return 100.0 * method / full


def relative_improvement(method: float, base: float, full: float) -> float | None:
    """Relative Improvement (%) = (method - base) / (full - base) * 100; None when full == base."""
    if full == base:
        return None
    return 100.0 * (method - base) / (full - base)


def format_mean_std(mean: float | None, std: float | None = None, *, scale: float = 100.0, digits: int = 2,
                    show_std: bool = True) -> str:
    """``"12.34 ± 0.56"`` (values scaled by ``scale``); ``"–"`` for a missing value."""
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if show_std and std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text
