"""What the mechanistic analysis commands share (not a command itself: the name starts with ``_``).

- the command-line arguments (``--checkpoint``, ``--model``, ``--out``, ``--benchmarks`` + the evaluation arguments of
  ``analysis.evaluate``) and their checks, done before any model loads;
- loading a base with a (zero) steering vector on *every* layer, so that any set of vectors -- one layer, a pair,
  another checkpoint's -- is applied by :func:`use_vectors` as real BEFT parameters (the same path training and
  generation use), never by reloading;
- accuracy through :func:`analysis.evaluate.evaluate_model` (every accuracy number of every command comes from it);
- sampled prompt+completion token sequences, and right-padded teacher-forced batches over them, with masks for the
  prompt / completion / "predicts a completion token" positions.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.cli import UsageError, check_checkpoint_arg
from steering import vectors as sv

# --------------------------------------------------------------------------------------------------------------------
# Arguments


def add_args(parser: argparse.ArgumentParser, *, checkpoint: str = "required", benchmarks: bool = True,
             forward_batch: bool = False) -> None:
    """``--checkpoint`` (required / optional / none), ``--model``, ``--out``, ``--benchmarks`` and the evaluation
    arguments of ``analysis evaluate`` (template, sampling, seeds, limit, dtype, device, backend ...)."""
    from analysis.evaluate import add_eval_args

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


def check_args(args: argparse.Namespace, checkpoints: Sequence[str | None] = ()) -> None:
    """Every check that needs no model: numbers, the checkpoint directory, the benchmark specs."""
    from analysis.evaluate import check_eval_args

    check_eval_args(args)
    check_checkpoint_arg(getattr(args, "checkpoint", None))
    if getattr(args, "forward_batch_size", 1) < 1:
        raise UsageError(f"--forward-batch-size must be >= 1, got {args.forward_batch_size}")
    if hasattr(args, "benchmarks"):
        from steering.problems import DataError, check_spec, expand_specs

        try:
            for spec in expand_specs(benchmark_specs(args, checkpoints)):
                check_spec(spec)
        except DataError as e:
            raise UsageError(str(e)) from None


def training_config(checkpoint: str | None) -> dict[str, Any]:
    if not checkpoint:
        return {}
    try:
        tc = sv.read_meta(checkpoint).get("training_config") or {}
    except sv.CheckpointError:
        return {}
    return tc if isinstance(tc, dict) else {}


def benchmark_specs(args: argparse.Namespace, checkpoints: Sequence[str | None] = ()) -> list[str]:
    """``--benchmarks``, else 64 held-out problems of the (first) checkpoint's procedural training task."""
    if getattr(args, "benchmarks", None):
        return list(args.benchmarks)
    for ck in [getattr(args, "checkpoint", None), *checkpoints]:
        ds = str(training_config(ck).get("dataset") or "")
        if ds.startswith("procedural:"):
            return [f"procedural:{ds.split(':')[1]}:64"]
    raise UsageError("--benchmarks is required (the checkpoint does not record a procedural training dataset); "
                     "e.g. --benchmarks six, or procedural:mixed:64")


def load_benchmarks(args: argparse.Namespace, checkpoints: Sequence[str | None] = ()):
    from analysis.evaluate import load_benchmarks_or_exit

    return load_benchmarks_or_exit(benchmark_specs(args, checkpoints), args)


def template(args: argparse.Namespace, checkpoints: Sequence[str | None] = ()):
    from analysis.evaluate import resolve_template

    return resolve_template(args.template, [getattr(args, "checkpoint", None), *checkpoints])


def base_model_id(args: argparse.Namespace, checkpoint: str | None = None) -> str:
    if args.model:
        return args.model
    ck = checkpoint or getattr(args, "checkpoint", None)
    if ck:
        base = sv.read_meta(ck).get("base_model")
        if base:
            return str(base)
    raise UsageError("no base model: pass --model BASE (the checkpoint records none)")


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    from analysis.cli import default_device
    from analysis.evaluate import resolve_dtype

    device = default_device(getattr(args, "device", None))
    return device, resolve_dtype(getattr(args, "dtype", None), device)


def progress(iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
             args: argparse.Namespace | None = None, unit: str = "it"):
    from tqdm.auto import tqdm

    disable = bool(getattr(args, "no_progress", False))
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------------------------------------
# Models and vectors


