"""Reading what steering vectors do, the one implementation of two of the papers' readouts: each vector through the
unembedding (the *logit lens*: top / bottom tokens and their non-English share) and the probability gain of the first
generated token with the vectors on over the base (and the KL there).

``python -m analysis logit-lens`` and ``python -m analysis first-token`` report them for a checkpoint; the training
probes (``train/probes.py``) log them while a run trains. Both call these functions, so the numbers agree.

Token classes (of each token's decoded text): *non-Latin* = has a letter of a non-Latin script (CJK, Cyrillic,
Arabic, ...) or is an incomplete UTF-8 piece (byte-level BPE fragments of such characters decode to U+FFFD);
*non-English* = non-Latin, or has any letter outside ASCII a-z/A-Z (accented Latin). Ids beyond the tokenizer's
vocabulary (padding rows of the embedding matrix) are never ranked.
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steering import hooks
from steering import vectors as sv
from steering.generation import pad_id_of, pad_rows

LENSES = ("norm", "raw", "cosine")
_ASCII_LETTERS = set(string.ascii_letters)


# --------------------------------------------------------------------------------------------------------------------
# The logit lens of a vector


def lens(model: nn.Module, x: torch.Tensor, mode: str = "norm") -> torch.Tensor:
    """Vocabulary scores of residual-stream vector(s) ``x`` (``(..., d_model)`` -> ``(..., vocab)``).

    ``norm``: final norm then ``lm_head`` (:func:`steering.hooks.unembed`; on the last layer's residual this *is* the
    model's output logits). ``raw``: ``lm_head`` only (projection onto the unembedding rows). ``cosine``: cosine
    similarity with each unembedding row."""
    if mode == "norm":
        return hooks.unembed(model, x, apply_norm=True)
    if mode == "raw":
        return hooks.unembed(model, x, apply_norm=False)
    if mode == "cosine":
        w = hooks.causal_lm(model).lm_head.weight.float()
        xf = x.float()
        return (xf @ w.T) / (xf.norm(dim=-1, keepdim=True).clamp_min(1e-12) * w.norm(dim=-1).clamp_min(1e-12))
    raise ValueError(f"unknown lens {mode!r}; use one of {LENSES}")


def token_class(text: str) -> tuple[bool, bool]:
    """``(non_latin, non_english)`` of a token's text (see the module docstring)."""
    fragment = "\ufffd" in text
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    non_latin = fragment or any(not unicodedata.name(c, "").startswith("LATIN") for c in letters)
    non_english = non_latin or any(c not in _ASCII_LETTERS for c in letters)
    return non_latin, non_english


class Vocab:
    """Decoded token texts and their classes, computed once per tokenizer."""

    def __init__(self, tokenizer: Any, vocab_rows: int):
        self.size = min(len(tokenizer), vocab_rows)
        self.rows = vocab_rows
        self.texts = tokenizer.batch_decode([[i] for i in range(self.size)])
        classes = [token_class(t) for t in self.texts]
        self.non_latin = [c[0] for c in classes]
        self.non_english = [c[1] for c in classes]

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any) -> "Vocab":
        """The vocabulary a model's ``lm_head`` ranks (its rows beyond the tokenizer's are padding)."""
        return cls(tokenizer, hooks.causal_lm(model).lm_head.weight.shape[0])

    def shares(self) -> dict[str, float]:
        return {"size": self.size, "non_latin_share": sum(self.non_latin) / max(self.size, 1),
                "non_english_share": sum(self.non_english) / max(self.size, 1)}

    def mask_invalid(self, scores: torch.Tensor, fill: float) -> torch.Tensor:
        if scores.shape[-1] > self.size:
            scores = scores.clone()
            scores[..., self.size:] = fill
        return scores


