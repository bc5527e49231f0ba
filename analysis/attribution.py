"""``python -m analysis attribution``: choose the layer of a DiffMean behaviour vector by attribution patching.

For every layer ``l`` with a vector ``u_l``, add ``c * u_l`` to ``blocks.{l}.hook_resid_post`` at the positive
positions ``P`` of the label's spans (the same positions the vector was computed from: ``[t0-1, t1-1)`` in shift
mode, the Ward window otherwise) and score how much that changes the model's next-token predictions, averaged over
examples (per example: mean over its positions; then mean over examples). Three estimates:

``fisher`` (default, the one the layer is chosen by)
    The second-order estimate of ``KL(p || p_steered)`` at the positions ``P``: ``1/2 * (J u)^T F (J u)`` where
    ``J u = d logits / d alpha`` for the perturbation ``alpha * c * u_l`` (a Jacobian-vector product: forward-mode
    autodiff through the hook, one pass per layer) and ``F = diag(p) - p p^T`` is the Fisher of the softmax, i.e.
    ``1/2 * Var_p(J u)`` per position. A true KL has zero value and zero gradient at ``u = 0``, so this is its
    leading term; it is non-negative, scales exactly as ``c^2`` and measures the paper's quantity (the change of the
    next-token *distribution*) rather than one token's probability.
``logprob``
    First order on a different metric: the change of ``log p(first token of the span)`` at the position before the
    span (``t0 - 1``), ``c * grad . u_l``. Computed by reverse mode for all layers in one backward pass (classic
    attribution patching); signed (positive = the vector makes the behaviour's opening token likelier).
``exact``
    Ground truth by activation patching: one forward pass per layer with ``c * u_l`` actually added, giving the exact
    ``KL(p || p_steered)`` at ``P`` (``exact_kl``) and the exact change of the opening tokens' log-probability
    (``exact_logprob``).

The KL is computed as ``sum p (log p - log q)`` (``F.kl_div(log q, log p, log_target=True)``); the public code's
``kl_div`` call, which passes log-probabilities as the target without ``log_target=True``, is not a KL and is not
reproduced.

**Early layers.** Early-layer vectors mostly encode token identity. A layer is *flagged* (and excluded from the
choice) if it is among the first ``--skip-first`` layers, or if its vector's max |cosine| with any row of the input
embedding matrix, or its |cosine| with the same DiffMean computed at ``hook_embed`` (the embedding-layer direction,
over the same examples and positions), exceeds ``--embed-threshold``. The chosen layer is the highest-scoring
unflagged layer.

Writes ``OUT/result.json`` and ``OUT/attribution.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from analysis import cli, output
from analysis.cli import UsageError
from steering import diffmean as dm
from steering import compat
from steering import hooks
from steering import readout
from steering import vectors as sv

ESTIMATES = ("fisher", "logprob", "exact")
SCORE_KEY = {"fisher": "fisher", "logprob": "logprob", "exact": "exact_kl"}


# --------------------------------------------------------------------------------------------------------------------
# Examples


@dataclass
class Example:
    input_ids: torch.Tensor  # (1, T)
    positions: list[int]  # P: where the vector is added and the KL is measured
    open_positions: list[int]  # O: t0 - 1 for each span (inside the trace)
    open_targets: list[int]  # the span's first token, predicted at O
    encoded: dm.EncodedTrace

    @property
    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        m[0, self.positions] = True
        return m

    @property
    def rows(self) -> list[int]:
        """The positions whose predictions are read (P and O): only these rows of the logits are kept."""
        return sorted(set(self.positions) | set(self.open_positions))

    def row_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of P and of O into :attr:`rows`."""
        at = {p: i for i, p in enumerate(self.rows)}
        return (torch.tensor([at[p] for p in self.positions], dtype=torch.long),
                torch.tensor([at[p] for p in self.open_positions], dtype=torch.long))


