"""What the analysis commands share on the command line: their arguments and checks, and loading what they name.

- **Commands**: :func:`add_command` registers one (``python -m analysis`` collects every module's ``register``);
  :func:`finish` writes its ``result.json``. Bad input is a :class:`UsageError`: one line, exit code 2, raised before
  any model loads.
- **Evaluation arguments** (:func:`add_eval_args` / :func:`check_eval_args`: template, sampling, seeds, limits,
  grading, dtype, device, backend), shared by ``evaluate``, ``select`` and every command that measures accuracy, and
  what they turn into (:func:`sampling_params`, :func:`grading_options`, :func:`samples_for`,
  :func:`resolve_template`, :func:`load_benchmarks`).
- **Checkpoint-command arguments** (:func:`add_args` / :func:`check_args`: ``--checkpoint``, ``--model``, ``--out``,
  ``--benchmarks`` + the evaluation arguments), and :func:`open_checkpoint`, which loads what they name.
- **Trace-command arguments** (``diffmean``, ``attribution``, ``behavior``): positions, annotator, generation.
- **Model loading**: the base with a zero steering vector on every layer (:func:`load_steerable`, so that any set of
  vectors is applied as real BEFT parameters by ``analysis._common.use_vectors``), the plain base
  (:func:`load_plain`), a checkpoint's vectors (:func:`checkpoint_vectors`), and the four kinds of model a results
  table compares (:class:`RowSpec`: the base, a steering checkpoint, a PEFT LoRA adapter, a full model directory;
  :func:`build_rows`, :func:`load_row_model`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steering import vectors as sv


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2, before any model loads."""


# --------------------------------------------------------------------------------------------------------------------
# Commands and their output


def add_command(subparsers: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                description: str, *, help: str, **defaults: Any) -> argparse.ArgumentParser:
    """The sub-parser of a command running ``func``, described by its module docstring (``description``, layout
    kept); ``defaults`` override argument defaults (``max_new_tokens=512``)."""
    p = subparsers.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func, **defaults)
    return p


def add_checkpoint_command(subparsers: argparse._SubParsersAction, name: str,
                           func: Callable[[argparse.Namespace], int], description: str, *, help: str,
                           checkpoint: str = "required", forward_batch: bool = False,
                           **defaults: Any) -> argparse.ArgumentParser:
    """:func:`add_command` with the checkpoint-command arguments (:func:`add_args`)."""
    p = add_command(subparsers, name, func, description, help=help, **defaults)
    add_args(p, checkpoint=checkpoint, forward_batch=forward_batch)
    return p