def load_steerable(base_id: str, args: argparse.Namespace):
    """``(model, tokenizer)``: the frozen base with a zero steering vector on every layer (bit-identical to the base
    until :func:`use_vectors` sets some), on ``--device`` in ``--dtype``."""
    from steering.vectors import load_tokenizer

    device, dtype = device_and_dtype(args)
    base = sv.load_base_model(base_id, dtype=dtype)
    model = sv.attach_steering(base, layers=None, base_model_id=base_id)
    tokenizer = load_tokenizer(base_id)
    return model.to(device).eval(), tokenizer


def load_plain(base_id: str, args: argparse.Namespace):
    """``(model, tokenizer)``: the frozen base without adapters (for analyses that steer through hooks)."""
    from steering.vectors import load_tokenizer

    device, dtype = device_and_dtype(args)
    model = sv.load_base_model(base_id, dtype=dtype)
    return model.to(device).eval(), load_tokenizer(base_id)


def checkpoint_vectors(path: str | Path, model: nn.Module | None = None) -> dict[int, torch.Tensor]:
    """``{layer: vector}`` of a checkpoint, checked against ``model``'s shape (clear error naming both shapes)."""
    try:
        vectors = sv.load_vectors(path)
        if model is not None:
            sv.check_fits(vectors, model, source=f"checkpoint {str(path)!r}")
    except sv.CheckpointError as e:
        raise UsageError(str(e)) from None
    return vectors


@contextmanager
def use_vectors(model: nn.Module, vectors: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block, the steered layers carry exactly ``vectors`` (every other layer zero); restored on exit."""
    params = sv.vector_parameters(model)
    unknown = sorted(set(vectors) - set(params))
    if unknown:
        raise sv.SteeringError(f"vectors for layers {unknown}, which are not steered in this model")
    saved = {layer: p.detach().clone() for layer, p in params.items()}
    try:
        with torch.no_grad():
            for layer, p in params.items():
                if layer in vectors:
                    p.copy_(torch.as_tensor(vectors[layer]).reshape(p.shape).to(p.dtype).to(p.device))
                else:
                    p.zero_()
        yield
    finally:
        with torch.no_grad():
            for layer, p in params.items():
                p.copy_(saved[layer])


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


def model_num_layers(base_id: str) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) from the model config only (no weights)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(base_id)
    except Exception as e:  # offline / missing dir: one line
        raise UsageError(f"cannot read the config of {base_id!r}: {str(e).splitlines()[0] if str(e) else e}") from None
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


# --------------------------------------------------------------------------------------------------------------------
# Accuracy


@dataclass
class Accuracy:
    """Accuracy of one model state: the mean over benchmarks of each benchmark's accuracy (mean over seeds)."""

    accuracy: float
    per_benchmark: dict[str, dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict, repr=False)  # benchmark name -> EvalResult

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "per_benchmark": self.per_benchmark}


def accuracy(model: nn.Module, tokenizer: Any, benches: Sequence[Any], args: argparse.Namespace, template: Any, *,
             greedy: bool = False) -> Accuracy:
    """Evaluate the model *as it is now* (vectors, hooks) on every benchmark with :func:`evaluate_model`.

    ``greedy`` (or ``--temperature 0``): T = 0, one sample, first seed. Otherwise ``--temperature``, ``--seeds``, and
    ``--num-samples`` (default: the benchmark's own, 32 for AIME/AMC)."""
    from analysis.evaluate import evaluate_model, grading_options, make_params, metric_name, samples_for

    greedy = greedy or args.temperature == 0
    params = make_params(args, greedy=greedy)
    seeds = list(args.seeds[:1]) if greedy else list(args.seeds)
    per: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    for b in benches:
        k = samples_for(b, args, greedy)
        res = evaluate_model(model, tokenizer, b.problems, template=template, params=params, num_samples=k,
                             seeds=seeds, batch_size=args.batch_size, timeout_s=args.reward_timeout,
                             options=grading_options(args),
                             backend=args.backend, progress=False)
        per[b.name] = {"accuracy": res.accuracy, "std": res.std, "metric": metric_name(k), "num_samples": k,
                       "seeds": seeds, "num_problems": len(b.problems)}
        results[b.name] = res
    mean = sum(v["accuracy"] for v in per.values()) / len(per)
    return Accuracy(mean, per, results)


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "seeds": list(args.seeds), "num_samples": args.num_samples,
            "limit": args.limit, "backend": args.backend}