def make_examples(tokenizer: Any, traces: Iterable[Mapping[str, Any]], label: str, spec: dm.PositionSpec,
                  *, max_length: int | None = None, max_examples: int | None = None) -> list[Example]:
    """One example per trace that has at least one span of ``label`` with positions left after clipping."""
    out: list[Example] = []
    for t in traces:
        enc = dm.encode_trace(tokenizer, t, spec, max_length, labels=[label])
        if not enc.spans:
            continue
        pos = sorted({p for sp in enc.spans for p in sp.positions})
        opens = [(sp.t0 - 1, enc.input_ids[sp.t0]) for sp in enc.spans if sp.t0 - 1 >= enc.trace_start]
        opens = sorted(set(opens))
        out.append(Example(torch.tensor([enc.input_ids]), pos, [o for o, _ in opens], [y for _, y in opens], enc))
        if max_examples and len(out) >= max_examples:
            break
    return out


# --------------------------------------------------------------------------------------------------------------------
# The estimates for one example


@contextmanager
def eager_attention(model: nn.Module):
    """Forward-mode AD has no formula for the fused SDPA kernels: run eager attention inside the block."""
    lm = hooks.causal_lm(model)
    old = compat.attn_implementation(lm)
    if old in (None, "eager"):
        yield
        return
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(old)


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def kl_from_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` along the last axis from log-probabilities (a real KL: ``log_target=True``)."""
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def fisher_from_tangent(logp: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``1/2 * dz^T (diag p - p p^T) dz = 1/2 * Var_p(dz)`` along the last axis."""
    p = logp.exp()
    dz = tangent.double()
    mean = (p * dz).sum(-1, keepdim=True)
    return 0.5 * (p * (dz - mean) ** 2).sum(-1)


def logprob_from_tangent(logp: torch.Tensor, tangent: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """First-order change of ``log p(target)``: ``dz[target] - E_p[dz]``."""
    p = logp.exp()
    dz = tangent.double()
    return dz.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - (p * dz).sum(-1)


def _direction(ex: Example, u: torch.Tensor, coef: float) -> torch.Tensor:
    return ex.mask.unsqueeze(-1).double() * (coef * u.double())  # (1, T, d)


def clean_logp(model: nn.Module, ex: Example, names: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
    """Unsteered float64 log-probabilities at ``ex.rows`` (on the CPU), and the activations cached at ``names``."""
    device = sv.model_device(model)
    with torch.no_grad():
        out, cache = hooks.run_with_cache(model, input_ids=ex.input_ids.to(device), names=list(names), use_cache=False)
    return _logp(out.logits[0, ex.rows]).cpu(), cache


def jvp_logits(model: nn.Module, ex: Example, layer: int, u: torch.Tensor, coef: float = 1.0):
    """``(logits, d logits / d alpha)`` at ``alpha = 0`` for ``alpha * coef * u`` added at ``P`` of ``layer``."""
    device = sv.model_device(model)
    direction = _direction(ex, u, coef).to(device)
    with eager_attention(model), fwAD.dual_level(), torch.no_grad():
        def hook(t: torch.Tensor, name: str) -> torch.Tensor:
            # A tangent, not a steering vector: at alpha = 0 the primal is t exactly, so this add needs no BEFT numerics
            alpha = fwAD.make_dual(torch.zeros((), dtype=t.dtype, device=t.device),
                                   torch.ones((), dtype=t.dtype, device=t.device))
            return t + alpha * direction.to(t.dtype)

        out = hooks.run_with_hooks(model, input_ids=ex.input_ids.to(device), use_cache=False,
                                   fwd_hooks=[(dm.DEFAULT_HOOK.format(layer=layer), hook)])
        primal, tangent = fwAD.unpack_dual(out.logits)
    if tangent is None:  # the hook never ran: cannot happen for a valid layer
        raise RuntimeError(f"no tangent reached the logits from layer {layer}")
    return primal[0].detach(), tangent[0].detach()


def fisher_scores(model: nn.Module, ex: Example, vectors: Mapping[int, torch.Tensor], coef: float = 1.0,
                  logp: torch.Tensor | None = None) -> dict[int, dict[str, float]]:
    """Per layer: ``fisher`` (mean over P of the second-order KL) and ``logprob_jvp`` (mean over O of the first-order
    log-probability change), from one JVP per layer."""
    if logp is None:
        logp, _ = clean_logp(model, ex)
    pos, opens = ex.row_index()
    targets = torch.tensor(ex.open_targets, dtype=torch.long)
    out: dict[int, dict[str, float]] = {}
    for layer, u in vectors.items():
        _, tangent = jvp_logits(model, ex, layer, u, coef)
        tangent = tangent[ex.rows].cpu()
        row = {"fisher": float(fisher_from_tangent(logp[pos], tangent[pos]).mean())}
        if len(opens):
            row["logprob_jvp"] = float(logprob_from_tangent(logp[opens], tangent[opens], targets).mean())
        out[layer] = row
    return out


def logprob_scores(model: nn.Module, ex: Example, vectors: Mapping[int, torch.Tensor],
                   coef: float = 1.0) -> dict[int, float]:
    """Per layer, ``c * grad(mean_O log p(target)) . u`` summed over P: all layers from one backward pass."""
    if not ex.open_positions:
        return {}
    device = sv.model_device(model)
    lm = hooks.causal_lm(model)
    dtype = next(lm.parameters()).dtype
    T = ex.input_ids.shape[1]
    hidden = int(lm.config.hidden_size)
    deltas = {layer: torch.zeros(1, T, hidden, dtype=dtype, device=device, requires_grad=True) for layer in vectors}

    def adder(layer: int):
        return lambda t, name: t + deltas[layer].to(t.dtype)

    with torch.enable_grad():
        out = hooks.run_with_hooks(model, input_ids=ex.input_ids.to(device), use_cache=False,
                                   fwd_hooks=[(dm.DEFAULT_HOOK.format(layer=layer), adder(layer)) for layer in vectors])
        opens = torch.tensor(ex.open_positions, device=device)
        targets = torch.tensor(ex.open_targets, device=device)
        logp = torch.log_softmax(out.logits[0, opens].float(), dim=-1)
        metric = logp.gather(-1, targets.unsqueeze(-1)).mean()
        grads = torch.autograd.grad(metric, [deltas[layer] for layer in vectors])
    res = {}
    for (layer, u), g in zip(vectors.items(), grads):
        d = _direction(ex, u, coef).to(device)
        res[layer] = float((g.double() * d).sum())
    return res


def exact_scores(model: nn.Module, ex: Example, vectors: Mapping[int, torch.Tensor], coef: float = 1.0,
                 logp: torch.Tensor | None = None) -> dict[int, dict[str, float]]:
    """Per layer, by activation patching: ``exact_kl`` (mean over P of KL(p || p_steered)) and ``exact_logprob``
    (mean over O of the change of log p(opening token))."""
    if logp is None:
        logp, _ = clean_logp(model, ex)
    device = sv.model_device(model)
    pos, opens = ex.row_index()
    targets = torch.tensor(ex.open_targets, dtype=torch.long)
    mask = ex.mask
    out: dict[int, dict[str, float]] = {}
    for layer, u in vectors.items():
        with torch.no_grad():
            steered = hooks.run_with_hooks(model, input_ids=ex.input_ids.to(device), use_cache=False,
                                           fwd_hooks=[(dm.DEFAULT_HOOK.format(layer=layer),
                                                       hooks.add_at(coef * u.to(device), mask.to(device)))]).logits[0]
        logq = _logp(steered[ex.rows]).cpu()
        row = {"exact_kl": float(kl_from_logp(logp[pos], logq[pos]).mean())}
        if len(opens):
            d = logq[opens].gather(-1, targets.unsqueeze(-1)) - logp[opens].gather(-1, targets.unsqueeze(-1))
            row["exact_logprob"] = float(d.mean())
        out[layer] = row
    return out


# --------------------------------------------------------------------------------------------------------------------
# Over examples


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def attribution(model: nn.Module, examples: Sequence[Example], vectors: Mapping[int, torch.Tensor], *,
                coef: float = 1.0, estimates: Sequence[str] = ("fisher", "logprob"),
                progress: Any = None) -> dict[str, Any]:
    """Scores per layer averaged over examples, plus the embedding-layer DiffMean direction of the same positions.

    Returns ``{"layers", "scores": {key: [per layer]}, "embed_direction": tensor, "n_examples", ...}``."""
    bad = [e for e in estimates if e not in ESTIMATES]
    if bad:
        raise ValueError(f"unknown estimates {bad}; choose from {list(ESTIMATES)}")
    layers = sorted(vectors)
    vectors = {layer: vectors[layer] for layer in layers}
    hidden = int(hooks.causal_lm(model).config.hidden_size)
    embed_acc = dm.DiffMeanAccumulator(["hook_embed"], hidden, "span")
    per: dict[str, dict[int, list[float]]] = {}

    def put(key: str, layer: int, value: float) -> None:
        per.setdefault(key, {}).setdefault(layer, []).append(value)

    for ex in examples:
        logp, cache = clean_logp(model, ex, ["hook_embed"])
        embed_acc.add(cache["hook_embed"][:, : ex.input_ids.shape[1]].cpu(), ex.encoded)
        if "fisher" in estimates:
            for layer, row in fisher_scores(model, ex, vectors, coef, logp).items():
                for k, v in row.items():
                    put(k, layer, v)
        if "logprob" in estimates:
            for layer, v in logprob_scores(model, ex, vectors, coef).items():
                put("logprob", layer, v)
        if "exact" in estimates:
            for layer, row in exact_scores(model, ex, vectors, coef, logp).items():
                for k, v in row.items():
                    put(k, layer, v)
        if progress is not None:
            progress(1)
    scores = {k: [_mean(per[k].get(layer, [])) for layer in layers] for k in per}
    if "logprob" not in scores and "logprob_jvp" in scores:
        scores["logprob"] = scores["logprob_jvp"]
    label_dirs = embed_acc.labels
    embed_dir = embed_acc.raw_vectors(label_dirs[0])[0] if label_dirs else None
    return {
        "layers": layers,
        "scores": scores,
        "embed_direction": embed_dir,
        "n_examples": len(examples),
        "n_positions": sum(len(e.positions) for e in examples),
        "n_open_positions": sum(len(e.open_positions) for e in examples),
    }


def embedding_cosines(model: nn.Module, vectors: Mapping[int, torch.Tensor], chunk: int = 16384) -> dict[int, float]:
    """Per layer, the max |cosine| of ``u_l`` with any row of the input embedding matrix."""
    emb = hooks.causal_lm(model).get_input_embeddings().weight.detach()
    out = {}
    for layer, u in vectors.items():
        uh = u.to(emb.device).float()
        uh = uh / uh.norm().clamp_min(1e-30)
        best = 0.0
        for i in range(0, emb.shape[0], chunk):
            rows = emb[i: i + chunk].float()
            cos = (rows @ uh) / rows.norm(dim=-1).clamp_min(1e-30)
            best = max(best, float(cos.abs().max()))
        out[layer] = best
    return out


def choose_layer(layers: Sequence[int], scores: Sequence[float], flagged: Iterable[int]) -> tuple[int | None, bool]:
    """Highest-scoring unflagged layer (NaN scores ignored); ``(layer, fell_back)`` where ``fell_back`` says every
    layer was flagged, so the choice is over all layers."""
    flagged = set(flagged)
    cand = [(s, layer) for layer, s in zip(layers, scores) if layer not in flagged and not math.isnan(s)]
    fell_back = not cand
    if fell_back:
        cand = [(s, layer) for layer, s in zip(layers, scores) if not math.isnan(s)]
    if not cand:
        return None, fell_back
    return max(cand)[1], fell_back


def plot(result: Mapping[str, Any], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    from analysis import plots

    layers = result["layers"]
    scores = result["scores"]
    emb = result["embedding"]
    flagged = set(result["flagged_layers"])
    fig, axes = plots.plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax = axes[0]
    for key, style in (("fisher", "o-"), ("exact_kl", "s--")):
        if key in scores:
            ax.plot(layers, scores[key], style, label=key)
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"attribution of '{result['label']}' vectors (c = {result['coef']})")
    ax = axes[1]
    for key, style in (("logprob", "o-"), ("exact_logprob", "s--")):
        if key in scores:
            ax.plot(layers, scores[key], style, label=key)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("d log p(opening token)")
    ax = axes[2]
    ax.plot(layers, emb["max_cos_embedding_rows"], "o-", label="max |cos| with embedding rows")
    if emb.get("cos_embedding_direction") is not None:
        ax.plot(layers, emb["cos_embedding_direction"], "s--", label="|cos| with hook_embed DiffMean")
    ax.axhline(emb["threshold"], color="red", lw=0.8, ls=":", label="threshold")
    ax.set_ylabel("embedding similarity")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        for layer in flagged:
            ax.axvspan(layer - 0.5, layer + 0.5, color="grey", alpha=0.15, lw=0)
        if result.get("chosen_layer") is not None:
            ax.axvline(result["chosen_layer"], color="green", lw=1.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return plots.save(fig, path, dpi=120)


def run_attribution(model: nn.Module, tokenizer: Any, traces: Sequence[Mapping[str, Any]],
                    vectors: Mapping[int, torch.Tensor], *, label: str, spec: dm.PositionSpec = dm.PositionSpec(),
                    coef: float = 1.0, estimates: Sequence[str] = ("fisher", "logprob"), select: str = "fisher",
                    embed_threshold: float = 0.5, skip_first: int = 0, max_length: int | None = None,
                    max_examples: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Everything ``python -m analysis attribution`` computes, as a JSON-able dict."""
    if select not in estimates:
        raise ValueError(f"--select {select} is not among the computed estimates {list(estimates)}")
    examples = make_examples(tokenizer, traces, label, spec, max_length=max_length, max_examples=max_examples)
    if not examples:
        raise ValueError(f"no trace has a span labelled {label!r} with positions inside the trace")
    res = attribution(model, examples, vectors, coef=coef, estimates=estimates, progress=progress)
    layers = res["layers"]
    row_cos = embedding_cosines(model, vectors)
    ed = res.pop("embed_direction")
    dir_cos = [abs(readout.cosine(vectors[layer], ed)) if ed is not None else math.nan for layer in layers]
    flagged = [layer for i, layer in enumerate(layers)
               if layer < skip_first or row_cos[layer] > embed_threshold
               or (not math.isnan(dir_cos[i]) and dir_cos[i] > embed_threshold)]
    key = SCORE_KEY[select]
    chosen, fell_back = choose_layer(layers, res["scores"][key], flagged)
    result = {
        "label": label,
        "coef": coef,
        "positions": spec.describe(),
        "hook": dm.DEFAULT_HOOK,
        "estimates": list(estimates),
        "select_by": key,
        **res,
        "embedding": {"max_cos_embedding_rows": [row_cos[layer] for layer in layers],
                      "cos_embedding_direction": dir_cos, "threshold": embed_threshold, "skip_first": skip_first},
        "flagged_layers": flagged,
        "eligible_layers": [layer for layer in layers if layer not in flagged],
        "all_flagged_fallback": fell_back,
        "chosen_layer": chosen,
    }
    if "fisher" in res["scores"] and "exact_kl" in res["scores"]:
        result["fisher_over_exact_kl"] = [f / e if e else math.nan
                                          for f, e in zip(res["scores"]["fisher"], res["scores"]["exact_kl"])]
    return result


# --------------------------------------------------------------------------------------------------------------------
# CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    p = cli.add_command(subparsers, "attribution", main, __doc__, help="choose the layer of a DiffMean behaviour "
                        "vector by attribution patching (per-layer scores + plot)")
    p.add_argument("--vectors", required=True, metavar="DIR",
                   help="DiffMean checkpoint (or a `diffmean` output directory together with --label)")
    p.add_argument("--traces", required=True, metavar="FILE", help="labelled traces (JSONL, docs/diffmean.md)")
    p.add_argument("--label", default=None, help="behaviour label (default: the checkpoint's)")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="the model to be steered (default: the base recorded in the checkpoint)")
    cli.add_position_args(p, default=None)
    p.add_argument("--estimates", nargs="+", default=["fisher", "logprob"], choices=ESTIMATES,
                   help="which estimates to compute (default: fisher logprob; add exact for the ground truth)")
    p.add_argument("--select", default="fisher", choices=ESTIMATES, help="estimate the layer is chosen by")
    p.add_argument("--coef", type=float, default=1.0, help="scale c of the vector (c * u is added)")
    p.add_argument("--embed-threshold", type=float, default=0.5,
                   help="flag layers whose vector has |cosine| above this with an embedding row or with the "
                   "hook_embed DiffMean direction (default 0.5)")
    p.add_argument("--skip-first", type=int, default=0, metavar="N", help="also flag the first N layers")
    p.add_argument("--max-examples", type=int, default=0, help="use at most N traces with the label (0: all)")
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    cli.add_model_device_args(p)
    p.add_argument("--out", required=True, metavar="DIR")


def main(args: argparse.Namespace) -> int:
    if args.select not in args.estimates:
        raise UsageError(f"--select {args.select} must be one of --estimates {args.estimates}")
    if args.coef == 0 or not math.isfinite(args.coef):
        raise UsageError(f"--coef {args.coef}: give a finite non-zero scale")
    if not 0 <= args.embed_threshold <= 1:  # a |cosine|; also refuses nan
        raise UsageError(f"--embed-threshold must be in [0, 1], got {args.embed_threshold}")
    if args.skip_first < 0 or args.max_examples < 0:
        raise UsageError(f"--skip-first and --max-examples must be >= 0, got {args.skip_first}, {args.max_examples}")
    if args.max_length is not None:
        cli.check_positive(args, "max_length")
    ckpt = cli.resolve_vectors(args.vectors, args.label)
    meta = dm.diffmean_meta(ckpt) or {}
    label = args.label or meta.get("label")
    if not label:
        raise UsageError(f"--vectors {ckpt} records no DiffMean label; pass --label")
    spec = cli.position_spec(args, meta.get("positions"))
    traces = cli.read_traces_arg(args.traces)
    if not any(sp["label"] == label for t in traces for sp in t["spans"]):
        raise UsageError(f"--traces {args.traces}: no span is labelled {label!r} "
                         f"(labels present: {sorted(dm.trace_labels(traces))})")
    model_id = cli.base_model_id(args.model, ckpt)
    # The vectors against the model's config.json: refused before --out is made or any weights load.
    vectors = cli.checkpoint_vectors(ckpt)
    cli.check_vectors_fit(vectors, cli.model_config(model_id), f"--vectors {ckpt}")
    # The spans as this tokenizer clips them (a tokenizer is cheap; the weights are not).
    if not make_examples(sv.load_tokenizer(model_id), traces, label, spec, max_length=args.max_length,
                         max_examples=1):
        raise UsageError(f"--traces {args.traces}: no span labelled {label!r} keeps a position inside its trace "
                         f"(clipped at the trace start{' or by --max-length' if args.max_length else ''})")
    out = output.prepare_out(args.out, inputs=[ckpt, args.traces])
    model, tokenizer = cli.load_plain(model_id, args, attn="eager")
    result = run_attribution(model, tokenizer, traces, vectors, label=label, spec=spec, coef=args.coef,
                             estimates=args.estimates, select=args.select, embed_threshold=args.embed_threshold,
                             skip_first=args.skip_first, max_length=args.max_length,
                             max_examples=args.max_examples or None)
    result.update({"vectors": str(ckpt), "model": model_id, "traces": str(args.traces)})
    result["plot"] = str(plot(result, out / "attribution.png"))
    s = result["scores"][result["select_by"]]
    print(f"attribution of {label!r}: {result['select_by']} per layer = "
          + ", ".join(f"{layer}:{v:.3g}" for layer, v in zip(result["layers"], s)), file=sys.stderr)
    print(f"flagged (embedding-like): {result['flagged_layers']}; chosen layer: {result['chosen_layer']}",
          file=sys.stderr)
    return output.finish(out, result)