def prepare_out(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write a result file atomically (``steering.files``); numpy / torch scalars become floats."""
    from steering.files import write_json_atomic

    return write_json_atomic(path, data, indent=2, default=float)


def finish(out: Path, result: Mapping[str, Any], summary: str | None = None) -> int:
    """Write ``OUT/result.json``; print ``summary; wrote PATH`` (or just the path). The command's exit code, 0."""
    path = write_json(out / "result.json", result)
    print(f"{summary}; wrote {path}" if summary else path)
    return 0


def progress(iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
             args: argparse.Namespace | None = None, unit: str = "it"):
    """A tqdm bar on stderr, off with ``--no-progress``."""
    from tqdm.auto import tqdm

    disable = args is not None and args.no_progress
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------------------------------------
# Device, dtype, model ids


def default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> str:
    if dtype:
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """``--device`` (default cuda if available) and ``--dtype`` (default bf16 on CUDA, fp32 on CPU)."""
    device = default_device(args.device)
    return device, resolve_dtype(args.dtype, device)


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def check_model_id(name: str, flag: str = "--model") -> None:
    """A model argument must be an existing model dir or look like a Hub id (``Org/Name``); checked offline."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{flag} {name}: not a directory")
        if not (p / "config.json").is_file():
            raise UsageError(f"{flag} {name}: no config.json in that directory (not a model directory)")
        return
    if name.startswith(("/", ".", "~")) or not _HUB_ID_RE.match(name):
        raise UsageError(f"{flag} {name}: no such directory (and not a Hub id like Org/Name)")


def model_config(model_id: str, flag: str = "--model"):
    """The config of a model a steering command loads (no weights), checked to be a supported family."""
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


def check_checkpoint_arg(path: str | None, flag: str = "--checkpoint") -> None:
    """Validate a steering checkpoint argument before any model loads."""
    if path is None:
        return
    if not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: no such directory")
    if not sv.is_checkpoint(path):
        raise UsageError(f"{flag} {path}: not a complete steering checkpoint "
                         f"(needs {sv.ADAPTER_WEIGHTS_FILE} and {sv.META_FILE})")


def base_model_id(model: str | None, checkpoint: str | os.PathLike | None = None) -> str:
    """``--model``, else the base model the steering checkpoint records."""
    if model:
        return model
    if checkpoint:
        try:
            base = sv.read_meta(checkpoint).get("base_model")
        except sv.CheckpointError as e:
            raise UsageError(str(e)) from None
        if base:
            return str(base)
        raise UsageError(f"no base model: pass --model BASE ({checkpoint} records none)")
    raise UsageError("no base model: pass --model BASE")


def training_config(checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """The training config a steering checkpoint records ({} if it records none); an unreadable checkpoint is a usage
    error, not a silent default template."""
    if not checkpoint:
        return {}
    try:
        tc = sv.read_meta(checkpoint).get("training_config") or {}
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None
    return tc if isinstance(tc, dict) else {}


def parse_layers(text: str | None, num_layers: int, flag: str = "--layers") -> list[int] | None:
    """``"0,3,5-7"`` or ``"all"`` or ``"last"`` -> sorted layer list (negative indices count from the end)."""
    if text is None:
        return None
    text = str(text).strip()
    if text == "all":
        return list(range(num_layers))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if part == "last":
                out.add(num_layers - 1)
            elif re.fullmatch(r"\d+-\d+", part):
                a, b = (int(x) for x in part.split("-"))
                out.update(range(a, b + 1))
            else:
                v = int(part)
                out.add(v + num_layers if v < 0 else v)
        except ValueError:
            raise UsageError(f"{flag} {text}: expected layer indices like 0,3,5-7 (or all, last)") from None
    bad = sorted(v for v in out if not 0 <= v < num_layers)
    if bad:
        raise UsageError(f"{flag} {text}: layers {bad} out of range; the model has {num_layers} layers "
                         f"(0..{num_layers - 1})")
    if not out:
        raise UsageError(f"{flag} is empty")
    return sorted(out)


def checkpoint_layers(text: str | None, vectors: Mapping[int, Any], num_layers: int) -> list[int]:
    """The layers ``--layers`` names (default: every layer the checkpoint steers), each of which must have a
    vector."""
    layers = parse_layers(text, num_layers) or sorted(vectors)
    missing = [layer for layer in layers if layer not in vectors]
    if missing:
        raise UsageError(f"--layers {text}: the checkpoint has no vector at layers {missing} "
                         f"(it has {sorted(vectors)})")
    return layers


def final_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The final steering checkpoint of a training run: ``run_dir`` itself if it is a checkpoint; else the one the
    run's ``latest`` marker names, if complete; else its highest complete ``checkpoint-<step>`` (a save of the
    ``latest`` one is in progress); else its ``final/`` model; None if there is none. Complete: see
    ``train.checkpointing``."""
    from train import checkpointing as ckpt_io

    run_dir = Path(run_dir)
    if sv.is_checkpoint(run_dir):
        return run_dir
    if not run_dir.is_dir():
        return None
    try:
        latest = ckpt_io.read_latest(run_dir)
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None
    if latest is not None and ckpt_io.is_complete(latest):
        return latest
    complete = ckpt_io.run_checkpoints(run_dir)
    if complete:
        return complete[-1]
    final = ckpt_io.final_dir(run_dir)
    return final if sv.is_checkpoint(final) else None


# --------------------------------------------------------------------------------------------------------------------
# Loading models and vectors


def load_steerable(base_id: str, args: argparse.Namespace):
    """``(model, tokenizer)``: the frozen base with a zero steering vector on every layer (bit-identical to the base
    until vectors are set), on ``--device`` in ``--dtype``."""
    device, dtype = device_and_dtype(args)
    base = sv.load_base_model(base_id, dtype=dtype)
    model = sv.attach_steering(base, layers=None, base_model_id=base_id)
    return model.to(device).eval(), sv.load_tokenizer(base_id)


def load_plain(model_id: str, args: argparse.Namespace, *, attn: str | None = None):
    """``(model, tokenizer)``: the frozen base without adapters (for analyses that steer through hooks), on
    ``--device`` in ``--dtype``; ``attn`` sets the attention implementation."""
    device, dtype = device_and_dtype(args)
    model = sv.load_base_model(model_id, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval(), sv.load_tokenizer(model_id)


def checkpoint_vectors(path: str | os.PathLike, model: Any = None, *, source: str | None = None):
    """``{layer: vector}`` of a steering checkpoint; with ``model``, checked to fit it (a clear error naming both
    shapes). ``source`` names the checkpoint in errors (default ``checkpoint 'PATH'``)."""
    try:
        vectors = sv.load_vectors(path)
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None
    if model is not None:
        check_vectors_fit(vectors, model, source or f"checkpoint {str(path)!r}")
    return vectors


def check_vectors_fit(vectors: Mapping[int, Any], model: Any, source: str) -> None:
    try:
        sv.check_fits(vectors, model, source=source)
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------------------------------------------------
# Evaluation arguments


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Generation / scoring arguments shared by ``evaluate``, ``select`` and the accuracy-based commands."""
    g = parser.add_argument_group("generation and scoring")
    g.add_argument("--template", default=None,
                   help="prompt template: qwen_math, r1, or a template file (default: the template recorded in the "
                        "first steering checkpoint's training config, else qwen_math)")
    g.add_argument("--num-samples", "-k", type=int, default=None, metavar="K",
                   help="samples per problem (k of avg@k) for every benchmark; default: 32 for aime24/aime25/amc23, "
                        "1 otherwise; always 1 at temperature 0")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 = greedy (default 1.0, the papers' setting)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default)")
    g.add_argument("--max-new-tokens", type=int, default=4096, help="completion length limit (default 4096)")
    g.add_argument("--max-length", type=int, default=None, metavar="L",
                   help="limit prompt + completion to L tokens per problem instead (the papers: 4096 for Qwen, 8192 "
                        "for Llama); overrides --max-new-tokens")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one evaluation per seed; mean ± std over seeds (default: 0)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="completions (prompts x samples) per generation call (default 256; the KV cache of one call "
                        "must fit in memory)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N problems of each "
                   "benchmark (quick runs)")
    g.add_argument("--question-key", default=None, help="question field of local benchmark files (default: auto)")
    g.add_argument("--answer-key", default=None, help="answer field of local benchmark files (default: auto)")
    g.add_argument("--pass-k", type=int, nargs="*", default=[], metavar="K",
                   help="also report the unbiased pass@K for these K (<= samples per problem)")
    g.add_argument("--reward-timeout", type=float, default=2.0, help="seconds per answer check (default 2)")
    # math-verify's grading options (steering.rewards.GradingOptions), with its defaults.
    g.add_argument("--reward-float-rounding", type=int, default=6, metavar="N",
                   help="math-verify float_rounding: decimal places floats are rounded to before comparing (default 6)")
    g.add_argument("--reward-numeric-precision", type=int, default=15, metavar="N",
                   help="math-verify numeric_precision: significant digits of numeric evaluation (default 15)")
    g.add_argument("--reward-strict", action=argparse.BooleanOptionalAction, default=True,
                   help="math-verify strict: variables must match and sets never equal tuples (default: on)")
    g.add_argument("--reward-allow-set-relation-comp", action=argparse.BooleanOptionalAction, default=False,
                   help="math-verify allow_set_relation_comp: a relation in the answer may equal a set in the ground "
                        "truth (default: off)")
    g.add_argument("--backend", default="hf", choices=["hf", "static", "vllm"],
                   help="generation backend of steering.generation: hf (model.generate, the reference), static (static "
                        "KV cache, compiled on CUDA) or vllm (a vLLM engine with the vectors as down_proj biases; "
                        "needs vLLM, see README); default hf")
    g.add_argument("--vllm-kv-cache-gb", type=float, default=None, metavar="GB",
                   help="--backend vllm: KV-cache size of the engine (default: 2 on CPU; on GPU vLLM's share of GPU "
                        "memory, --vllm-gpu-memory-utilization)")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="--backend vllm on GPU: fraction of GPU memory the engine may take (default 0.9)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU); steering vectors stay fp32")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_stats_args(parser: argparse.ArgumentParser) -> None:
    """The statistics' options (``steering.statistics``), shared by ``evaluate`` and ``compare``."""
    from steering import statistics as stats

    g = parser.add_argument_group("statistics (intervals, paired tests, detectable differences)")
    g.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES, metavar="N",
                   help="bootstrap resamples of the problems, and random sign flips of the paired test "
                        f"(default {stats.DEFAULT_RESAMPLES}; at least 100)")
    g.add_argument("--stats-seed", type=int, default=stats.DEFAULT_SEED, metavar="SEED",
                   help="seed of the bootstrap draws and the sign flips: the same seed gives the same intervals and "
                        f"p-values (default {stats.DEFAULT_SEED})")


def check_stats_args(args: argparse.Namespace) -> None:
    if args.resamples < 100:
        raise UsageError(f"--resamples must be >= 100, got {args.resamples}")


def check_eval_args(args: argparse.Namespace) -> None:
    """Reject bad numbers before anything loads."""
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling_args(args)
    if args.max_length is not None and args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {args.max_length}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds has duplicates: {args.seeds}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if any(k < 1 for k in args.pass_k):
        raise UsageError(f"--pass-k values must be >= 1, got {args.pass_k}")
    if args.reward_timeout <= 0:
        raise UsageError(f"--reward-timeout must be > 0, got {args.reward_timeout}")
    if args.backend == "vllm":
        from steering.vllm_engine import VLLMError, check_vllm

        try:
            check_vllm()  # installed, a tested version; the model's head size is checked when the engine starts
        except VLLMError as e:
            raise UsageError(f"--backend vllm: {e}") from None
    if args.vllm_kv_cache_gb is not None and not args.vllm_kv_cache_gb > 0:
        raise UsageError(f"--vllm-kv-cache-gb must be > 0, got {args.vllm_kv_cache_gb}")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        raise UsageError(f"--vllm-gpu-memory-utilization must be in (0, 1], got {args.vllm_gpu_memory_utilization}")
    try:
        grading_options(args)
    except ValueError as e:
        raise _flag_error(e, "--reward-") from None


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each of the integer flags ``names`` (argparse dests, ``samples_per_problem``) is >= 1."""
    for name in names:
        value = vars(args)[name]
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_sampling_args(args: argparse.Namespace) -> None:
    """``--temperature``, ``--top-p``, ``--top-k``, ``--max-new-tokens``: ``SamplingParams``' own checks."""
    from steering.generation import GenerationError

    try:
        sampling_params(args)
    except GenerationError as e:
        raise _flag_error(e, "--") from None


def _flag_error(error: Exception, prefix: str) -> UsageError:
    """``"top_p must be ..."`` -> ``UsageError("--top-p must be ...")``: a library's message about one of its
    parameters, said of the flag that sets it."""
    name, _, rest = str(error).partition(" ")
    return UsageError(f"{prefix}{name.replace('_', '-')} {rest}")


def grading_options(args: argparse.Namespace):
    """The ``--reward-*`` grading flags as a ``steering.rewards.GradingOptions``."""
    from steering.rewards import GradingOptions

    return GradingOptions(float_rounding=args.reward_float_rounding, numeric_precision=args.reward_numeric_precision,
                          strict=args.reward_strict, allow_set_relation_comp=args.reward_allow_set_relation_comp)


def sampling_params(args: argparse.Namespace, *, greedy: bool = False):
    """``steering.generation.SamplingParams`` from the sampling flags; ``greedy``: T = 0."""
    from steering.generation import SamplingParams

    temperature = 0.0 if greedy else args.temperature
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                          top_k=args.top_k, do_sample=temperature > 0)


