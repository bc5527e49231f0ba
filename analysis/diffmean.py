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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.cli import UsageError, default_device, prepare_out, write_json
from steering import diffmean as dm
from steering import vectors as sv

# --------------------------------------------------------------------------------------------------------------------
# Helpers shared by diffmean / attribution / behavior / similarity


def add_position_args(p: argparse.ArgumentParser, default: str | None = "shift") -> None:
    g = p.add_argument_group("positive positions")
    g.add_argument("--positions", default=default, choices=["shift", "window"],
                   help="shift: span tokens shifted one back [t0-1, t1-1) (Venhoff); window: W tokens starting K "
                   "before the span [t0-K, t0-K+W) (Ward)" + ("" if default else "; default: the checkpoint's"))
    g.add_argument("--window-offset", type=int, default=None, metavar="K",
                   help=f"window start, tokens before the span (default {dm.WARD_OFFSET})")
    g.add_argument("--window-width", type=int, default=None, metavar="W",
                   help=f"window width in tokens (default {dm.WARD_WIDTH})")


def position_spec(args: argparse.Namespace, meta: Mapping[str, Any] | None = None) -> dm.PositionSpec:
    base = dm.PositionSpec.from_meta(meta)
    mode = args.positions or base.mode
    offset = args.window_offset if args.window_offset is not None else base.offset
    width = args.window_width if args.window_width is not None else base.width
    try:
        return dm.PositionSpec(mode, int(offset), int(width))
    except ValueError as e:
        raise UsageError(str(e)) from None


def read_traces_arg(path: str) -> list[dict[str, Any]]:
    try:
        traces = dm.load_traces(path)
    except dm.TraceError as e:
        raise UsageError(f"--traces: {e}") from None
    if not traces:
        raise UsageError(f"--traces {path}: no traces")
    return traces


def resolve_vectors(path: str, label: str | None = None) -> Path:
    """A checkpoint directory from ``--vectors``: the directory itself, or its ``<label>`` subdirectory (a
    ``diffmean`` output), or its only checkpoint subdirectory."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--vectors {path}: no such directory")
    if sv.is_checkpoint(p):
        return p
    subs = sorted(d.name for d in p.iterdir() if d.is_dir() and sv.is_checkpoint(d))
    if label and label in subs:
        return p / label
    if not label and len(subs) == 1:
        return p / subs[0]
    if not subs:
        raise UsageError(f"--vectors {path}: not a steering checkpoint and holds none")
    raise UsageError(f"--vectors {path} holds checkpoints {subs}; choose one with --label"
                     + (f" (no {label!r} among them)" if label else ""))


def steered_model_id(model: str | None, ckpt: Path) -> str:
    if model:
        return model
    base = sv.read_meta(ckpt).get("base_model")
    if not base:
        raise UsageError(f"{ckpt} records no base model; pass --model")
    return base


def load_checkpoint_vectors(ckpt: Path) -> dict[int, torch.Tensor]:
    try:
        return sv.load_vectors(ckpt)
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None


def check_vectors_fit(vectors: Mapping[int, torch.Tensor], model: nn.Module, ckpt: Any) -> None:
    try:
        sv.check_fits(vectors, model, source=f"--vectors {ckpt}")
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None


def load_config(model_id: str, flag: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, HF errors)
        raise UsageError(f"{flag} {model_id}: cannot read its config ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        sv.check_supported(config)
    except sv.SteeringError as e:
        raise UsageError(f"{flag} {model_id}: {e}") from None
    return config


def load_plain(model_id: str, dtype: str, device: str, attn: str | None = None):
    """(frozen base model, fast tokenizer) on ``device``."""
    model = sv.load_base_model(model_id, dtype=dtype, attn_implementation=attn).to(device).eval()
    return model, sv.load_tokenizer(model_id)


def add_annotator_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("annotator")
    g.add_argument("--annotator", default="heuristic", choices=["heuristic", "chat"],
                   help="heuristic: the offline keyword heuristic (not the papers' method); chat: an LLM judge on an "
                   "OpenAI-compatible endpoint, as in the papers")
    g.add_argument("--annotator-model", default="gpt-4o", help="chat annotator: model name (default gpt-4o)")
    g.add_argument("--annotator-url", default=None,
                   help="chat annotator: base URL (default $OPENAI_BASE_URL or https://api.openai.com/v1)")
    g.add_argument("--annotator-key-env", default="OPENAI_API_KEY",
                   help="chat annotator: environment variable holding the API key (default OPENAI_API_KEY)")


def make_annotator_arg(args: argparse.Namespace):
    from steering.annotate import make_annotator

    if args.annotator == "chat":
        return make_annotator("chat", model=args.annotator_model, base_url=args.annotator_url,
                              api_key_env=args.annotator_key_env)
    return make_annotator("heuristic")


def add_generation_args(p: argparse.ArgumentParser, *, n_default: int | None) -> None:
    g = p.add_argument_group("generation (procedural held-out tasks)")
    if n_default is not None:
        g.add_argument("--n", type=int, default=n_default, help=f"number of tasks (default {n_default})")
    g.add_argument("--task", default="mixed", help="procedural task of steering.tasks (default mixed)")
    g.add_argument("--template", default="qwen_math", help="prompt template (default qwen_math)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, as Venhoff et al.)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--gen-batch-size", type=int, default=None, help="rows per generate call (default: all)")


def check_generation_args(args: argparse.Namespace, n: int) -> None:
    if n < 1:
        raise UsageError(f"the number of tasks must be >= 1, got {n}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    from steering.tasks import TASKS

    if args.task not in TASKS:
        raise UsageError(f"--task {args.task}: unknown; known tasks: {sorted(TASKS)}")


def heldout_questions(task: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` held-out procedural tasks (never used for training or pretraining the demo base)."""
    from steering.tasks import make_tasks

    try:
        return make_tasks(task, n, seed, part="heldout")
    except TypeError:  # a task without partitions (e.g. reasoning_gym)
        return make_tasks(task, n, seed)


