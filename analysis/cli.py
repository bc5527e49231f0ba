"""What the analysis commands share on the command line: their arguments and checks, and loading what they name.

- **Commands**: :func:`add_command` registers one (``python -m analysis`` collects every module's ``register``); its
  ``defaults`` set a command's own defaults of shared flags (:func:`default`). Bad input is a :class:`UsageError`: one
  line, exit code 2, raised before any model loads. Where output goes: ``analysis.output``.
- **Evaluation settings** (sampling, seeds, grading, backend): their flags are ``analysis.settings``; here the rest of
  what the accuracy-measuring commands take: device and dtype (:func:`add_device_arguments`), the template
  (:func:`resolve_template`), the benchmarks (:func:`load_benchmarks`).
- **Checkpoint-command arguments** (:func:`add_args` / :func:`check_args`: ``--checkpoint``, ``--model``, ``--out``,
  ``--benchmarks`` + the evaluation arguments), and :func:`open_checkpoint`, which loads what they name.
- **Trace-command arguments** (``diffmean``, ``attribution``, ``behavior``): positions, annotator, generation.
- **Model loading**: the base with a zero steering vector on every layer (:func:`load_steerable`, so any vectors apply
  as real BEFT parameters: ``analysis._common.use_vectors``), the plain base (:func:`load_plain`), a checkpoint's
  vectors (:func:`checkpoint_vectors`); a results table's rows load in ``analysis.table``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steering import vectors as sv


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2, before any model loads."""


# --------------------------------------------------------------------------------------------------------------------
# Commands (their output: analysis.output)


def add_command(subparsers: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                description: str, *, help: str, **defaults: Any) -> argparse.ArgumentParser:
    """The sub-parser of a command running ``func``, described by its module docstring (``description``); ``defaults``:
    the command's own defaults of shared flags (``max_new_tokens=512``), read through :func:`default`."""
    p = subparsers.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func, **defaults)
    return p


def add_checkpoint_command(subparsers: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                           description: str, *, help: str, checkpoint: str = "required", forward_batch: bool = False,
                           **defaults: Any) -> argparse.ArgumentParser:
    """:func:`add_command` with the checkpoint-command arguments (:func:`add_args`)."""
    p = add_command(subparsers, name, func, description, help=help, **defaults)
    add_args(p, checkpoint=checkpoint, forward_batch=forward_batch)
    return p


def default(parser: argparse._ActionsContainer, dest: str, fallback: Any) -> Any:
    """The default of a shared flag: the one its command set at registration (:func:`add_command`'s ``defaults``),
    else ``fallback``. (argparse lets an explicit ``default=`` win over the parser's, so the declaration asks.)"""
    value = parser.get_default(dest)
    return fallback if value is None else value


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


def add_device_arguments(parser: argparse._ActionsContainer) -> None:
    """``--dtype`` and ``--device``, for every command that loads a model."""
    dtype = default(parser, "dtype", None)
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"],
                        help=f"model dtype (default: {dtype or 'bfloat16 on CUDA, float32 on CPU'}); steering vectors "
                             "stay fp32")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


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
        raise UsageError(f"{flag} {model_id}: cannot read its config ({one_line(e)})") from None
    try:
        sv.check_supported(config)
    except sv.SteeringError as e:
        raise UsageError(f"{flag} {model_id}: {e}") from None
    return config


