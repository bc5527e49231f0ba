"""``python -m analysis logit-lens``: read each steering vector, and the shift it causes in the final residual, through
the unembedding.

For every steered layer ``l`` the vector ``s_l`` is mapped to vocabulary scores by the *lens* (default ``norm``: the
model's final norm, then ``lm_head`` -- exactly how the model reads its last residual, so the lens of the last
layer's residual is the model's own logits). The top-k and bottom-k tokens are reported, and, among them, the share of
non-English / non-Latin tokens (the paper's finding: mid-layer vectors push such tokens *down*).

Unless ``--no-shift``, the same readout is made of the *steering-induced shift of the final residual*: the token-mean
of ``resid_post_{L-1}(steered) − resid_post_{L-1}(unsteered)`` (before the final norm) over sampled prompt+completion
tokens, with all the checkpoint's vectors on.

Token classes (of each token's decoded text): *non-Latin* = has a letter of a non-Latin script (CJK, Cyrillic,
Arabic, ...) or is an incomplete UTF-8 piece (byte-level BPE fragments of such characters decode to U+FFFD);
*non-English* = non-Latin, or has any letter outside ASCII a-z/A-Z (accented Latin). Ids beyond the tokenizer's
vocabulary (padding rows of the embedding matrix) are never ranked.

result.json::

    {"command": "logit-lens", "checkpoint", "base_model", "lens", "k",
     "vocab": {"size", "non_latin_share", "non_english_share"},      # baseline over the whole vocabulary
     "layers": [{"layer", "vector_norm",
                 "top": [{"token_id", "token", "value"}, ...k],  "bottom": [...k],   # bottom[0] = lowest
                 "top_non_latin_share", "top_non_english_share",
                 "bottom_non_latin_share", "bottom_non_english_share"}, ...],
     "final_shift": null | {"num_sequences", "num_tokens", "positions", "norm", "top", "bottom", *shares},
     "plots": [...]}

Plots: ``top_tokens.png`` / ``bottom_tokens.png`` (layer × rank tables coloured by lens value),
``non_latin_share.png`` (per-layer share of non-Latin / non-English tokens among the bottom and top k, against the
vocabulary baseline).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from analysis import _common
from analysis import plots
from analysis import cli, output, settings
from analysis.cli import UsageError
from steering import hooks
from steering import vectors as sv
from steering.generation import pad_id_of
from steering.readout import LENSES, Vocab, lens, readout, token_class, vector_lens

# The lens, the token classes and the top / bottom readout live in the core (``steering.readout``), where the training
# probes call them too; re-exported here under the names the other analyses import.
__all__ = ["LENSES", "Vocab", "final_shift", "lens", "readout", "register", "run", "share_plot", "token_class", "token_tables"]


# --------------------------------------------------------------------------------------------------------------------
# Library


@torch.no_grad()
def final_shift(model: nn.Module, seqs: _common.Sequences, *, positions: str = "all", batch_size: int = 8,
                pad: int = 0, quiet: bool = False) -> tuple[torch.Tensor, int]:
    """Token-mean of ``resid_post_{L-1}(steered) − resid_post_{L-1}(unsteered)`` with the model's current vectors."""
    last = f"blocks.{hooks.num_layers(model) - 1}.hook_resid_post"
    device = next(model.parameters()).device
    total, count = None, 0
    for batch in output.progress(seqs.batches(batch_size, device, pad), desc="final shift",
                                 total=-(-len(seqs) // batch_size), quiet=quiet):
        _, steered = hooks.run_with_cache(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          names=[last], logits_to_keep=1)
        with sv.steering_disabled(model):
            _, base = hooks.run_with_cache(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           names=[last], logits_to_keep=1)
        mask = batch.positions(positions)
        delta = (steered[last].float() - base[last].float())[mask]
        s = delta.sum(0)
        total = s if total is None else total + s
        count += int(mask.sum())
    if total is None or count == 0:
        raise UsageError("no tokens to average the final-residual shift over")
    return total / count, count


def share_plot(path: Any, labels: Sequence[Any], entries: Sequence[dict[str, Any]], vocab: Vocab, k: int,
               title: str) -> Any:
    base = vocab.shares()
    return plots.line_plot(
        path, list(labels),
        {f"bottom-{k} non-Latin": [e["bottom_non_latin_share"] for e in entries],
         f"bottom-{k} non-English": [e["bottom_non_english_share"] for e in entries],
         f"top-{k} non-Latin": [e["top_non_latin_share"] for e in entries]},
        hlines={"vocabulary non-Latin": base["non_latin_share"], "vocabulary non-English": base["non_english_share"]},
        title=title, xlabel="layer", ylabel="share of tokens", ylim=(-0.02, 1.02))


def token_tables(out: Any, labels: Sequence[str], entries: Sequence[dict[str, Any]], k: int, what: str,
                 value_label: str) -> list[str]:
    files = []
    for side in ("top", "bottom"):
        rows = [(label, [(t["token"], t["value"]) for t in e[side][:k]]) for label, e in zip(labels, entries)]
        path = plots.token_table(out / f"{side}_tokens.png", rows, value_label=value_label,
                                 title=f"{side}-{k} tokens of {what}")
        files.append(path.name)
    return files


# --------------------------------------------------------------------------------------------------------------------
# Command


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "logit-lens", run, __doc__, forward_batch=True, max_new_tokens=512,
                                   help="each layer's vector (and the final-residual shift) through the "
                                        "unembedding: top/bottom tokens, non-English share")
    p.add_argument("--k", type=int, default=20, help="top / bottom tokens per layer (default 20)")
    p.add_argument("--lens", choices=LENSES, default="norm", help="norm: final norm + lm_head (default); raw: lm_head "
                   "only; cosine: cosine with the unembedding rows")
    p.add_argument("--layers", default=None, help="layers to read (default: every steered layer), e.g. 0,5,10-12")
    p.add_argument("--no-shift", action="store_true", help="skip the final-residual shift (needs no problems)")
    p.add_argument("--positions", choices=["all", "prompt", "completion"], default="all",
                   help="tokens the final-residual shift is averaged over (default all)")


def run(args: argparse.Namespace) -> int:
    cli.check_positive(args, "k")
    o = cli.open_checkpoint(args, benchmarks=not args.no_shift, layers=args.layers)
    model, tokenizer, vectors, out, layers = o.model, o.tokenizer, o.vectors, o.out, o.layers
    vocab = Vocab.of(model, tokenizer)
    entries = [vector_lens(model, layer, vectors[layer], vocab, args.k, args.lens)
               for layer in output.progress(layers, desc="logit lens", quiet=args.no_progress)]

    shift_entry = None
    if not args.no_shift:
        tmpl = cli.template(args)
        problems = _common.problems_of(o.benches)
        with _common.use_vectors(model, vectors):
            seqs = _common.sample_sequences(model, tokenizer, problems, tmpl, settings.from_args(args),
                                            progress=not args.no_progress)
            shift, count = final_shift(model, seqs, positions=args.positions, batch_size=args.forward_batch_size,
                                       pad=pad_id_of(tokenizer), quiet=args.no_progress)
        with torch.no_grad():
            shift_entry = {"num_sequences": len(seqs), "num_tokens": count, "positions": args.positions,
                           "norm": float(shift.norm()), **readout(lens(model, shift, args.lens), vocab, args.k)}

    labels = [f"L{e['layer']}" for e in entries] + (["shift"] if shift_entry else [])
    files = token_tables(out, labels, entries + ([shift_entry] if shift_entry else []), min(args.k, 12),
                         "each layer's vector" + (" and the final-residual shift" if shift_entry else ""),
                         f"{args.lens} lens")
    files.append(share_plot(out / "non_latin_share.png", [e["layer"] for e in entries], entries, vocab, args.k,
                            f"non-Latin / non-English share among each vector's top/bottom-{args.k} tokens").name)
    result = {"command": "logit-lens", "checkpoint": str(args.checkpoint), "base_model": o.base_id, "lens": args.lens,
              "k": args.k, "vocab": vocab.shares(), "layers": entries, "final_shift": shift_entry,
              "settings": settings.record(args) if shift_entry else None, "plots": files}
    return output.finish(out, result, f"logit-lens: {len(entries)} layers")
