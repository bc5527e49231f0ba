"""``python -m analysis behavior``: steer with ``c * u`` at one layer and count behaviours in the generations.

Loads the model to be steered (``--model``, default: the base recorded in ``--vectors``), puts the DiffMean vector
``u_l`` of the chosen layer (``--layer``, or the ``chosen_layer`` of an ``attribution`` ``result.json``) on it as a
real steering vector (the BEFT ``down_proj`` bias of layer ``l``, i.e. added to ``blocks.{l}.hook_resid_post`` at
every position, prompt and generated), and for each coefficient ``c`` in ``--coefs`` (default ``-1 0 1``) generates
one completion per held-out procedural task. ``c = 0`` is exactly the unsteered model.

Each completion is split into sentences and labelled by the annotator (``--annotator heuristic|chat``); a sentence
takes the label whose spans cover most of it, or ``none``. The command reports, per coefficient, the number of
sentences per label and their fractions (which sum to 1 with ``none``), and the change of the target label's
fraction against ``c = 0``.

Writes ``OUT/result.json``, ``OUT/behavior.png`` (grouped bars: fraction of sentences per label and coefficient) and
``OUT/generations.jsonl`` (every completion with its spans).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis import cli, output, settings
from analysis._common import sample_texts
from analysis.cli import UsageError
from steering import vectors as sv


def register(subparsers: argparse._SubParsersAction) -> None:
    p = cli.add_command(subparsers, "behavior", main, __doc__, help="generate with +c*u / 0 / -c*u at one layer "
                        "and report the fraction of sentences per behaviour label")
    p.add_argument("--vectors", required=True, metavar="DIR",
                   help="DiffMean checkpoint (or a `diffmean` output directory together with --label)")
    p.add_argument("--label", default=None, help="target behaviour (default: the checkpoint's DiffMean label)")
    layer = p.add_mutually_exclusive_group(required=True)
    layer.add_argument("--layer", type=int, help="layer to steer")
    layer.add_argument("--attribution", metavar="RESULT_JSON",
                       help="take the chosen_layer of an `analysis attribution` result.json")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="the model to steer (default: the base recorded in --vectors)")
    p.add_argument("--coefs", type=float, nargs="+", default=[-1.0, 0.0, 1.0],
                   help="steering coefficients c (c * u is added; default -1 0 1)")
    cli.add_model_device_args(p)
    p.add_argument("--out", required=True, metavar="DIR")
    cli.add_generation_args(p, n_default=50)
    cli.add_annotator_args(p)


def chosen_layer_from(path: str) -> int:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--attribution {path}: no such file")
    try:
        layer = json.loads(p.read_text()).get("chosen_layer")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(f"--attribution {path}: not an attribution result.json ({e})") from None
    if not isinstance(layer, int):
        raise UsageError(f"--attribution {path}: has no integer chosen_layer")
    return layer


def summarize(texts: Sequence[str], spans: Sequence[Sequence[Mapping[str, Any]]],
              labels: Sequence[str]) -> dict[str, Any]:
    from steering.annotate import fractions, label_counts

    counts = label_counts(texts, spans, labels)
    return {"n_generations": len(texts), "n_sentences": sum(counts.values()), "counts": counts,
            "fractions": fractions(counts)}


def plot(result: Mapping[str, Any], path: Path) -> Path:
    from analysis import plots

    keys = list(result["labels"]) + ["none"]
    runs = result["runs"]
    width = 0.8 / max(1, len(runs))
    fig, ax = plots.plt.subplots(figsize=(max(7, 1.3 * len(keys)), 4.5))
    for i, run in enumerate(runs):
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [run["fractions"].get(k, 0.0) for k in keys], width, label=f"c = {run['coef']:g}")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=20, ha="right")
    target = result.get("label")
    if target in keys:
        ax.get_xticklabels()[keys.index(target)].set_fontweight("bold")
    ax.set_ylabel("fraction of sentences")
    ax.set_title(f"'{target}' vector at layer {result['layer']} ({result['annotator']} annotator)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plots.save(fig, path, dpi=120)


def main(args: argparse.Namespace) -> int:
    from steering import diffmean as dm
    from steering.annotate import LABELS

    # ---- checks before any model loads
    ckpt = cli.resolve_vectors(args.vectors, args.label)
    meta = dm.diffmean_meta(ckpt) or {}
    label = args.label or meta.get("label")
    layer = args.layer if args.layer is not None else chosen_layer_from(args.attribution)
    vectors = cli.checkpoint_vectors(ckpt)
    if layer not in vectors:
        raise UsageError(f"layer {layer}: {ckpt} has vectors for layers {sorted(vectors)} only")
    if not args.coefs or not all(math.isfinite(c) for c in args.coefs):
        raise UsageError(f"--coefs {args.coefs}: give one or more finite coefficients")
    cli.check_generation_args(args, args.n)
    model_id = cli.base_model_id(args.model, ckpt)
    config = cli.model_config(model_id, "--model")
    try:
        sv.check_fits({layer: vectors[layer]}, config, f"--vectors {ckpt} (layer {layer})",
                      target=f"--model {model_id}")
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None
    annotator = cli.make_annotator_arg(args)
    out = output.prepare_out(args.out, inputs=[ckpt, args.attribution])

    # ---- one steered model; c scales its vector in place (c = 0: exactly the base)
    base, tokenizer = cli.load_plain(model_id, args)
    model = sv.attach_steering(base, layers=[layer], init={layer: vectors[layer]}, base_model_id=model_id).eval()
    rows = cli.heldout_questions(args, args.n)
    questions = [r["question"] for r in rows]
    labels = list(LABELS)
    if label and label not in labels:
        labels.append(label)
    runs = []
    gen_path = out / "generations.jsonl"
    tmp = gen_path.with_name(f".{gen_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for coef in args.coefs:
            with sv.steering_scale(model, coef):
                prompts, texts = sample_texts(model, tokenizer, questions, args.template,
                                              settings.sampling_params(args), seed=args.seed,
                                              batch_size=args.gen_batch_size)
            spans = [annotator.annotate(t) for t in texts]
            run = {"coef": coef, **summarize(texts, spans, labels)}
            runs.append(run)
            for q, t, s in zip(questions, texts, spans):
                f.write(json.dumps({"coef": coef, "question": q, "completion": t, "spans": s}) + "\n")
            print(f"c = {coef:g}: {run['n_sentences']} sentences, "
                  + ", ".join(f"{k} {v:.2f}" for k, v in run["fractions"].items() if v), file=sys.stderr)
    tmp.replace(gen_path)
    zero = next((r for r in runs if r["coef"] == 0), None)
    result: dict[str, Any] = {
        "vectors": str(ckpt), "model": model_id, "label": label, "layer": layer,
        "vector_norm": float(vectors[layer].norm()), "coefs": list(args.coefs), "task": args.task, "n": args.n,
        "seed": args.seed, "template": args.template,
        "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                     "top_k": args.top_k},
        "annotator": args.annotator if args.annotator != "chat" else f"chat:{args.annotator_model}",
        "labels": labels, "runs": runs,
    }
    if getattr(annotator, "stats", None):
        result["annotator_stats"] = dict(annotator.stats)
    if label and zero is not None:
        result["target_fraction_change"] = {f"{r['coef']:g}": r["fractions"].get(label, 0.0)
                                            - zero["fractions"].get(label, 0.0) for r in runs}
    result["plot"] = str(plot(result, out / "behavior.png"))
    result["generations"] = str(gen_path)
    return output.finish(out, result)