def readout(scores: torch.Tensor, vocab: Vocab, k: int) -> dict[str, Any]:
    """Top-k and bottom-k tokens of a ``(vocab,)`` score vector, and the non-Latin / non-English shares among them."""
    scores = scores.detach().float().reshape(-1).cpu()
    k = min(k, vocab.size)
    top = torch.topk(vocab.mask_invalid(scores, float("-inf")), k)
    bottom = torch.topk(-vocab.mask_invalid(scores, float("inf")), k)

    def rows(ids: torch.Tensor) -> list[dict[str, Any]]:
        return [{"token_id": int(i), "token": vocab.texts[int(i)], "value": float(scores[int(i)])} for i in ids]

    out: dict[str, Any] = {"top": rows(top.indices), "bottom": rows(bottom.indices)}
    for name, ids in (("top", top.indices), ("bottom", bottom.indices)):
        out[f"{name}_non_latin_share"] = sum(vocab.non_latin[int(i)] for i in ids) / k
        out[f"{name}_non_english_share"] = sum(vocab.non_english[int(i)] for i in ids) / k
    return out


@torch.no_grad()
def vector_lens(model: nn.Module, layer: int, vector: torch.Tensor, vocab: Vocab, k: int, mode: str = "norm"
                ) -> dict[str, Any]:
    """One layer's entry of ``analysis logit-lens``: ``{"layer", "vector_norm", "top", "bottom", *shares}``."""
    device = next(model.parameters()).device
    v = vector.detach().float().reshape(-1)
    return {"layer": layer, "vector_norm": float(v.norm()), **readout(lens(model, v.to(device), mode), vocab, k)}


# --------------------------------------------------------------------------------------------------------------------
# Vectors on a model, teacher-forced batches


@dataclass
class Batch:
    """Right-padded prompt+completion rows (real tokens at positions ``0 .. len-1``, as in an unpadded run)."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S) long
    prompt_len: torch.Tensor  # (B,)
    length: torch.Tensor  # (B,) prompt + completion
    rows: list[int]

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], rows: list[int],
              device: str | torch.device, pad_id: int) -> "Batch":
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
        ids, mask = pad_rows(seqs, pad_id, side="right", device=device)
        return cls(ids, mask, torch.tensor([len(p) for p in prompts], device=device),
                   torch.tensor([len(s) for s in seqs], device=device), rows)

    def positions(self, kind: str = "all") -> torch.Tensor:
        """(B, S) bool mask: ``all`` real tokens, ``prompt`` tokens, ``completion`` tokens, or ``predict``: the
        positions whose next-token distribution produced a completion token (``prompt_len − 1 .. len − 2``)."""
        s = self.input_ids.shape[1]
        pos = torch.arange(s, device=self.input_ids.device)[None, :]
        p, n = self.prompt_len[:, None], self.length[:, None]
        if kind == "all":
            return pos < n
        if kind == "prompt":
            return pos < p
        if kind == "completion":
            return (pos >= p) & (pos < n)
        if kind == "predict":
            return (pos >= p - 1) & (pos < n - 1)
        raise ValueError(f"unknown position kind {kind!r}; use all, prompt, completion or predict")

    def forward(self, model: nn.Module, **kwargs: Any):
        return model(input_ids=self.input_ids, attention_mask=self.attention_mask, **kwargs)


def kl_per_token(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position (``(..., V)`` logits -> ``(...)``), in fp32."""
    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)  # >= 0; float rounding can dip a hair below


# --------------------------------------------------------------------------------------------------------------------
# The first generated token