def vllm_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--vllm-*`` flags as ``VLLMModel`` keyword arguments."""
    return {"kv_cache_gb": args.vllm_kv_cache_gb, "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
            "max_model_len": args.max_length}


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation flags as recorded in a command's result.json."""
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "seeds": list(args.seeds), "num_samples": args.num_samples,
            "limit": args.limit, "backend": args.backend}


def samples_for(bench: Any, args: argparse.Namespace, greedy: bool) -> int:
    """Samples per problem of a benchmark: 1 when greedy, else ``--num-samples`` or the benchmark's default."""
    if greedy or args.temperature == 0:
        return 1
    return args.num_samples if args.num_samples is not None else bench.default_samples


def resolve_template(name: str | None, checkpoints: Iterable[str | os.PathLike | None] = ()):
    """The PromptTemplate to use: ``name``, else the first steering checkpoint's recorded one, else qwen_math."""
    from steering.templates import get_template

    if name is None:
        recorded = (training_config(ck).get("template") for ck in checkpoints
                    if ck and Path(ck, sv.META_FILE).is_file())
        name = next((str(t) for t in recorded if t), None)
    name = name or "qwen_math"
    try:
        return get_template(name)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise UsageError(f"--template {name}: {e}") from None


def load_benchmarks(specs: Sequence[str], args: argparse.Namespace):
    """The benchmarks of ``specs`` (see ``steering.problems``), with ``--question-key``, ``--answer-key``,
    ``--limit``."""
    from steering.problems import DataError, load_benchmarks as load

    try:
        return load(list(specs), question_key=args.question_key, answer_key=args.answer_key, limit=args.limit)
    except DataError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint commands: --checkpoint, --model, --out, --benchmarks + the evaluation arguments


