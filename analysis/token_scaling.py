"""``python -m analysis token-scaling``: where does a token-scaled checkpoint put its steering magnitude?

A token-scaling checkpoint (trained with ``token_scaling: true``; the gate is :mod:`steering.token_scaling`) adds
``α_l(t) · s_l`` at layer ``l`` and token ``t``, with ``α_l(t) = softplus(w_l · x_l(t)/‖x_l(t)‖ + b_l) / softplus(0)``
(``x_l(t)``: the MLP input; ``α ≡ 1`` is plain steering). On sampled prompt+completion tokens, this command records
every ``α_l(t)`` (teacher-forced, gates on) and reports

- the *relative magnitude* of each token, ``ρ(t) = Σ_l α_l(t) ‖s_l‖ / Σ_l ‖s_l‖`` (1 = plain steering), drawn over
  the text (``highlight.png``);
- per prompt segment -- ``system`` (everything before the question: system message and template markup),
  ``question``, ``generation_prompt`` (the template text after the question, e.g. ``<|im_start|>assistant``) and
  ``generation`` (the sampled completion) -- the mean ``ρ`` and the mean ``α_l`` of every layer
  (``segments.png``: layer × segment);
- the tokens with the largest magnitude, and per-layer statistics of ``α``.

result.json::

    {"command": "token-scaling", "checkpoint", "base_model", "layers": [...], "formula",
     "vector_norms": {l: ‖s_l‖}, "gate": {"weight_norms": {l: ...}, "biases": {l: ...}},
     "alpha_stats": {l: {"mean", "std", "min", "max"}},
     "segments": {name: {"num_tokens", "mean_relative_magnitude", "mean_alpha": {l: ...}}},
     "concentration": {"top_10pct_share": share of Σρ held by the 10% largest tokens},
     "top_tokens": [{"token", "relative_magnitude", "segment", "sequence", "position"}],
     "examples": [{"tokens": [...], "segments": [...], "relative_magnitude": [...]}],
     "num_sequences", "num_tokens", "settings", "plots"}

Plots: ``highlight.png`` (the first examples, each token coloured by ρ, segments underlined), ``segments.png``
(mean α per layer and segment), ``alpha_example.png`` (α over layers × tokens for the first example).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis import _common
from analysis import plots
from analysis import cli, output, settings
from analysis.cli import UsageError
from steering import token_scaling as ts
from steering.generation import pad_id_of
from steering import vectors as sv

SEGMENTS = ("system", "question", "generation_prompt", "generation")


def prompt_segments(tokenizer: Any, prompt: str, question: str, n_prompt_tokens: int) -> list[str]:
    """A segment name per prompt token, from the tokenizer's character offsets of the rendered prompt."""
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    q0 = prompt.rfind(question) if question else -1
    q1 = q0 + len(question)
    out = []
    for a, b in offsets:
        if q0 < 0:
            out.append("system")
        elif b <= q0 or (a == b == 0 and not out):
            out.append("system")
        elif a >= q1:
            out.append("generation_prompt")
        else:
            out.append("question")
    if len(out) != n_prompt_tokens:  # the generation path tokenized differently: fall back to one prompt segment
        return ["system"] * n_prompt_tokens
    return out


