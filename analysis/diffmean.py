"""``python -m analysis diffmean``: Difference-of-Means behaviour vectors, written as steering checkpoints.

Reads labelled traces (``--traces FILE``, JSONL, see docs/diffmean.md), or generates them with ``--model`` on
procedural tasks and labels them with an annotator (``--generate N --annotator heuristic|chat``). Activations are
read at ``blocks.{l}.hook_resid_post`` (the output of layer ``l``, where the steering vector ``s_l`` is added) of
``--activations-model`` (default ``--model``); the vectors steer ``--model``, which must have the same shape.

For every label it writes ``OUT/<label>/``, a normal steering checkpoint (``save_checkpoint``) with one vector per
chosen layer (default: all), loadable with ``load_steered_model`` / ``PeftModel.from_pretrained`` and usable as a
training start (``init_from: OUT/<label>``). Also ``OUT/means.safetensors`` (the positive and negative means),
``OUT/result.json`` and ``OUT/diffmean.png`` (per layer, ``||pos - neg|| / ||mean activation||`` before rescaling).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from analysis import cli, output, settings
from analysis._common import sample_texts
from analysis.cli import UsageError
from steering import diffmean as dm
from steering import vectors as sv

def register(subparsers: argparse._SubParsersAction) -> None:
    p = cli.add_command(subparsers, "diffmean", main, __doc__, help="Difference-of-Means behaviour vectors from "
                        "labelled traces, written as steering checkpoints")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--traces", metavar="FILE",
                     help="labelled traces, JSONL {text, spans: [{start, end, label}], prompt?}")
    src.add_argument("--generate", type=int, metavar="N",
                     help="generate N traces with --model on held-out procedural tasks and label them with --annotator")
    p.add_argument("--model", required=True, metavar="BASE", help="the model the vectors will steer (Hub id / dir)")
    p.add_argument("--activations-model", default=None, metavar="M",
                   help="read activations from this model instead (same layer count and hidden size), e.g. the base "
                   "model of a reasoning model, as Ward et al.")
    p.add_argument("--label", nargs="+", default=None, help="labels to compute (default: every label in the traces)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to write (default: all)")
    cli.add_position_args(p)
    p.add_argument("--weighting", default="span", choices=["span", "token"],
                   help="span: average of per-span means (default); token: pooled over all positive positions")
    p.add_argument("--no-rescale", action="store_true",
                   help="keep pos - neg as is (default: rescale per layer to the norm of the mean activation)")
    p.add_argument("--batch-size", type=int, default=4, help="traces per forward pass (default 4)")
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    cli.add_model_device_args(p)
    p.add_argument("--out", required=True, metavar="DIR")
    cli.add_generation_args(p, n_default=None)
    cli.add_annotator_args(p)


def plot_norms(result: Mapping[str, Any], path: Path) -> Path:
    from analysis import plots

    fig, ax = plots.plt.subplots(figsize=(7, 4))
    layers = result["layers"]
    for label, info in result["labels"].items():
        ax.plot(layers, info["raw_norm_over_mean_norm"], "o-", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("||pos - neg|| / ||mean activation||")
    ax.set_title("DiffMean vectors before rescaling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plots.save(fig, path, dpi=120)


def main(args: argparse.Namespace) -> int:
    spec, steered_cfg, act_id, layers = check_models(args)
    traces = annotator = None
    if args.traces:
        traces = read_labelled_traces(args.traces, args.label)
    else:
        cli.check_generation_args(args, args.generate)
    out = output.prepare_out(args.out, inputs=[args.traces])
    model = tokenizer = None
    if traces is None:
        traces, annotator, (model, tokenizer) = generate_traces(args, out, keep_model=act_id == args.model)
    if model is None:
        model, tokenizer = cli.load_plain(act_id, args)
    acc, labels = collect_means(model, tokenizer, traces, layers=layers, spec=spec, labels=args.label,
                                weighting=args.weighting, batch_size=args.batch_size, max_length=args.max_length)
    neg_norms = write_means(acc, out / "means.safetensors")
    result: dict[str, Any] = {
        "model": args.model, "activations_model": act_id, "hook": dm.DEFAULT_HOOK, "layers": layers,
        "positions": spec.describe(), "weighting": args.weighting, "rescaled": not args.no_rescale,
        "traces": str(args.traces or out / "traces.jsonl"), "summary": acc.summary(),
        "mean_activation_norms": [float(x) for x in neg_norms], "labels": {},
    }
    if args.generate and getattr(annotator, "stats", None):
        result["annotator"] = {"name": args.annotator, "stats": dict(annotator.stats)}
    run_meta = {"model": args.model, "activations_model": act_id, "hook": dm.DEFAULT_HOOK,
                "positions": spec.describe(), "weighting": args.weighting, "rescaled": not args.no_rescale}
    for label in labels:
        result["labels"][label] = write_label_vectors(acc, label, layers, neg_norms, out / label, steered_cfg,
                                                      run_meta)
    result["plot"] = str(plot_norms(result, out / "diffmean.png"))
    for label, info in result["labels"].items():
        print(f"{label}: {info['spans']} spans, {info['positions']} positions -> {info['checkpoint']}",
              file=sys.stderr)
    return output.finish(out, result)


def check_models(args: argparse.Namespace) -> tuple[dm.PositionSpec, Any, str, list[int]]:
    """``(positions, config of --model, activations model id, layers)``, checked without loading weights: the two
    models have the same shape and ``--layers`` exist."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None:
        cli.check_positive(args, "max_length")
    spec = cli.position_spec(args)
    steered_cfg = cli.model_config(args.model, "--model")
    act_id = args.activations_model or args.model
    act_cfg = cli.model_config(act_id, "--activations-model") if args.activations_model else steered_cfg
    try:
        dm.check_same_shape(steered_cfg, act_cfg)
        layers = sv.validate_layers(args.layers, int(steered_cfg.num_hidden_layers))
    except sv.SteeringError as e:
        raise UsageError(str(e)) from None
    return spec, steered_cfg, act_id, layers