def add_args(parser: argparse.ArgumentParser, *, checkpoint: str = "required", benchmarks: bool = True,
             forward_batch: bool = False) -> None:
    """``--checkpoint`` (required / optional / none), ``--model``, ``--out``, ``--benchmarks`` and the evaluation
    arguments (template, sampling, seeds, limit, dtype, device, backend ...)."""
    if checkpoint != "none":
        parser.add_argument("--checkpoint", required=checkpoint == "required", metavar="DIR",
                            help="steering checkpoint directory (adapter_model.safetensors + steering.json)")
    parser.add_argument("--model", default=None, metavar="BASE",
                        help="base model (Hub id or local dir); default: the base recorded in the checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (result.json + PNG plots)")
    if benchmarks:
        parser.add_argument("--benchmarks", nargs="+", default=None, metavar="SPEC",
                            help="problems (see `analysis evaluate`): six, math500, file:PATH, "
                                 "procedural:TASK[:N] ...; default: procedural:TASK of the checkpoint's training "
                                 "dataset when it is procedural")
    if forward_batch:
        parser.add_argument("--forward-batch-size", type=int, default=8, metavar="N",
                            help="sequences per teacher-forced forward pass (default 8)")
    add_eval_args(parser)


def _checkpoint_arg(args: argparse.Namespace) -> str | None:
    """``--checkpoint`` of a command that may have none (``add_args(checkpoint="none")``)."""
    return vars(args).get("checkpoint")


