"""Which features separate two groups of completions (DiffSAE: correct vs incorrect), for thousands of features at once.

- **AUROC** of each feature's per-completion activation: P(X₊ > X₋) + ½ P(X₊ = X₋), the Mann–Whitney U over n₊ n₋,
  from mid-ranks (:func:`auroc`), for every column of an (n, F) matrix in one matrix product.
- **Permutation test** of |AUROC − ½| (:func:`permutation_test`): labels shuffled, within each problem when groups are
  given (:func:`permuted_labels`); raw p-values and the Westfall–Young maxT p-values (family-wise error over all
  features, whatever their dependence).
- **Corrections** of raw p-values: Holm (FWER, :func:`holm`) and Benjamini–Hochberg (FDR, :func:`benjamini_hochberg`;
  the tests check it against ``scipy.stats.false_discovery_control``).

Written in torch rather than with ``scipy.stats.permutation_test`` / ``mannwhitneyu``: those test one feature per call,
and DiffSAE tests every live feature of the SAE (thousands) under the same B permutations, which here is B matrix
products. Functions of tensors and a generator; no files, no command line (``analysis.diffsae`` applies them).
"""

from __future__ import annotations

import math
from typing import Any

import torch



def mid_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of each column of ``values`` (n, F), ties getting their mean rank; (n, F) fp64."""
    v = values.double().T.contiguous()  # (F, n)
    srt = torch.sort(v, dim=1).values
    less = torch.searchsorted(srt, v, right=False).double()
    leq = torch.searchsorted(srt, v, right=True).double()
    return ((less + leq + 1) / 2).T


def auroc_from_ranks(ranks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of each column for positive ``labels`` (n,) bool: P(X₊ > X₋) + ½ P(X₊ = X₋), from mid-ranks (the
    Mann–Whitney U over n₊ n₋); ``labels`` may be (n, B) for B label vectors at once -> (B, F)."""
    y = labels.double()
    if y.dim() == 1:
        y = y[:, None]
    n_pos = y.sum(0)  # (B,)
    n_neg = y.shape[0] - n_pos
    u = y.T @ ranks - (n_pos * (n_pos + 1) / 2)[:, None]
    out = u / (n_pos * n_neg)[:, None]
    return out[0] if labels.dim() == 1 else out


def auroc(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return auroc_from_ranks(mid_ranks(values), labels)


def permuted_labels(labels: torch.Tensor, groups: torch.Tensor | None, count: int, generator: torch.Generator
                    ) -> torch.Tensor:
    """(n, count) bool: ``count`` permutations of ``labels``, each only within its group when ``groups`` is given."""
    n = labels.shape[0]
    if groups is None:
        keys = torch.rand(count, n, generator=generator)
        return labels[torch.argsort(keys, dim=1)].T
    g = groups.double()
    home = torch.argsort(g, stable=True)  # positions grouped, in order
    order = torch.argsort(g[None, :] + torch.rand(count, n, generator=generator) * 0.5, dim=1)  # grouped, shuffled
    out = torch.empty(count, n, dtype=torch.bool)
    out.scatter_(1, order, labels[home][None, :].expand(count, n))
    return out.T


def permutation_test(values: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None, permutations: int,
                     generator: torch.Generator, block: int = 200) -> dict[str, torch.Tensor]:
    """Two-sided permutation test of |AUROC − ½| for each column of ``values`` (n, F).

    ``p_value``: (1 + #{b : |A_bf − ½| ≥ |A_f − ½|}) / (B + 1) (never zero; Phipson & Smyth 2010). ``p_maxt``:
    Westfall–Young single-step maxT, the same with max_g |A_bg − ½| over all columns: it controls the family-wise
    error over the columns under the permutation null, whatever their dependence, and needs no more permutations than
    one test does. ``maxt_null``: max_g |A_bg − ½| per permutation (B,)."""
    ranks = mid_ranks(values)
    obs = (auroc_from_ranks(ranks, labels) - 0.5).abs()
    tol = 1e-12  # equal statistics count as "at least as extreme" despite float summation order
    ge = torch.zeros_like(obs)
    maxes = []
    done = 0
    while done < permutations:
        b = min(block, permutations - done)
        stats = (auroc_from_ranks(ranks, permuted_labels(labels, groups, b, generator)) - 0.5).abs()  # (b, F)
        ge += (stats >= obs[None, :] - tol).sum(0)
        maxes.append(stats.max(1).values)
        done += b
    null = torch.cat(maxes)
    p = (1 + ge) / (permutations + 1)
    p_maxt = (1 + (null[None, :] >= obs[:, None] - tol).sum(1).double()) / (permutations + 1)
    return {"auroc": auroc_from_ranks(ranks, labels), "p_value": p, "p_maxt": p_maxt, "maxt_null": null}


def holm(p: torch.Tensor) -> torch.Tensor:
    """Holm's step-down adjusted p-values (FWER)."""
    m = p.shape[0]
    order = torch.argsort(p)
    adj = torch.cummax(p[order] * (m - torch.arange(m, dtype=p.dtype)), 0).values.clamp(max=1.0)
    out = torch.empty_like(p)
    out[order] = adj
    return out


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """Benjamini–Hochberg q-values (FDR)."""
    m = p.shape[0]
    order = torch.argsort(p)
    scaled = p[order] * m / torch.arange(1, m + 1, dtype=p.dtype)
    q = torch.flip(torch.cummin(torch.flip(scaled, [0]), 0).values, [0]).clamp(max=1.0)
    out = torch.empty_like(p)
    out[order] = q
    return out


def separation(means: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None, *, permutations: int,
               correction: str, alpha: float, generator: torch.Generator) -> dict[str, Any]:
    """AUROC, raw and corrected p-values and significance of each column of ``means`` (n completions, F features),
    and the effect an AUROC must exceed to pass (``threshold``)."""
    t = permutation_test(means, labels, groups, permutations, generator)
    p = t["p_value"].double()
    adjusted = {"maxt": t["p_maxt"], "holm": holm(p), "bh": benjamini_hochberg(p)}
    sig = adjusted[correction] <= alpha
    effect = (t["auroc"] - 0.5).abs()
    if correction == "maxt":
        # the smallest effect whose maxT p-value is <= alpha: strictly above the floor(alpha (B+1))-th largest null max
        j = int(math.floor(alpha * (permutations + 1)))
        null = torch.sort(t["maxt_null"], descending=True).values
        thr = float(null[j - 1]) if j >= 1 else float("inf")
    else:
        thr = float(effect[sig].min()) if bool(sig.any()) else None
    return {"auroc": t["auroc"], "effect": effect, "p_value": p, "p_maxt": adjusted["maxt"],
            "p_holm": adjusted["holm"], "q_bh": adjusted["bh"], "significant": sig, "threshold": thr}