def read_labelled_traces(path: str, labels: list[str] | None) -> list[dict[str, Any]]:
    """The traces of ``--traces``, checked to hold labelled spans, and a span of every asked label."""
    traces = cli.read_traces_arg(path)
    present = dm.trace_labels(traces)
    missing = [label for label in (labels or []) if label not in present]
    if missing:
        raise UsageError(f"--label {missing}: no span has this label in {path} "
                         f"(labels present: {sorted(present)})")
    if not present:
        raise UsageError(f"--traces {path}: no labelled spans")
    return traces


def generate_traces(args: argparse.Namespace, out: Path, *, keep_model: bool
                    ) -> tuple[list[dict[str, Any]], Any, tuple[Any, Any]]:
    """``(traces, annotator, (model, tokenizer))``: ``--generate`` traces sampled with ``--model`` on held-out
    problems, labelled by the annotator and written to ``OUT/traces.jsonl``. The generating model comes back when
    ``keep_model`` (it also gives the activations), else ``(None, None)``."""
    from steering.annotate import annotate_traces

    annotator = cli.make_annotator_arg(args)
    gen_model, gen_tok = cli.load_plain(args.model, args)
    rows = cli.heldout_questions(args, args.generate)
    prompts, texts = sample_texts(gen_model, gen_tok, [r["question"] for r in rows], args.template,
                                  settings.sampling_params(args), seed=args.seed, batch_size=args.gen_batch_size)
    kept = (gen_model, gen_tok) if keep_model else (None, None)
    del gen_model  # free the generator before the annotator runs, unless it also gives the activations
    traces = annotate_traces(annotator, texts, prompts,
                             [{"question": r["question"], "answer": r["answer"]} for r in rows])
    dm.write_traces(out / "traces.jsonl", traces)
    if not dm.trace_labels(traces):
        # The command fails, so --out stays as it was; the traces (costly to generate) stay in the staging dir.
        raise UsageError(f"the {args.annotator} annotator labelled no span in the {len(traces)} generated traces "
                         f"(see {output.keep(out) / 'traces.jsonl'}; the next run into --out removes it)")
    return traces, annotator, kept


def collect_means(model: Any, tokenizer: Any, traces: list[dict[str, Any]], *, layers: list[int],
                  spec: dm.PositionSpec, labels: list[str] | None, weighting: str, batch_size: int,
                  max_length: int | None) -> tuple[dm.DiffMeanAccumulator, list[str]]:
    """One streaming pass over the traces: ``(accumulator, labels)``, every label with at least one position."""
    acc = dm.collect(model, tokenizer, traces, layers=layers, spec=spec, labels=labels, weighting=weighting,
                     batch_size=batch_size, max_length=max_length)
    labels = labels or acc.labels
    empty = [label for label in labels if not acc.pos_count.get(label)]
    if empty:
        raise UsageError(f"labels {empty}: every span lost its positions (clipped at the trace start or truncated)")
    return acc, labels


def write_means(acc: dm.DiffMeanAccumulator, path: Path) -> torch.Tensor:
    """Writes the positive and negative means to ``path``; returns the norm of the mean activation per layer."""
    from safetensors.torch import save_file

    save_file(acc.state_dict(), str(path), metadata={"names": ",".join(acc.names)})
    return acc.neg_mean().norm(dim=-1)


def write_label_vectors(acc: dm.DiffMeanAccumulator, label: str, layers: list[int], neg_norms: torch.Tensor,
                        ckpt_dir: Path, steered_cfg: Any, run_meta: Mapping[str, Any]) -> dict[str, Any]:
    """Writes ``label``'s vectors as a steering checkpoint in ``ckpt_dir``; returns its entry of result.json."""
    rescale = run_meta["rescaled"]
    raw = acc.raw_vectors(label)
    u = acc.vectors(label, rescale=rescale)
    meta = {"label": label, **run_meta,
            "spans": acc.n_spans[label], "positions_count": acc.n_positions[label],
            "trace_tokens": acc.neg_count, "traces": acc.n_traces,
            "mean_activation_norms": {str(layer): float(n) for layer, n in zip(layers, neg_norms)},
            "raw_norms": {str(layer): float(x) for layer, x in zip(layers, raw.norm(dim=-1))}}
    ckpt = dm.save_vectors_checkpoint(dm.vectors_by_layer(u, layers), ckpt_dir, steered_cfg,
                                      base_model=run_meta["model"], extra={"diffmean": meta})
    return {
        "checkpoint": str(ckpt), "spans": acc.n_spans[label], "positions": acc.n_positions[label],
        "raw_norms": [float(x) for x in raw.norm(dim=-1)],
        "raw_norm_over_mean_norm": [float(r / m) if m else float("nan")
                                    for r, m in zip(raw.norm(dim=-1), neg_norms)],
        "vector_norms": [float(x) for x in u.norm(dim=-1)],
    }