def check_args(args: argparse.Namespace, checkpoints: Sequence[str | None] = (), *, benchmarks: bool = True) -> None:
    """Every check that needs no model: numbers, the checkpoint directory, the benchmark specs (unless the command
    will load no ``benchmarks``)."""
    from steering.problems import DataError, check_spec, expand_specs

    check_eval_args(args)
    check_checkpoint_arg(_checkpoint_arg(args))
    if args.backend == "vllm" and (_checkpoint_arg(args) or vars(args).get("model")):
        check_vllm_model(base_model_id(vars(args).get("model"), _checkpoint_arg(args)), args.device)
    if "forward_batch_size" in vars(args):
        check_positive(args, "forward_batch_size")
    if benchmarks:
        try:
            for spec in expand_specs(benchmark_specs(args, checkpoints)):
                check_spec(spec)
        except DataError as e:
            raise UsageError(str(e)) from None


def benchmark_specs(args: argparse.Namespace, checkpoints: Sequence[str | None] = ()) -> list[str]:
    """``--benchmarks``, else 64 held-out problems of the (first) checkpoint's procedural training task."""
    if args.benchmarks:
        return list(args.benchmarks)
    for ck in [_checkpoint_arg(args), *checkpoints]:
        ds = str(training_config(ck).get("dataset") or "")
        if ds.startswith("procedural:"):
            return [f"procedural:{ds.split(':')[1]}:64"]
    raise UsageError("--benchmarks is required (the checkpoint does not record a procedural training dataset); "
                     "e.g. --benchmarks six, or procedural:mixed:64")


