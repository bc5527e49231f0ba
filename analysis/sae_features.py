"""What the features of ``analysis diffsae``'s SAE are, once the separation test has run: each tested feature's row of
the ranked table (:func:`ranked_table`), the description of a top feature (:func:`describe_top`: cosines with the
steering vectors and mean ΔF, logit lens, ΔF variance shares, top-activating tokens in context) and its card
(:func:`feature_cards`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis import _common, plots
from analysis.sae_activations import FeatureStats, context_activations
import steering.sae
from steering.readout import cosine


def ranked_table(sep: Mapping[str, Any], tested: torch.Tensor, means: torch.Tensor, correct: torch.Tensor,
                 firing_rate: torch.Tensor) -> list[dict[str, Any]]:
    """One row per tested feature (``tested``: the feature ids of :func:`separation`'s columns), ranked by effect
    ``|AUROC − ½|`` (ties: smaller p first). ``means`` (completions, all features) and ``correct`` give each feature's
    mean activation among correct and incorrect completions; ``firing_rate`` (all features) its share of tokens."""
    m_pos = means[correct][:, tested].mean(0)
    m_neg = means[~correct][:, tested].mean(0)
    order = sorted(range(tested.numel()), key=lambda i: (-float(sep["effect"][i]), float(sep["p_value"][i])))
    rows = []
    for rank, i in enumerate(order, 1):
        f, a = int(tested[i]), float(sep["auroc"][i])
        rows.append({"rank": rank, "feature": f, "auroc": a, "effect": float(sep["effect"][i]),
                     "direction": "correct" if a > 0.5 else "incorrect" if a < 0.5 else "none",
                     "p_value": float(sep["p_value"][i]), "p_maxt": float(sep["p_maxt"][i]),
                     "p_holm": float(sep["p_holm"][i]), "q_bh": float(sep["q_bh"][i]),
                     "significant": bool(sep["significant"][i]), "mean_correct": float(m_pos[i]),
                     "mean_incorrect": float(m_neg[i]), "firing_rate": float(firing_rate[f])})
    return rows


# --------------------------------------------------------------------------------------------------------------------
# What a top feature is


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    return _num(cosine(a, b))  # None where a direction is zero


def token_texts(tokenizer: Any, seqs: _common.Sequences, row: int) -> tuple[list[str], int]:
    """The decoded tokens of row ``row`` (prompt + completion) and its prompt length."""
    ids = list(seqs.prompt_ids[row]) + list(seqs.completion_ids[row])
    return _common.decode_tokens(tokenizer, ids), len(seqs.prompt_ids[row])


def describe_top(rows: Sequence[dict[str, Any]], sae: steering.sae.SparseAutoencoder, model: nn.Module, tokenizer: Any,
                 vectors: Mapping[int, torch.Tensor], seqs: _common.Sequences, correct: torch.Tensor, st: FeatureStats,
                 files: Mapping[str, Sequence[Path]], *, lens_kind: str, lens_k: int, examples: int, context: int,
                 contribution: bool) -> list[dict[str, Any]]:
    """The ranked rows of the top features, each with its cosines, lens (``lens_kind``, ``lens_k`` tokens), ΔF shares
    (``contribution``: with the share its own term explains, for ΔF input) and up to ``examples`` top-activating
    tokens with ``context`` tokens before each."""
    from analysis.logit_lens import Vocab, lens, readout
    from steering import hooks

    if not rows:
        return []
    feats = [r["feature"] for r in rows]
    vocab = Vocab(tokenizer, hooks.causal_lm(model).lm_head.weight.shape[0])
    device = next(model.parameters()).device
    mean_delta = st.s_delta / max(st.count, 1)
    along, explained = st.delta_shares(contribution)
    need = {int(r) for f in feats for r in st.top_row[f].tolist() if r >= 0}
    acts = context_activations(sae, files, need, feats)
    out = []
    for j, row in enumerate(rows):
        f = row["feature"]
        d = sae.W_dec[f].detach().cpu()
        with torch.no_grad():
            scores = lens(model, d.to(device), lens_kind)
        shown = top_examples(st, f, lambda r: acts.get(r, {}), j, tokenizer, seqs, correct, examples=examples,
                             context=context)
        out.append({**row, "cos_to_vectors": {str(layer): _cos(d, v) for layer, v in sorted(vectors.items())},
                    "cos_to_mean_delta": _cos(d, mean_delta),
                    "delta_variance_along": _num(along[f]),
                    "delta_variance_explained": None if explained is None else _num(explained[f]),
                    "lens": readout(scores, vocab, lens_k), "examples": shown})
    return out


def top_examples(st: FeatureStats, feature: int, row_acts: Callable[[int], Mapping[int, torch.Tensor]], column: int,
                 tokenizer: Any, seqs: _common.Sequences, correct: torch.Tensor, *, examples: int, context: int
                 ) -> list[dict[str, Any]]:
    """Up to ``examples`` of the feature's top-activating tokens, each in a distinct context of ``context`` tokens
    before it and 4 after, every context token with the feature's activation (``row_acts(row)[position][column]``;
    None where not recorded)."""
    shown, seen = [], set()
    for val, r, pos in zip(st.top_val[feature].tolist(), st.top_row[feature].tolist(), st.top_pos[feature].tolist()):
        if r < 0 or val <= 0 or len(shown) == examples:
            continue
        texts, p_len = token_texts(tokenizer, seqs, r)
        at = p_len + pos
        lo, hi = max(0, at - context), min(len(texts), at + 5)
        key = (tuple(texts[lo:hi]), at - lo)
        if key in seen:  # the same text around the same token (another sample of the same problem)
            continue
        seen.add(key)
        acts = row_acts(r)
        ctx = [{"token": texts[t], "activation": _act(acts.get(t - p_len), column)} for t in range(lo, hi)]
        shown.append({"row": r, "problem": seqs.problem[r], "correct": bool(correct[r]), "position": pos,
                      "token": texts[at], "activation": val, "context_start": lo - p_len, "context": ctx})
    return shown


def _act(values: torch.Tensor | None, j: int) -> float | None:
    return None if values is None else float(values[j])


def _num(x: float | torch.Tensor) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def feature_cards(directory: Path, top: Sequence[dict[str, Any]], correction: str) -> list[str]:
    """One PNG per top feature: a header block (AUROC, p and its ``correction``-adjusted value, cosines, ΔF shares,
    lens tokens) and its top-activating tokens in context, each token coloured by the feature's activation (blank:
    not recorded, e.g. prompt tokens)."""
    directory.mkdir(exist_ok=True)
    names = []
    for t in top:
        cos_l = t["cos_to_vectors"]
        best_layer = max(cos_l, key=lambda k: abs(cos_l[k] or 0.0)) if cos_l else None
        lens_top = " ".join(plots.show_token(x["token"], 10) for x in t["lens"]["top"][:6])
        lens_bottom = " ".join(plots.show_token(x["token"], 10) for x in t["lens"]["bottom"][:6])
        along = t["delta_variance_along"]
        adjusted = t["q_bh"] if correction == "bh" else t[f"p_{correction}"]
        header = (f"feature {t['feature']} (rank {t['rank']}): AUROC {t['auroc']:.3f} -> {t['direction']}, "
                  f"p {t['p_value']:.3g}, {correction} {adjusted:.3g}{' *' if t['significant'] else ''}; "
                  f"cos with s_{best_layer} {cos_l[best_layer] or 0:.2f}; ΔF variance along it "
                  + ("n/a" if along is None else f"{along:.3f}"))
        blocks = [(header, [f"lens top: {lens_top}\nlens bottom: {lens_bottom}"], [None], None)]
        for ex in t["examples"]:
            title = (f"completion {ex['row']} ({'correct' if ex['correct'] else 'incorrect'}), token "
                     f"{ex['position']} {plots.show_token(ex['token'])!r}: {ex['activation']:.3g}")
            blocks.append((title, [c["token"] for c in ex["context"]], [c["activation"] for c in ex["context"]],
                           None))
        vmax = max((c["activation"] or 0.0 for ex in t["examples"] for c in ex["context"]), default=1.0) or 1.0
        path = plots.token_highlight(directory / f"feature_{t['rank']:02d}_{t['feature']}.png", [], [], blocks=blocks,
                                     cmap="Reds", vmin=0.0, vmax=vmax, value_label="feature activation")
        names.append(f"{directory.name}/{path.name}")
    return names
