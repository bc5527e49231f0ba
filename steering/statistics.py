"""Intervals, paired tests and the smallest detectable difference for accuracies measured on benchmark problems.

The unit of evidence is the problem. A row's *score* on problem ``i`` is the fraction of its samples that are correct,
over its ``k`` samples and all its seeds (:func:`problem_scores`); the row's accuracy (avg@k, mean over seeds) is
the mean of these scores. The benchmark's problems are treated as a sample from the problems that could have been
asked, so the uncertainty of an accuracy is that of a mean over problems:

- **Bootstrap over problems** (:class:`Bootstrap`): each resample draws ``n`` of a benchmark's ``n`` problems with
  replacement; a drawn problem brings all its samples and seeds with it, because it enters only through its score.
  The draws are multinomial weights, one ``(resamples, n)`` matrix per benchmark, made once per seed and applied to
  every row and every derived number: a row's accuracy, the Avg over benchmarks (each benchmark resampled on its
  own), Relative and Relative Improvement (ratios of Avgs on the same draw), the difference between two rows (both
  rows on the same draw: a *paired* bootstrap). Intervals are percentile intervals of these draws
  (:func:`percentile_interval`), expanded for small benchmarks (:func:`expanded_tail`). ``scipy.stats.bootstrap``
  draws its own resamples in each call and returns only an interval, so it cannot give Relative = Avg / Full Avg an
  interval from the very draws that give Avg and Full Avg theirs; the weights here are drawn with a seeded ``numpy``
  Generator instead.
- **Paired test** (:func:`sign_flip_p_value`): under "the two rows are equally good", each problem's difference of
  scores is as likely to be positive as negative; ``scipy.stats.permutation_test`` with
  ``permutation_type='samples'`` on the one sample of differences flips their signs at random (exact when the count
  allows) and gives a two-sided p-value.
- **Smallest detectable difference** (:func:`detectable_difference`): the true difference a two-sided paired t-test
  at level ``alpha`` detects with probability ``power``, given the standard error of the mean difference; power from
  ``scipy.stats.nct``, the non-central t, solved with ``scipy.optimize.brentq``.

Everything here is a function of numpy arrays and a seed; no command line, no files (``analysis.table`` applies it to a
``results.json``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
ALPHA = 0.05
POWER = 0.8


def problem_scores(correct_counts: Sequence[Sequence[int]] | np.ndarray, num_samples: int) -> np.ndarray:
    """``(..., problems)`` scores: each problem's correct count summed over seeds, over ``seeds * num_samples``.
    ``correct_counts[..., s, i]`` is problem ``i``'s number of correct samples (of ``num_samples``) under seed ``s``
    (leading axes: rows or simulations)."""
    counts = np.asarray(correct_counts, dtype=float)
    if counts.ndim < 2 or counts.shape[-1] == 0 or counts.shape[-2] == 0:
        raise ValueError(f"correct counts must be seeds x problems, got shape {counts.shape}")
    if num_samples < 1 or (counts < 0).any() or (counts > num_samples).any():
        raise ValueError(f"correct counts must lie in [0, {num_samples}]")
    return counts.sum(axis=-2) / (counts.shape[-2] * num_samples)


def _rng(seed: int, name: str) -> np.random.Generator:
    # One stream per benchmark name: a benchmark's draws do not depend on which other benchmarks are evaluated.
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


class Bootstrap:
    """The resamples of problems, drawn once per benchmark (seeded by ``seed`` and the benchmark's name) and shared
    by every number computed from them. ``sizes`` maps a benchmark name to its number of problems."""

    def __init__(self, sizes: Mapping[str, int], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED):
        if resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {resamples}")
        self.resamples, self.seed = int(resamples), int(seed)
        self.weights = {name: self._draw(name, int(n)) for name, n in sizes.items()}

    def _draw(self, name: str, n: int) -> np.ndarray:
        if n < 1:
            raise ValueError(f"benchmark {name!r} has no problems")
        counts = _rng(self.seed, name).multinomial(n, np.full(n, 1.0 / n), size=self.resamples)
        return counts.astype(float) / n  # row r: how often resample r drew each problem, over n

    def means(self, name: str, scores: np.ndarray) -> np.ndarray:
        """``(..., resamples)`` resampled means of ``scores`` (``(..., problems)``: leading axes are rows or
        simulations, all resampled with the same draws)."""
        return np.asarray(scores, dtype=float) @ self.weights[name].T

    def average(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Resampled Avg: the mean over benchmarks of each one's resampled mean (each benchmark resampled on its
        own draws)."""
        return np.mean([self.means(name, s) for name, s in scores.items()], axis=0)


def expanded_tail(confidence: float, n: int | None) -> float:
    """The tail probability of each end of the percentile interval. The plain percentile interval undercovers on
    small samples (about 93 % for a nominal 95 % at 30 problems): its spread is the plug-in one, short by
    ``(n - 1) / n``, and its ends are normal quantiles where a t quantile is due. The *expanded* percentile interval
    (Hesterberg, "What teachers should know about the bootstrap", 2015) takes the tail ``alpha'`` with
    ``z(alpha') = sqrt(n / (n - 1)) * t(alpha / 2, n - 1)``; ``n`` None or < 2: the plain tail."""
    from scipy.stats import norm, t

    alpha = 1.0 - confidence
    if n is None or n < 2:
        return alpha / 2
    return float(norm.cdf(-math.sqrt(n / (n - 1)) * t.ppf(1 - alpha / 2, n - 1)))


def percentile_interval(draws: np.ndarray, confidence: float = CONFIDENCE,
                        n: int | None = None) -> list[float] | None:
    """The central percentile interval of bootstrap draws, expanded for ``n`` problems (:func:`expanded_tail`); NaN
    draws (a ratio over a zero) are left out. ``[low, high]`` (as results.json holds it), None when there is no
    finite draw."""
    draws = np.asarray(draws, dtype=float)
    if not np.isfinite(draws).any():
        return None
    tail = 100.0 * expanded_tail(confidence, n)
    low, high = np.nanpercentile(draws, [tail, 100.0 - tail])
    return [float(low), float(high)]


def percentile_intervals(draws: np.ndarray, confidence: float = CONFIDENCE, n: int | None = None) -> np.ndarray:
    """``(..., 2)`` intervals of ``(..., resamples)`` draws (vectorised :func:`percentile_interval`)."""
    tail = 100.0 * expanded_tail(confidence, n)
    return np.moveaxis(np.percentile(np.asarray(draws, dtype=float), [tail, 100.0 - tail], axis=-1), 0, -1)


def sign_flip_p_value(differences: np.ndarray, weights: np.ndarray | None = None, *,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray | float:
    """Two-sided p-value of the paired sign-flip test of ``sum(weights * differences)`` (default weights: the mean).

    ``differences`` is ``(..., problems)``: one row's score minus the other's on each problem; leading axes are
    tested separately (with the same flips). ``weights`` lets one test cover several benchmarks (the Avg: each
    benchmark's problems weigh ``1 / (benchmarks * its size)``)."""
    from scipy.stats import permutation_test

    d = np.asarray(differences, dtype=float)
    w = np.full(d.shape[-1], 1.0 / d.shape[-1]) if weights is None else np.asarray(weights, dtype=float)

    def statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.moveaxis(x, axis, -1) @ w

    batch = max(1, int(2e7 // d.size))  # sign flips per vectorised call: bounds the memory to ~160 MB
    res = permutation_test((d,), statistic, permutation_type="samples", vectorized=True, n_resamples=resamples,
                           batch=batch, alternative="two-sided", axis=-1, rng=seed)
    p = np.minimum(res.pvalue, 1.0)
    return float(p) if np.ndim(p) == 0 else p


def detectable_difference(standard_error: float, df: float | None, *, alpha: float = ALPHA,
                          power: float = POWER) -> float | None:
    """The true difference a two-sided t-test at level ``alpha`` detects with probability ``power``, when the mean
    difference has ``standard_error`` with ``df`` degrees of freedom (None: the normal limit). None when undefined
    (``df`` < 1, or a non-finite standard error); 0 when the standard error is 0."""
    from scipy.optimize import brentq
    from scipy.stats import nct, norm, t

    if standard_error is None or not math.isfinite(standard_error) or (df is not None and df < 1):
        return None
    if standard_error == 0:
        return 0.0
    if df is None:
        return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * standard_error)
    crit = t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:  # power of the test at non-centrality nc, minus the power wanted
        # the far tail is ~0 for a large nc, where scipy's nct.cdf can return NaN
        return nct.sf(crit, df, nc) + np.nan_to_num(nct.cdf(-crit, df, nc)) - power

    high = crit + 3.0
    while shortfall(high) < 0:  # few degrees of freedom need a larger non-centrality
        high *= 2.0
    return float(brentq(shortfall, 0.0, high) * standard_error)


def paired_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], boot: Bootstrap, *,
                      confidence: float = CONFIDENCE, alpha: float = ALPHA, power: float = POWER) -> dict[str, Any]:
    """``a - b`` per benchmark and on their Avg, both rows' scores given per benchmark on the same problems (in the
    same order): the difference, its paired bootstrap interval (``boot``'s draws), the sign-flip p-value (``boot``'s
    resample count and seed) and the smallest difference detectable with the observed per-problem spread."""
    names = list(a)
    diffs = {n: np.asarray(a[n], dtype=float) - np.asarray(b[n], dtype=float) for n in names}
    out: dict[str, Any] = {"benchmarks": {n: _one_difference(n, diffs[n], boot, confidence, alpha, power)
                                          for n in names}}
    out["avg"] = _avg_difference(diffs, boot, confidence, alpha, power)
    return out


def _one_difference(name: str, d: np.ndarray, boot: Bootstrap, confidence: float, alpha: float,
                    power: float) -> dict[str, Any]:
    n = d.size
    sd = float(np.std(d, ddof=1)) if n > 1 else None
    return {"difference": float(d.mean()), "ci": percentile_interval(boot.means(name, d), confidence, n),
            "p_value": sign_flip_p_value(d, resamples=boot.resamples, seed=boot.seed),
            "num_problems": n, "sd": sd,
            "detectable": detectable_difference(sd / math.sqrt(n), n - 1, alpha=alpha, power=power)
            if sd is not None else None}


def _avg_difference(diffs: Mapping[str, np.ndarray], boot: Bootstrap, confidence: float, alpha: float,
                    power: float) -> dict[str, Any]:
    # The Avg weighs each benchmark equally, so a problem of a benchmark of size n weighs 1 / (benchmarks * n).
    names = list(diffs)
    weights = np.concatenate([np.full(diffs[n].size, 1.0 / (len(names) * diffs[n].size)) for n in names])
    values = np.concatenate([diffs[n] for n in names])
    var = sum(np.var(diffs[n], ddof=1) / diffs[n].size for n in names if diffs[n].size > 1) / len(names) ** 2
    df = sum(diffs[n].size - 1 for n in names)
    smallest = min(d.size for d in diffs.values())  # the Avg's interval is expanded as for its smallest benchmark
    return {"difference": float(values @ weights), "ci": percentile_interval(boot.average(diffs), confidence, smallest),
            "p_value": sign_flip_p_value(values, weights, resamples=boot.resamples, seed=boot.seed),
            "num_problems": int(values.size),
            "detectable": detectable_difference(math.sqrt(var), df, alpha=alpha, power=power) if df else None}