def relative_score(x: float | None, low: float | None, high: float | None) -> float | None:
    """``(x − low) / (high − low)``; None when a term is missing or the denominator is 0."""
    if x is None or low is None or high is None:
        return None
    den = high - low
    if den == 0 or not math.isfinite(den):
        return None
    return (x - low) / den


# --------------------------------------------------------------------------------------------------------------------
# Token sequences (prompt + sampled completion) and teacher-forced batches


@dataclass
class Sequences:
    """Prompt and completion token ids, one row per sample; ``problem`` maps a row to its problem index."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    problem: list[int]
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def num_tokens(self) -> int:
        return sum(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))

    def batches(self, batch_size: int, device: str | torch.device = "cpu", pad_id: int = 0) -> Iterator["Batch"]:
        for start in range(0, len(self), batch_size):
            rows = list(range(start, min(start + batch_size, len(self))))
            yield Batch.build([self.prompt_ids[i] for i in rows], [self.completion_ids[i] for i in rows], rows,
                              device, pad_id)


@dataclass
class Batch:
    """Right-padded prompt+completion rows (real tokens at positions ``0 .. len-1``, as in an unpadded run)."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S) long
    prompt_len: torch.Tensor  # (B,)
    length: torch.Tensor  # (B,) prompt + completion
    rows: list[int]

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], rows: list[int],
              device: str | torch.device, pad_id: int) -> "Batch":
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return cls(ids.to(device), mask.to(device), torch.tensor([len(p) for p in prompts], device=device),
                   torch.tensor([len(s) for s in seqs], device=device), rows)

    def positions(self, kind: str = "all") -> torch.Tensor:
        """(B, S) bool mask: ``all`` real tokens, ``prompt`` tokens, ``completion`` tokens, or ``predict``: the
        positions whose next-token distribution produced a completion token (``prompt_len − 1 .. len − 2``)."""
        s = self.input_ids.shape[1]
        pos = torch.arange(s, device=self.input_ids.device)[None, :]
        p, n = self.prompt_len[:, None], self.length[:, None]
        if kind == "all":
            return pos < n
        if kind == "prompt":
            return pos < p
        if kind == "completion":
            return (pos >= p) & (pos < n)
        if kind == "predict":
            return (pos >= p - 1) & (pos < n - 1)
        raise ValueError(f"unknown position kind {kind!r}; use all, prompt, completion or predict")

    def forward(self, model: nn.Module, **kwargs: Any):
        return model(input_ids=self.input_ids, attention_mask=self.attention_mask, **kwargs)


def sample_sequences(model: nn.Module, tokenizer: Any, problems: Sequence[Mapping[str, Any]], template: Any,
                     args: argparse.Namespace, *, num_samples: int = 1, temperature: float | None = None,
                     seed: int | None = None) -> Sequences:
    """Sample completions for ``problems`` with the model as it is now (the same generation path as evaluation)."""
    from steering.generation import SamplingParams, generate

    temp = args.temperature if temperature is None else temperature
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temp, top_p=args.top_p, top_k=args.top_k,
                            do_sample=temp > 0)
    prompts = [template.render(p["question"], tokenizer=tokenizer) for p in problems]
    res = generate(model, tokenizer, prompts, params, num_return_sequences=num_samples, batch_size=args.batch_size,
                   seed=args.seeds[0] if seed is None else seed, backend=args.backend,
                   progress=not getattr(args, "no_progress", False))
    problem = [i for i in range(len(prompts)) for _ in range(num_samples)]
    return Sequences([list(p) for p in res.prompt_ids], [list(c) for c in res.completion_ids], problem,
                     [prompts[i] for i in problem])


def pad_id(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def problems_of(benches: Sequence[Any], limit: int | None = None) -> list[dict[str, Any]]:
    """All problems of the benchmarks, in order (the first ``limit`` in all)."""
    out = [p for b in benches for p in b.problems]
    return out[:limit] if limit else out


def decode_tokens(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """Each token's own text (byte-level BPE pieces decoded one at a time)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def kl_per_token(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position (``(..., V)`` logits -> ``(...)``), in fp32."""
    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)  # >= 0; float rounding can dip a hair below