def _last_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``(B, V)`` fp32 logits at each row's last real position. Only the columns some row ends at go through
    ``lm_head`` (``logits_to_keep``): the full ``(B, S, V)`` logits of a 150k-token vocabulary would be gigabytes."""
    last = (batch.length - 1).long()
    keep = torch.unique(last)  # sorted
    logits = batch.forward(model, logits_to_keep=keep).logits
    return logits[torch.arange(len(last), device=last.device), torch.searchsorted(keep, last)].float()


@torch.no_grad()
def first_position(model, tokenizer, prompts: list[str], vectors: Mapping[int, torch.Tensor], batch_size: int,
                   device, base_cache: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Mean next-token distributions right after the prompt, with and without ``vectors``, and the mean KL.

    The base is frozen, so its logits on the same prompts never change: a caller that measures the same prompts again
    (the training probes) passes the same ``base_cache`` list each time, filled on the first call, and skips the base
    passes after it."""
    sum_s = sum_b = None
    kl = 0.0
    ids_all = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for i, start in enumerate(range(0, len(ids_all), batch_size)):
        chunk = ids_all[start:start + batch_size]
        batch = Batch.build(chunk, [[] for _ in chunk], list(range(len(chunk))), device, pad_id_of(tokenizer))
        with sv.use_vectors(model, vectors):
            ls = _last_logits(model, batch)
        if base_cache is not None and i < len(base_cache):
            lb = base_cache[i]
        else:
            with sv.use_vectors(model, {}):
                lb = _last_logits(model, batch)
            if base_cache is not None:
                base_cache.append(lb)
        ps, pb = ls.softmax(-1), lb.softmax(-1)
        kl += float(kl_per_token(ls, lb).sum())
        sum_s = ps.sum(0) if sum_s is None else sum_s + ps.sum(0)
        sum_b = pb.sum(0) if sum_b is None else sum_b + pb.sum(0)
    n = len(ids_all)
    return sum_s / n, sum_b / n, torch.tensor(kl / n)


def first_token_gain(model, tokenizer, prompts: list[str], vectors: Mapping[int, torch.Tensor], *, k: int,
                     batch_size: int, base_cache: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """``analysis first-token``'s ``first_token`` block: over ``prompts``, the tokens whose probability right after
    the prompt gains (and loses) the most with ``vectors`` on (every other steered layer zero) over the base, and the
    mean KL(steered ‖ base) there: ``{"num_prompts", "kl", "top_gained", "top_lost"}``, each token
    ``{"token_id", "token", "p_steered", "p_base", "gain"}``. ``base_cache``: see :func:`first_position`."""
    device = sv.model_device(model)
    ps, pb, kl0 = first_position(model, tokenizer, prompts, vectors, batch_size, device, base_cache)
    vocab_n = min(len(tokenizer), ps.shape[-1])
    delta = (ps - pb)[:vocab_n].cpu()
    k = min(k, vocab_n)

    def tok_rows(ids: torch.Tensor) -> list[dict[str, Any]]:
        return [{"token_id": int(i), "token": tokenizer.decode([int(i)]), "p_steered": float(ps[int(i)]),
                 "p_base": float(pb[int(i)]), "gain": float(delta[int(i)])} for i in ids]

    return {"num_prompts": len(prompts), "kl": float(kl0), "top_gained": tok_rows(torch.topk(delta, k).indices),
            "top_lost": tok_rows(torch.topk(-delta, k).indices)}


# --------------------------------------------------------------------------------------------------------------------
# Cosine similarity


def cosine_matrix(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n, n)`` float64 cosines between ``vectors`` (each flattened), the one cosine of the project (``analysis
    similarity``, ``unembed-similarity``, the training probes, attribution, diffsae).

    The cosine with a zero vector is undefined, and is NaN here (never 0, which would read as "orthogonal"); in a
    result file it is written as null (:func:`none_for_nan`), and plots draw it blank."""
    m = torch.stack([v.detach().double().reshape(-1).cpu() for v in vectors])
    norms = m.norm(dim=1)
    outer = norms[:, None] * norms[None, :]
    cos = (m @ m.T) / outer
    cos[outer == 0] = math.nan
    return cos


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of two vectors (:func:`cosine_matrix`; NaN when either is zero)."""
    return float(cosine_matrix([a, b])[0, 1])


def none_for_nan(matrix: torch.Tensor) -> list[list[float | None]]:
    """A float matrix as JSON rows, an undefined (NaN) entry as None (null; NaN is not valid JSON)."""
    return [[None if math.isnan(x) else x for x in row] for row in matrix.tolist()]
