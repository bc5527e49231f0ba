"""``python -m analysis unembed-similarity``: do vectors at different layers shift the final residual the same way?

For each steering layer ``i`` (its checkpoint vector alone), the token-mean shift of the last layer's output *before
the final norm*::

    m_i = mean_t [resid_post_{L-1}(steered at i only)(t) − resid_post_{L-1}(unsteered)(t)]

over sampled prompt+completion tokens. Reported: the i×i cosine matrix ``cos(m_i, m_j)``, and the logit lens of each
``m_i`` (top / bottom tokens and their non-Latin / non-English share, as in ``logit-lens``). The shift with *all* the
checkpoint's vectors together, ``m_all``, is added as a last row/column ("all"). The paper's finding: the shifts of
layers < L−1 look alike (a shared effect on the unembedding), the last layer's does something else, and mid layers push
non-English tokens down.

result.json::

    {"command": "unembed-similarity", "checkpoint", "base_model", "lens", "k",
     "labels": ["0", "1", ..., "all"],                 # rows/columns of the matrix: steering layers, then all
     "steer_layers": [i...], "cosine": [[...]],         # cos(m_a, m_b) over labels
     "shift_norms": {label: ‖m‖},
     "readouts": [{"label", "layer" (null for all), "norm", "top", "bottom", *shares}, ...],
     "vocab": {...}, "num_sequences", "num_tokens", "positions", "completions_from", "settings", "plots"}

Plots: ``cosine.png`` (the matrix), ``top_tokens.png`` / ``bottom_tokens.png`` (lens of each shift),
``non_latin_share.png`` (per layer, among the bottom/top k).
"""

from __future__ import annotations

import argparse

import torch

from analysis import _common
from analysis import logit_lens
from analysis import persistence
from analysis import plots
from analysis import cli, output, settings
from steering import hooks
from steering import readout
from steering.generation import pad_id_of


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "unembed-similarity", run, __doc__, forward_batch=True,
                                   max_new_tokens=512, help="cosine matrix of the mean final-layer shifts caused by "
                                   "each layer's vector, and their logit lens")
    p.add_argument("--layers", default=None, help="steering layers (default: every layer the checkpoint steers)")
    p.add_argument("--k", type=int, default=20, help="top / bottom tokens per shift (default 20)")
    p.add_argument("--lens", choices=logit_lens.LENSES, default="norm", help="how a shift is read out (see logit-lens)")
    p.add_argument("--no-all", action="store_true", help="skip the all-vectors shift")
    persistence.add_sequence_args(p)


def run(args: argparse.Namespace) -> int:
    cli.check_positive(args, "k")
    o = cli.open_checkpoint(args, layers=args.layers)
    model, tokenizer, vectors, out, steer = o.model, o.tokenizer, o.vectors, o.out, o.layers
    last = o.num_layers - 1
    seqs = persistence.sample_for_analysis(model, tokenizer, vectors, args, o.benches)
    pad = pad_id_of(tokenizer)
    stats = persistence.shift_stats(model, seqs, vectors, steer, [last], positions=args.positions,
                                    batch_size=args.forward_batch_size, pad=pad, quiet=args.no_progress)
    shifts = [stats[i][last].mean.float() for i in steer]
    labels = [str(i) for i in steer]
    count = stats[steer[0]][last].count
    if not args.no_all:
        with _common.use_vectors(model, vectors):
            m_all, _ = logit_lens.final_shift(model, seqs, positions=args.positions, batch_size=args.forward_batch_size,
                                              pad=pad, quiet=args.no_progress)
        shifts.append(m_all.float().cpu())
        labels.append("all")
    cos = readout.none_for_nan(readout.cosine_matrix(shifts))  # null where a shift is zero
    vocab = logit_lens.Vocab(tokenizer, hooks.causal_lm(model).lm_head.weight.shape[0])
    device = next(model.parameters()).device
    readouts = []
    with torch.no_grad():
        for label, m in zip(labels, shifts):
            readouts.append({"label": label, "layer": None if label == "all" else int(label), "norm": float(m.norm()),
                             **logit_lens.readout(logit_lens.lens(model, m.to(device), args.lens), vocab, args.k)})
    files = [plots.heatmap(out / "cosine.png", cos, labels, labels, cmap="RdBu_r", vmin=-1, vmax=1,
                           title="cos of mean final-layer shifts (before final norm)", xlabel="steering layer",
                           ylabel="steering layer").name]
    files += logit_lens.token_tables(out, [f"L{r['label']}" if r["layer"] is not None else "all" for r in readouts],
                                     readouts, min(args.k, 12), "each layer's final-residual shift", f"{args.lens} lens")
    per_layer = [r for r in readouts if r["layer"] is not None]
    files.append(logit_lens.share_plot(out / "non_latin_share.png", [r["layer"] for r in per_layer], per_layer, vocab, args.k,
                                       f"non-Latin share among the top/bottom-{args.k} tokens of each layer's shift").name)
    result = {"command": "unembed-similarity", "checkpoint": str(args.checkpoint), "base_model": o.base_id,
              "lens": args.lens, "k": args.k, "labels": labels, "steer_layers": steer, "cosine": cos,
              "shift_norms": {label: float(m.norm()) for label, m in zip(labels, shifts)}, "readouts": readouts,
              "vocab": vocab.shares(), "num_sequences": len(seqs), "num_tokens": count, "positions": args.positions,
              "completions_from": args.completions_from, "settings": settings.record(args), "plots": files}
    return output.finish(out, result, f"unembed-similarity: {len(steer)} layers over {count} tokens")