@torch.no_grad()
def record(model, seqs: _common.Sequences, *, batch_size: int, pad: int, quiet: bool = False
           ) -> list[dict[int, torch.Tensor]]:
    """``α_l(t)`` per sequence: a list (one per row) of ``{layer: (len,) tensor}``."""
    device = next(model.parameters()).device
    per_row: list[dict[int, torch.Tensor]] = [dict() for _ in range(len(seqs))]
    for batch in output.progress(seqs.batches(batch_size, device, pad), desc="token-scaling", quiet=quiet,
                            total=-(-len(seqs) // batch_size)):
        with ts.record_alphas(model) as rec:
            batch.forward(model, logits_to_keep=1)
        for layer, tensors in rec.items():
            alpha = tensors[-1].float().cpu()  # (B, S)
            for r, row in enumerate(batch.rows):
                per_row[row][layer] = alpha[r, : int(batch.length[r])]
    return per_row


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "token-scaling", run, __doc__, forward_batch=True,
                                   max_new_tokens=512, help="per-token steering magnitude of a token-scaling "
                                   "checkpoint, per prompt segment, drawn over the text")
    p.add_argument("--examples", type=int, default=3, help="sequences drawn over the text (default 3)")
    p.add_argument("--k", type=int, default=20, help="top tokens listed (default 20)")


def run(args: argparse.Namespace) -> int:
    check_gated_checkpoint_args(args)
    base_id = cli.base_model_id(args.model, args.checkpoint)
    benches = cli.load_benchmarks(cli.benchmark_specs(args), args)
    out = output.prepare_out(args.out, inputs=[args.checkpoint])
    model, tokenizer = load_gated_model(args.checkpoint, base_id, args)
    vectors = sv.get_vectors(model)
    gates = ts.gates(model)
    layers = sorted(gates)
    norms = {layer: float(vectors[layer].norm()) for layer in layers}
    tmpl = cli.template(args)
    problems = _common.problems_of(benches)
    seqs = _common.sample_sequences(model, tokenizer, problems, tmpl, settings.from_args(args),
                                    progress=not args.no_progress)
    alphas = record(model, seqs, batch_size=args.forward_batch_size, pad=pad_id_of(tokenizer), quiet=args.no_progress)
    tokens = gather_tokens(tokenizer, seqs, problems, alphas, layers=layers, norms=norms, n_examples=args.examples)
    segments = segment_means(tokens, layers)
    alpha_stats = alpha_statistics(tokens.layer_alpha, layers)
    conc = top_decile_share(torch.cat(tokens.rhos))
    top = sorted(tokens.tokens, key=lambda x: -x["relative_magnitude"])[: args.k]
    present = [s for s in SEGMENTS if segments[s]["num_tokens"]]
    files = draw_plots(out, tokens.examples, segments, present, layers)
    result = {"command": "token-scaling", "checkpoint": str(args.checkpoint), "base_model": base_id,
              "layers": layers, "formula": ts.FORMULA, "vector_norms": {str(k): v for k, v in norms.items()},
              "gate": {"weight_norms": {str(layer): float(g.weight.detach().norm()) for layer, g in gates.items()},
                       "biases": {str(layer): float(g.bias.detach()) for layer, g in gates.items()}},
              "alpha_stats": alpha_stats, "segments": segments, "concentration": {"top_10pct_share": conc},
              "top_tokens": top, "examples": tokens.examples, "num_sequences": len(seqs),
              "num_tokens": len(tokens.tokens), "settings": settings.record(args), "plots": files}
    return output.finish(out, result, f"token-scaling: {len(tokens.tokens)} tokens; "
                         + ", ".join(f"{s} ρ={segments[s]['mean_relative_magnitude']:.3f}" for s in present))


def check_gated_checkpoint_args(args: argparse.Namespace) -> None:
    """The common checks, the HF backend (the gate is a forward hook), and a checkpoint that has readable gates and
    vectors that fit its base."""
    cli.check_args(args)
    cli.check_positive(args, "k")
    if args.examples < 0:
        raise UsageError(f"--examples must be >= 0, got {args.examples}")
    if args.backend == "vllm":
        raise UsageError("token-scaling gates the vectors per token with forward hooks, which vLLM does not run; use "
                         "--backend hf")
    if not ts.checkpoint_has_gates(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no {ts.GATE_FILE}; it was not trained with "
                         "token_scaling: true")
    # The vectors against the base's config.json, and the gates read back (finite, known tensors) and fitted to the
    # same config and to the steered layers: a broken checkpoint is refused before --out is made or any weights load.
    checked = cli.check_checkpoint(args)
    ts.check_gates_fit(ts.load_gate_tensors(args.checkpoint), sv.model_shape(checked.config)[1], checked.vectors,
                       args.checkpoint, "its steered layers")


def load_gated_model(checkpoint: str, base_id: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the base with the checkpoint's vectors and gates, in eval mode on the base's device."""
    base, tokenizer = cli.load_plain(base_id, args)
    try:
        model = ts.load_token_scaled_model(checkpoint, base=base)
    except sv.SteeringError as e:
        raise UsageError(str(e)) from None
    device = next(base.parameters()).device
    model.to(device).eval()
    return model, tokenizer


@dataclass
class TokenMagnitudes:
    """Every token's ``ρ`` and ``α_l``, gathered over all sequences by segment and by layer."""

    seg_rho: dict[str, list[float]]
    seg_alpha: dict[str, dict[int, list[float]]]
    layer_alpha: dict[int, list[torch.Tensor]]  # one (len,) tensor per sequence
    rhos: list[torch.Tensor]  # one (len,) tensor per sequence
    tokens: list[dict[str, Any]]  # {"token", "relative_magnitude", "segment", "sequence", "position"}
    examples: list[dict[str, Any]]  # the first sequences, drawn over the text


def gather_tokens(tokenizer: Any, seqs: _common.Sequences, problems: list[dict[str, Any]],
                  alphas: list[dict[int, torch.Tensor]], *, layers: list[int], norms: dict[int, float],
                  n_examples: int) -> TokenMagnitudes:
    """Each token's segment, ``α_l(t)`` and ``ρ(t) = Σ_l α_l(t) ‖s_l‖ / Σ_l ‖s_l‖``, keeping ``n_examples``
    sequences whole."""
    total_norm = sum(norms.values()) or 1.0
    got = TokenMagnitudes(seg_rho={s: [] for s in SEGMENTS},
                          seg_alpha={s: {layer: [] for layer in layers} for s in SEGMENTS},
                          layer_alpha={layer: [] for layer in layers}, rhos=[], tokens=[], examples=[])
    for row in range(len(seqs)):
        n_p = len(seqs.prompt_ids[row])
        q = problems[seqs.problem[row]]["question"]
        segs = prompt_segments(tokenizer, seqs.prompts[row], q, n_p) + ["generation"] * len(seqs.completion_ids[row])
        ids = seqs.prompt_ids[row] + seqs.completion_ids[row]
        stack = torch.stack([alphas[row][layer] for layer in layers])  # (layers, len)
        rho = (stack * torch.tensor([norms[layer] for layer in layers])[:, None]).sum(0) / total_norm
        texts = _common.decode_tokens(tokenizer, ids)
        for t, (seg, r) in enumerate(zip(segs, rho.tolist())):
            got.seg_rho[seg].append(r)
            for k, layer in enumerate(layers):
                got.seg_alpha[seg][layer].append(float(stack[k, t]))
            got.tokens.append({"token": texts[t], "relative_magnitude": r, "segment": seg, "sequence": row,
                               "position": t})
        got.rhos.append(rho)
        for k, layer in enumerate(layers):
            got.layer_alpha[layer].append(stack[k])
        if len(got.examples) < n_examples:
            got.examples.append({"tokens": texts, "segments": segs, "relative_magnitude": rho.tolist(),
                                 "alpha": {str(layer): stack[k].tolist() for k, layer in enumerate(layers)}})
    return got


def mean_or_none(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def segment_means(tokens: TokenMagnitudes, layers: list[int]) -> dict[str, dict[str, Any]]:
    """Per segment: its token count, mean ``ρ`` and mean ``α_l`` of every layer (``None`` for an empty segment)."""
    return {s: {"num_tokens": len(tokens.seg_rho[s]), "mean_relative_magnitude": mean_or_none(tokens.seg_rho[s]),
                "mean_alpha": {str(layer): mean_or_none(tokens.seg_alpha[s][layer]) for layer in layers}}
            for s in SEGMENTS}


def alpha_statistics(layer_alpha: dict[int, list[torch.Tensor]], layers: list[int]) -> dict[str, dict[str, float]]:
    """Mean, std, min and max of ``α_l`` over every token, per layer."""
    stats = {}
    for layer in layers:
        a = torch.cat(layer_alpha[layer])
        stats[str(layer)] = {"mean": float(a.mean()), "std": float(a.std()) if a.numel() > 1 else 0.0,
                             "min": float(a.min()), "max": float(a.max())}
    return stats


def top_decile_share(rho: torch.Tensor) -> float | None:
    """The share of ``Σρ`` held by the 10% largest tokens (at least one); ``None`` when ``Σρ`` is not positive."""
    top_n = max(1, int(round(0.1 * rho.numel())))
    return float(rho.sort(descending=True).values[:top_n].sum() / rho.sum()) if rho.sum() > 0 else None


def draw_plots(out: Path, examples: list[dict[str, Any]], segments: dict[str, dict[str, Any]], present: list[str],
               layers: list[int]) -> list[str]:
    """highlight.png, segments.png and (with an example) alpha_example.png; returns their file names."""
    files = [plots.token_highlight(out / "highlight.png", [], [], value_label="relative magnitude ρ(t)", cmap="Reds",
                                   blocks=[(f"sequence {i}", e["tokens"], e["relative_magnitude"], e["segments"])
                                           for i, e in enumerate(examples)]).name]
    files.append(plots.heatmap(out / "segments.png",
                               [[segments[s]["mean_alpha"][str(layer)] for s in present] for layer in layers],
                               layers, present, title="mean α_l(t) per layer and prompt segment", xlabel="segment",
                               ylabel="layer", cmap="viridis").name)
    if examples:
        ex = examples[0]
        files.append(plots.heatmap(out / "alpha_example.png", [ex["alpha"][str(layer)] for layer in layers], layers,
                                   [plots.show_token(t, 6) for t in ex["tokens"]], title="α_l(t), first sequence",
                                   xlabel="token", ylabel="layer", cmap="viridis", annotate=False).name)
    return files