def one_line(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (library messages, the Hub's among them, span several), cut at ``limit``."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:limit]


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
        base = checkpoint_meta(checkpoint).get("base_model")
        if base:
            return str(base)
        raise UsageError(f"no base model: pass --model BASE ({checkpoint} records none)")
    raise UsageError("no base model: pass --model BASE")


def training_config(checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """The training config a steering checkpoint records ({} if none); an unreadable checkpoint is a usage error."""
    if not checkpoint:
        return {}
    tc = checkpoint_meta(checkpoint).get("training_config") or {}
    return tc if isinstance(tc, dict) else {}


def checkpoint_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``steering.json`` (a usage error if unreadable), parsed once per version of the file."""
    meta_file = Path(checkpoint, sv.META_FILE)
    stat = meta_file.stat() if meta_file.is_file() else None
    version = (stat.st_ino, stat.st_mtime_ns, stat.st_size) if stat else None
    try:
        return copy.deepcopy(_read_meta(str(checkpoint), version))
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None


@functools.lru_cache(maxsize=32)
def _read_meta(checkpoint: str, version: tuple[int, int, int] | None) -> dict[str, Any]:
    return sv.read_meta(checkpoint)


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


def checkpoint_layers(text: str | None, vectors: Mapping[int, Any], num_layers: int, flag: str = "--layers"
                      ) -> list[int]:
    """The layers ``--layers`` names (default: every layer the checkpoint steers); each must have a vector."""
    layers = parse_layers(text, num_layers, flag) or sorted(vectors)
    missing = [layer for layer in layers if layer not in vectors]
    if missing:
        raise UsageError(f"{flag} {text}: the checkpoint has no vector at layers {missing} (it has {sorted(vectors)})")
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
    """``(model, tokenizer)``: the frozen base with a zero vector on every layer (bit-identical), as asked."""
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


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each of the integer flags ``names`` (argparse dests, ``samples_per_problem``) is >= 1."""
    for name in names:
        value = vars(args)[name]
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


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
    from analysis import settings

    settings.add_arguments(parser)


def _checkpoint_arg(args: argparse.Namespace) -> str | None:
    """``--checkpoint`` of a command that may have none (``add_args(checkpoint="none")``)."""
    return vars(args).get("checkpoint")


def check_args(args: argparse.Namespace, checkpoints: Sequence[str | None] = (), *, benchmarks: bool = True) -> None:
    """Every check that needs no model: numbers, the checkpoint, the template, the benchmark specs (unless no
    ``benchmarks``)."""
    from analysis import settings
    from steering.problems import DataError, check_spec, expand_specs

    settings.check(args)
    check_checkpoint_arg(_checkpoint_arg(args))
    if args.backend == "vllm" and (_checkpoint_arg(args) or vars(args).get("model")):
        check_vllm_model(base_model_id(vars(args).get("model"), _checkpoint_arg(args)), args.device)
    if "forward_batch_size" in vars(args):
        check_positive(args, "forward_batch_size")
    if "template" in vars(args):
        template(args, checkpoints)  # a file: one without {question} is refused before any weights load
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
class CheckedCheckpoint:
    """What :func:`check_checkpoint` derives before anything loads: the base id and its config.json, the checkpoint's
    vectors (a few kB, checksummed, fitting that config) and the ``--layers`` (default: every layer it steers)."""

    base_id: str
    config: Any
    vectors: dict[int, Any]
    layers: list[int]

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)


def check_checkpoint(args: argparse.Namespace, *, layers: str | None = None, layers_flag: str = "--layers"):
    """``--checkpoint`` against its base's config.json, and ``layers`` (a ``--layers`` text) against both: refused
    here, before ``--out`` is made or any weights load, is a corrupt checkpoint, a wrong shape, a bad layer."""
    base_id = base_model_id(args.model, args.checkpoint)
    _, vectors = sv.read_checkpoint(args.checkpoint)  # a CheckpointError is one line, exit 2 (python -m analysis)
    config = model_config(base_id, "--model" if args.model else f"--checkpoint {args.checkpoint}: its base")
    check_vectors_fit(vectors, config, f"checkpoint {str(args.checkpoint)!r}")
    layers_ = checkpoint_layers(layers, vectors, int(config.num_hidden_layers), layers_flag)
    return CheckedCheckpoint(base_id, config, vectors, layers_)


@dataclass
class LoadedCheckpoint:
    """What a checkpoint command works on: the base id, the benchmarks, the output dir, the steerable model (zero
    vectors on every layer), its tokenizer, the checkpoint's vectors and the checked ``--layers``."""

    base_id: str
    benches: list[Any] | None
    out: Path
    model: Any
    tokenizer: Any
    vectors: dict[int, Any]
    layers: list[int]

    @property
    def num_layers(self) -> int:
        return sv.model_shape(self.model)[0]


def open_checkpoint(args: argparse.Namespace, *, benchmarks: bool = True,
                    layers: str | None = None) -> LoadedCheckpoint:
    """Check the arguments (:func:`check_args`), then :func:`load_checkpoint`."""
    check_args(args, benchmarks=benchmarks)
    return load_checkpoint(args, benchmarks=benchmarks, layers=layers)


def load_checkpoint(args: argparse.Namespace, checked: CheckedCheckpoint | None = None, *, benchmarks: bool = True,
                    plain: bool = False, layers: str | None = None,
                    inputs: Sequence[str | os.PathLike] = ()) -> LoadedCheckpoint:
    """:func:`check_checkpoint` (unless given its result ``checked``), then load the benchmarks (unless not
    ``benchmarks``), make ``--out`` (which must not hold the checkpoint or the other ``inputs``), load the base
    (steerable: zero vectors on every layer; ``plain``: for hooks)."""
    from analysis import output

    checked = checked or check_checkpoint(args, layers=layers)
    benches = load_benchmarks(benchmark_specs(args), args) if benchmarks else None
    out = output.prepare_out(args.out, inputs=[args.checkpoint, *inputs])
    model, tokenizer = (load_plain if plain else load_steerable)(checked.base_id, args)
    return LoadedCheckpoint(checked.base_id, benches, out, model, tokenizer, checked.vectors, checked.layers)


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
    """``--dtype`` and ``--device`` of the trace commands, whose dtype is float32 by default: the traces and their
    differences are the measurement."""
    p.set_defaults(dtype="float32")
    add_device_arguments(p)


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
    """The trace commands' generation: the evaluation's sampling flags (``analysis.settings``), greedy and 256 new
    tokens by default (as Venhoff et al.); one seed, one batch of all tasks unless ``--gen-batch-size``."""
    from analysis import settings

    p.set_defaults(temperature=0.0, max_new_tokens=256)
    g = p.add_argument_group("generation (procedural held-out tasks)")
    if n_default is not None:
        g.add_argument("--n", type=int, default=n_default, help=f"number of tasks (default {n_default})")
    g.add_argument("--task", default="mixed", help="procedural task of steering.tasks (default mixed)")
    g.add_argument("--template", default="qwen_math", help="prompt template (default qwen_math)")
    g.add_argument("--seed", type=int, default=0)
    settings.add_sampling_arguments(g)
    g.add_argument("--gen-batch-size", type=int, default=None, help="rows per generate call (default: all)")


def check_generation_args(args: argparse.Namespace, n: int) -> None:
    from analysis import settings
    from steering.tasks import TASKS

    if n < 1:
        raise UsageError(f"the number of tasks must be >= 1, got {n}")
    if args.gen_batch_size is not None:
        check_positive(args, "gen_batch_size")
    settings.sampling_params(args)
    if args.task not in TASKS:
        raise UsageError(f"--task {args.task}: unknown; known tasks: {sorted(TASKS)}")


def heldout_questions(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """``n`` held-out problems of ``--task`` with ``--seed`` (never used for training or pretraining the demo base)."""
    from steering.problems import ProceduralSpec, make_procedural

    return make_procedural(ProceduralSpec(args.task), n, args.seed, "heldout")


def check_vllm_model(model_id: str, device: str | None) -> None:
    """``--backend vllm``: the model is one vLLM serves on this device (read from its config, no weights)."""
    from steering.vllm_engine import VLLMError, check_vllm, read_model_config

    device_type = "cuda" if str(default_device(device)).startswith("cuda") else "cpu"
    try:
        check_vllm(read_model_config(model_id), device=device_type)
    except (VLLMError, ValueError, OSError) as e:
        raise UsageError(f"--backend vllm: {str(e).splitlines()[0]}") from None