def template(args: argparse.Namespace, checkpoints: Sequence[str | None] = ()):
    """``--template``, else the one ``--checkpoint`` (or the first of ``checkpoints``) was trained with."""
    return resolve_template(args.template, [_checkpoint_arg(args), *checkpoints])


@dataclass
class LoadedCheckpoint:
    """What a checkpoint command works on: the base id, the benchmarks, the output dir, the steerable model (zero
    vectors on every layer), its tokenizer and the checkpoint's vectors."""

    base_id: str
    benches: list[Any] | None
    out: Path
    model: Any
    tokenizer: Any
    vectors: dict[int, Any]

    @property
    def num_layers(self) -> int:
        return sv.model_shape(self.model)[0]

    def layers(self, text: str | None) -> list[int]:
        """The checkpoint's layers ``--layers`` names (default: all of them)."""
        return checkpoint_layers(text, self.vectors, self.num_layers)


def open_checkpoint(args: argparse.Namespace, *, benchmarks: bool = True) -> LoadedCheckpoint:
    """Check the arguments, load the benchmarks (unless ``benchmarks`` is False), make ``--out``, load the steerable
    base and ``--checkpoint``'s vectors."""
    check_args(args, benchmarks=benchmarks)
    base_id = base_model_id(args.model, args.checkpoint)
    benches = load_benchmarks(benchmark_specs(args), args) if benchmarks else None
    out = prepare_out(args.out)
    model, tokenizer = load_steerable(base_id, args)
    return LoadedCheckpoint(base_id, benches, out, model, tokenizer, checkpoint_vectors(args.checkpoint, model))


# --------------------------------------------------------------------------------------------------------------------
# Trace commands (diffmean, attribution, behavior): positions, traces, annotator, generation


def add_position_args(p: argparse.ArgumentParser, default: str | None = "shift") -> None:
    from steering import diffmean as dm

    g = p.add_argument_group("positive positions")
    g.add_argument("--positions", default=default, choices=["shift", "window"],
                   help="shift: span tokens shifted one back [t0-1, t1-1) (Venhoff); window: W tokens starting K "
                   "before the span [t0-K, t0-K+W) (Ward)" + ("" if default else "; default: the checkpoint's"))
    g.add_argument("--window-offset", type=int, default=None, metavar="K",
                   help=f"window start, tokens before the span (default {dm.WARD_OFFSET})")
    g.add_argument("--window-width", type=int, default=None, metavar="W",
                   help=f"window width in tokens (default {dm.WARD_WIDTH})")


def position_spec(args: argparse.Namespace, meta: Mapping[str, Any] | None = None):
    """The positions of ``--positions`` / ``--window-*``, defaulting to those a DiffMean checkpoint records."""
    from steering import diffmean as dm

    base = dm.PositionSpec.from_meta(meta)
    mode = args.positions or base.mode
    offset = args.window_offset if args.window_offset is not None else base.offset
    width = args.window_width if args.window_width is not None else base.width
    try:
        return dm.PositionSpec(mode, int(offset), int(width))
    except ValueError as e:
        raise UsageError(str(e)) from None


def read_traces_arg(path: str) -> list[dict[str, Any]]:
    from steering import diffmean as dm

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