def generate_texts(model: nn.Module, tokenizer: Any, questions: Sequence[str], args: argparse.Namespace,
                   template: Any = None) -> tuple[list[str], list[str]]:
    """``(prompts, completions)``: one completion per question, with whatever steering ``model`` carries."""
    from steering.generation import SamplingParams, generate
    from steering.templates import get_template

    tmpl = template if template is not None else get_template(args.template)
    prompts = [tmpl.render(q, tokenizer=tokenizer) for q in questions]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, do_sample=args.temperature > 0)
    result = generate(model, tokenizer, prompts, params, num_return_sequences=1, seed=args.seed,
                      batch_size=args.gen_batch_size)
    return prompts, list(result.completions)


# --------------------------------------------------------------------------------------------------------------------
# The command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diffmean",
        help="Difference-of-Means behaviour vectors from labelled traces, written as steering checkpoints",
        description=__doc__.split("\n\n")[0] + " Output: OUT/<label>/ (a steering checkpoint per label), "
        "OUT/means.safetensors, OUT/result.json, OUT/diffmean.png. See docs/diffmean.md.",
    )
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
    add_position_args(p)
    p.add_argument("--weighting", default="span", choices=["span", "token"],
                   help="span: average of per-span means (default); token: pooled over all positive positions")
    p.add_argument("--no-rescale", action="store_true",
                   help="keep pos - neg as is (default: rescale per layer to the norm of the mean activation)")
    p.add_argument("--batch-size", type=int, default=4, help="traces per forward pass (default 4)")
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, metavar="DIR")
    add_generation_args(p, n_default=None)
    add_annotator_args(p)
    p.set_defaults(func=main)


