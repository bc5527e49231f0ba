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
    cli.check_args(args)
    if args.backend == "vllm":
        raise UsageError("token-scaling gates the vectors per token with forward hooks, which vLLM does not run; use "
                         "--backend hf")
    if not ts.checkpoint_has_gates(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no {ts.GATE_FILE}; it was not trained with "
                         "token_scaling: true")
    base_id = cli.base_model_id(args.model, args.checkpoint)
    benches = cli.load_benchmarks(cli.benchmark_specs(args), args)
    out = output.prepare_out(args.out)
    base, tokenizer = cli.load_plain(base_id, args)
    try:
        model = ts.load_token_scaled_model(args.checkpoint, base=base)
    except sv.SteeringError as e:
        raise UsageError(str(e)) from None
    device = next(base.parameters()).device
    model.to(device).eval()
    vectors = sv.get_vectors(model)
    gates = ts.gates(model)
    layers = sorted(gates)
    norms = {layer: float(vectors[layer].norm()) for layer in layers}
    total_norm = sum(norms.values()) or 1.0
    tmpl = cli.template(args)
    problems = _common.problems_of(benches)
    seqs = _common.sample_sequences(model, tokenizer, problems, tmpl, settings.from_args(args),
                              progress=not args.no_progress)
    alphas = record(model, seqs, batch_size=args.forward_batch_size, pad=pad_id_of(tokenizer), quiet=args.no_progress)

    seg_rho: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    seg_alpha: dict[str, dict[int, list[float]]] = {s: {layer: [] for layer in layers} for s in SEGMENTS}
    all_alpha: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    tokens_all, examples, rhos_all = [], [], []
    for row in range(len(seqs)):
        n_p = len(seqs.prompt_ids[row])
        q = problems[seqs.problem[row]]["question"]
        segs = prompt_segments(tokenizer, seqs.prompts[row], q, n_p) + ["generation"] * len(seqs.completion_ids[row])
        ids = seqs.prompt_ids[row] + seqs.completion_ids[row]
        stack = torch.stack([alphas[row][layer] for layer in layers])  # (layers, len)
        rho = (stack * torch.tensor([norms[layer] for layer in layers])[:, None]).sum(0) / total_norm
        texts = _common.decode_tokens(tokenizer, ids)
        for t, (seg, r) in enumerate(zip(segs, rho.tolist())):
            seg_rho[seg].append(r)
            for k, layer in enumerate(layers):
                seg_alpha[seg][layer].append(float(stack[k, t]))
            tokens_all.append({"token": texts[t], "relative_magnitude": r, "segment": seg, "sequence": row,
                               "position": t})
        rhos_all.append(rho)
        for k, layer in enumerate(layers):
            all_alpha[layer].append(stack[k])
        if len(examples) < args.examples:
            examples.append({"tokens": texts, "segments": segs, "relative_magnitude": rho.tolist(),
                             "alpha": {str(layer): stack[k].tolist() for k, layer in enumerate(layers)}})

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    segments = {s: {"num_tokens": len(seg_rho[s]), "mean_relative_magnitude": mean(seg_rho[s]),
                    "mean_alpha": {str(layer): mean(seg_alpha[s][layer]) for layer in layers}} for s in SEGMENTS}
    alpha_stats = {}
    for layer in layers:
        a = torch.cat(all_alpha[layer])
        alpha_stats[str(layer)] = {"mean": float(a.mean()), "std": float(a.std()) if a.numel() > 1 else 0.0,
                                   "min": float(a.min()), "max": float(a.max())}
    rho_cat = torch.cat(rhos_all)
    top_n = max(1, int(round(0.1 * rho_cat.numel())))
    conc = float(rho_cat.sort(descending=True).values[:top_n].sum() / rho_cat.sum()) if rho_cat.sum() > 0 else None
    top = sorted(tokens_all, key=lambda x: -x["relative_magnitude"])[: args.k]

    files = [plots.token_highlight(out / "highlight.png", [], [], value_label="relative magnitude ρ(t)", cmap="Reds",
                                   blocks=[(f"sequence {i}", e["tokens"], e["relative_magnitude"], e["segments"])
                                           for i, e in enumerate(examples)]).name]
    present = [s for s in SEGMENTS if segments[s]["num_tokens"]]
    files.append(plots.heatmap(out / "segments.png",
                               [[segments[s]["mean_alpha"][str(layer)] for s in present] for layer in layers],
                               layers, present, title="mean α_l(t) per layer and prompt segment", xlabel="segment",
                               ylabel="layer", cmap="viridis").name)
    if examples:
        ex = examples[0]
        files.append(plots.heatmap(out / "alpha_example.png", [ex["alpha"][str(layer)] for layer in layers], layers,
                                   [plots.show_token(t, 6) for t in ex["tokens"]], title="α_l(t), first sequence",
                                   xlabel="token", ylabel="layer", cmap="viridis", annotate=False).name)
    result = {"command": "token-scaling", "checkpoint": str(args.checkpoint), "base_model": base_id,
              "layers": layers, "formula": ts.FORMULA, "vector_norms": {str(k): v for k, v in norms.items()},
              "gate": {"weight_norms": {str(layer): float(g.weight.detach().norm()) for layer, g in gates.items()},
                       "biases": {str(layer): float(g.bias.detach()) for layer, g in gates.items()}},
              "alpha_stats": alpha_stats, "segments": segments, "concentration": {"top_10pct_share": conc},
              "top_tokens": top, "examples": examples, "num_sequences": len(seqs), "num_tokens": len(tokens_all),
              "settings": settings.record(args), "plots": files}
    return output.finish(out, result, f"token-scaling: {len(tokens_all)} tokens; "
                      + ", ".join(f"{s} ρ={segments[s]['mean_relative_magnitude']:.3f}" for s in present))