def add_model_device_args(p: argparse.ArgumentParser) -> None:
    """``--dtype`` (default float32) and ``--device`` of the trace commands."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)


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
    from steering.tasks import TASKS

    if n < 1:
        raise UsageError(f"the number of tasks must be >= 1, got {n}")
    check_sampling_args(args)
    if args.task not in TASKS:
        raise UsageError(f"--task {args.task}: unknown; known tasks: {sorted(TASKS)}")


def heldout_questions(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """``n`` held-out problems of ``--task`` with ``--seed`` (never used for training or pretraining the demo
    base)."""
    from steering.problems import ProceduralSpec, make_procedural

    return make_procedural(ProceduralSpec(args.task), n, args.seed, "heldout")


# --------------------------------------------------------------------------------------------------------------------
# The four kinds of model a results table compares


ROLE_NAMES = {"base": "Base", "base_greedy": "Base (greedy)", "steering": "Steering", "lora": "LoRA", "full": "Full"}


@dataclass
class RowSpec:
    """One row of the table: a model to evaluate."""

    label: str
    kind: str  # base | steering | lora | full
    role: str  # base | base_greedy | steering | lora | full | other
    path: str | None  # checkpoint / model dir (None for the base row)
    base_model: str | None  # base to load the adapter onto / the base row's model
    tokenizer: str | None
    greedy: bool = False

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "role": self.role, "path": self.path,
                "base_model": self.base_model, "tokenizer": self.tokenizer, "greedy": self.greedy}


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``steering`` (has steering.json), ``lora`` (adapter_config.json without it) or ``full`` (config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--checkpoint {path}: no such directory")
    if (p / sv.META_FILE).is_file():
        return "steering"
    if (p / sv.ADAPTER_CONFIG_FILE).is_file():
        return "lora"
    if (p / "config.json").is_file():
        return "full"
    raise UsageError(f"--checkpoint {path}: not a checkpoint (no steering.json, adapter_config.json or config.json)")


def _has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()


def checkpoint_info(path: str, model: str | None) -> tuple[str, str | None, str | None]:
    """(kind, base model id, tokenizer source) of a checkpoint dir, checked without loading any weights."""
    kind = checkpoint_kind(path)
    if kind == "steering":
        check_checkpoint_arg(path)
        base = base_model_id(model, path)
        return kind, base, base
    if kind == "lora":
        try:
            cfg = json.loads((Path(path) / sv.ADAPTER_CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise UsageError(f"--checkpoint {path}: unreadable {sv.ADAPTER_CONFIG_FILE} ({e})") from None
        if not any(Path(path, f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UsageError(f"--checkpoint {path}: LoRA adapter without adapter_model.safetensors")
        base = model or cfg.get("base_model_name_or_path")
        if not base:
            raise UsageError(f"--checkpoint {path}: adapter_config.json names no base model; pass --model BASE")
        return kind, base, path if _has_tokenizer(path) else base
    tok = path if _has_tokenizer(path) else model
    if tok is None:
        raise UsageError(f"--checkpoint {path}: full model dir without tokenizer files; pass --model BASE for the "
                         "tokenizer")
    return kind, None, tok


def _load_lm(name: str, dtype: Any):
    """Any causal LM, frozen (LoRA and full-model rows may be of any family, unlike steered ones)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, dtype=sv.parse_dtype(dtype or "float32"))
    return sv.freeze(model).eval()


def load_row_model(row: RowSpec, *, dtype: Any = "float32", device: str | None = None, backend: str = "hf",
                   vllm_options: dict[str, Any] | None = None):
    """(model, tokenizer) for a row: the base, a steering checkpoint on its base, a LoRA adapter (PeftModel) on its
    base, or a full model dir. ``backend="vllm"``: a ``steering.vllm_engine.VLLMModel`` serving the same model
    (``vllm_options``: its KV-cache size, ...)."""
    if backend == "vllm":
        return _load_row_engine(row, dtype, device, vllm_options or {}), sv.load_tokenizer(row.tokenizer)
    if row.kind == "base":
        model = _load_lm(row.base_model, dtype)
    elif row.kind == "steering":
        model = sv.load_steered_model(row.path, base=_load_lm(row.base_model, dtype))
    elif row.kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(_load_lm(row.base_model, dtype), row.path)
    elif row.kind == "full":
        model = _load_lm(row.path, dtype)
    else:
        raise ValueError(f"unknown row kind {row.kind!r}")
    tokenizer = sv.load_tokenizer(row.tokenizer)
    return model.to(default_device(device)).eval(), tokenizer


def _load_row_engine(row: RowSpec, dtype: Any, device: str | None, options: dict[str, Any]):
    from steering.vllm_engine import VLLMModel

    if row.kind == "lora":
        raise UsageError(f"row {row.label!r}: LoRA rows are not served by --backend vllm here; use --backend hf")
    model_dir = row.path if row.kind == "full" else row.base_model
    vectors = row.path if row.kind == "steering" else None
    device_type = "cuda" if str(default_device(device)).startswith("cuda") else "cpu"
    return VLLMModel(model_dir, vectors, dtype=str(dtype).removeprefix("torch."), device=device_type, **options)