def plot_norms(result: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = result["layers"]
    for label, info in result["labels"].items():
        ax.plot(layers, info["raw_norm_over_mean_norm"], "o-", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("||pos - neg|| / ||mean activation||")
    ax.set_title("DiffMean vectors before rescaling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    # ---- every check that needs no weights
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    spec = position_spec(args)
    steered_cfg = load_config(args.model, "--model")
    act_id = args.activations_model or args.model
    act_cfg = load_config(act_id, "--activations-model") if args.activations_model else steered_cfg
    try:
        dm.check_same_shape(steered_cfg, act_cfg)
        layers = sv.validate_layers(args.layers, int(steered_cfg.num_hidden_layers))
    except sv.SteeringError as e:
        raise UsageError(str(e)) from None
    traces, annotator = None, None
    if args.traces:
        traces = read_traces_arg(args.traces)
        present = dm.trace_labels(traces)
        missing = [label for label in (args.label or []) if label not in present]
        if missing:
            raise UsageError(f"--label {missing}: no span has this label in {args.traces} "
                             f"(labels present: {sorted(present)})")
        if not present:
            raise UsageError(f"--traces {args.traces}: no labelled spans")
    else:
        check_generation_args(args, args.generate)
    out = prepare_out(args.out)
    device = default_device(args.device)

    # ---- traces from generation, if asked
    model = tokenizer = None
    if traces is None:
        from steering.annotate import annotate_traces

        annotator = make_annotator_arg(args)
        gen_model, gen_tok = load_plain(args.model, args.dtype, device)
        rows = heldout_questions(args.task, args.generate, args.seed)
        prompts, texts = generate_texts(gen_model, gen_tok, [r["question"] for r in rows], args)
        if act_id == args.model:
            model, tokenizer = gen_model, gen_tok
        del gen_model
        traces = annotate_traces(annotator, texts, prompts,
                                 [{"question": r["question"], "answer": r["answer"]} for r in rows])
        dm.write_traces(out / "traces.jsonl", traces)
        if not dm.trace_labels(traces):
            raise UsageError(f"the {args.annotator} annotator labelled no span in the {len(traces)} generated traces "
                             f"(see {out / 'traces.jsonl'})")

    # ---- one streaming pass
    if model is None:
        model, tokenizer = load_plain(act_id, args.dtype, device)
    acc = dm.collect(model, tokenizer, traces, layers=layers, spec=spec, labels=args.label, weighting=args.weighting,
                     batch_size=args.batch_size, max_length=args.max_length)
    labels = args.label or acc.labels
    empty = [label for label in labels if not acc.pos_count.get(label)]
    if empty:
        raise UsageError(f"labels {empty}: every span lost its positions (clipped at the trace start or truncated)")

    from safetensors.torch import save_file

    save_file(acc.state_dict(), str(out / "means.safetensors"), metadata={"names": ",".join(acc.names)})
    neg = acc.neg_mean()
    mean_norms = [float(x) for x in neg.norm(dim=-1)]
    result: dict[str, Any] = {
        "model": args.model, "activations_model": act_id, "hook": dm.DEFAULT_HOOK, "layers": layers,
        "positions": spec.describe(), "weighting": args.weighting, "rescaled": not args.no_rescale,
        "traces": str(args.traces or out / "traces.jsonl"), "summary": acc.summary(),
        "mean_activation_norms": mean_norms, "labels": {},
    }
    if args.generate and getattr(annotator, "stats", None):
        result["annotator"] = {"name": args.annotator, "stats": dict(annotator.stats)}
    for label in labels:
        raw = acc.raw_vectors(label)
        u = acc.vectors(label, rescale=not args.no_rescale)
        meta = {"label": label, "model": args.model, "activations_model": act_id, "hook": dm.DEFAULT_HOOK,
                "positions": spec.describe(), "weighting": args.weighting, "rescaled": not args.no_rescale,
                "spans": acc.n_spans[label], "positions_count": acc.n_positions[label],
                "trace_tokens": acc.neg_count, "traces": acc.n_traces,
                "mean_activation_norms": {str(layer): n for layer, n in zip(layers, mean_norms)},
                "raw_norms": {str(layer): float(x) for layer, x in zip(layers, raw.norm(dim=-1))}}
        ckpt = dm.save_vectors_checkpoint(dm.vectors_by_layer(u, layers), out / label, steered_cfg,
                                          base_model=args.model, extra={"diffmean": meta})
        result["labels"][label] = {
            "checkpoint": str(ckpt), "spans": acc.n_spans[label], "positions": acc.n_positions[label],
            "raw_norms": [float(x) for x in raw.norm(dim=-1)],
            "raw_norm_over_mean_norm": [float(r / m) if m else float("nan")
                                        for r, m in zip(raw.norm(dim=-1), neg.norm(dim=-1))],
            "vector_norms": [float(x) for x in u.norm(dim=-1)],
        }
    result["plot"] = str(plot_norms(result, out / "diffmean.png"))
    write_json(out / "result.json", result)
    for label, info in result["labels"].items():
        print(f"{label}: {info['spans']} spans, {info['positions']} positions -> {info['checkpoint']}",
              file=sys.stderr)
    print(out / "result.json")
    return 0