def check_vllm_rows(rows: Sequence[RowSpec], device: str | None) -> None:
    """``--backend vllm``: vLLM installed, a tested version, and every row's model servable here; LoRA rows are
    refused. One line each, before any weights load."""
    for row in rows:
        if row.kind == "lora":
            raise UsageError(f"--backend vllm: row {row.label!r} is a LoRA adapter, which this project does not serve "
                             "through vLLM; use --backend hf for LoRA rows")
        check_vllm_model(row.path if row.kind == "full" else row.base_model, device)


def check_vllm_model(model_id: str, device: str | None) -> None:
    """``--backend vllm``: the model is one vLLM serves on this device (read from its config, no weights)."""
    from steering.vllm_engine import VLLMError, check_vllm, read_model_config

    device_type = "cuda" if str(default_device(device)).startswith("cuda") else "cpu"
    try:
        check_vllm(read_model_config(model_id), device=device_type)
    except (VLLMError, ValueError, OSError) as e:
        raise UsageError(f"--backend vllm: {str(e).splitlines()[0]}") from None


def check_loadable(rows: Sequence[RowSpec]) -> None:
    """Read the config of every model a row needs (cheap: no weights), so a wrong Hub id or an unreachable Hub fails
    with one line before anything big loads."""
    from transformers import AutoConfig

    seen: set[str] = set()
    for row in rows:
        name = row.path if row.kind == "full" else row.base_model
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            AutoConfig.from_pretrained(name)
        except Exception as e:  # OSError (missing / offline), ValueError (unknown model type), ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"cannot load the model config of {name!r} (row {row.label!r}): {msg[:300]}") from None


def build_rows(checkpoints: Sequence[str], labels: Sequence[str], model: str | None, include_base: bool,
               base_greedy: bool) -> list[RowSpec]:
    """The rows to evaluate, checked (directories, kinds, base models) before anything loads."""
    if model is not None:
        check_model_id(model)
    if labels and len(labels) != len(checkpoints):
        raise UsageError(f"--label given {len(labels)} times for {len(checkpoints)} --checkpoint; give one label per "
                         "checkpoint, or write --checkpoint LABEL=DIR")
    rows: list[RowSpec] = []
    parsed = []
    for i, item in enumerate(checkpoints):
        label = labels[i] if labels else None
        m = re.match(r"^([A-Za-z][\w .\-()]*)=(.+)$", item)
        if m and not Path(item).exists():
            if label is not None:
                raise UsageError(f"--checkpoint {item}: labelled both inline and with --label")
            label, path = m.group(1), m.group(2)
        else:
            path = item
        kind, base, tok = checkpoint_info(path, model)
        parsed.append((label, path, kind, base, tok))
    base_id = model
    if base_id is None:
        base_id = next((b for _, _, k, b, _ in parsed if k in ("steering", "lora") and b), None)
    if not checkpoints or include_base or base_greedy:
        if base_id is None:
            if not checkpoints:
                raise UsageError("nothing to evaluate: give --model BASE (the unsteered base) and/or --checkpoint DIR")
            raise UsageError("--include-base / --base-greedy need a base model: pass --model BASE")
        if not checkpoints or include_base:
            rows.append(RowSpec("Base", "base", "base", None, base_id, base_id))
        if base_greedy:
            rows.append(RowSpec("Base (greedy)", "base", "base_greedy", None, base_id, base_id, greedy=True))
    kind_counts: dict[str, int] = {}
    for _, _, kind, _, _ in parsed:
        kind_counts[kind] = kind_counts.get(kind, 0) + 1
    for label, path, kind, base, tok in parsed:
        if label is not None:
            role = label.lower() if label.lower() in ROLE_NAMES else kind
            shown = ROLE_NAMES.get(label.lower(), label)
        else:
            role = kind
            shown = ROLE_NAMES[kind] if kind_counts[kind] == 1 else f"{ROLE_NAMES[kind]} ({Path(path).name})"
        rows.append(RowSpec(shown, kind, role, str(path), base, tok))
    seen: set[str] = set()
    for r in rows:
        if r.label in seen:
            raise UsageError(f"two rows are labelled {r.label!r}; give distinct labels (--checkpoint LABEL=DIR)")
        seen.add(r.label)
    return rows
