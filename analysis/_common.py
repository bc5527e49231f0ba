"""What the mechanistic analysis commands share once a model is loaded (not a command: the name starts with ``_``).

- :func:`use_vectors`: any set of vectors -- one layer, a pair, another checkpoint's -- set on a model loaded with
  ``analysis.cli.load_steerable`` as real BEFT parameters (the same path training and generation use), never by
  reloading;
- :func:`accuracy`: the accuracy of the model as it is now, through the evaluation core
  (``steering.evaluation.evaluate_model``; every accuracy number of every command comes from it);
- sampled prompt+completion token sequences (:func:`sample_sequences`), and right-padded teacher-forced batches over
  them (:class:`Batch`), with masks for the prompt / completion / "predicts a completion token" positions.

The command-line arguments and model loading these build on live in ``analysis.cli``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from analysis.cli import UsageError
from steering import hooks
from steering import readout
from steering import vectors as sv
from steering.evaluation import EvalSettings

# --------------------------------------------------------------------------------------------------------------------
# Vectors on a loaded model


# One implementation each, in the core (train's probes use them too); re-exported under their analysis names.
use_vectors = sv.use_vectors
Batch = readout.Batch
kl_per_token = readout.kl_per_token


# --------------------------------------------------------------------------------------------------------------------
# The residual stream with a given set of vectors, and the shift they cause


def resid_post(model: nn.Module, batch: "Batch", vectors: Mapping[int, torch.Tensor], layers: Iterable[int]
               ) -> dict[int, torch.Tensor]:
    """``{j: blocks.j.hook_resid_post}`` (B, S, d) on ``batch`` with exactly ``vectors`` on (:func:`use_vectors`).
    Only the last position's logits are computed: the residuals are what is wanted."""
    names = [f"blocks.{j}.hook_resid_post" for j in layers]
    with use_vectors(model, vectors):
        _, cache = hooks.run_with_cache(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        names=names, logits_to_keep=1)
    return {int(name.split(".")[1]): cache[name] for name in names}


def resid_shift(steered: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``steered − base`` at the ``mask``ed positions, ``(T, d)`` in fp64: the steering-induced shift of the residual
    (``persistence``'s Δ, ``diffsae``'s ΔF). fp64 makes the difference of two fp32 / bf16 values exact."""
    return (steered.double() - base.double())[mask]


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


_ENGINES: dict[tuple[str, str], Any] = {}


def generation_model(model: nn.Module, settings: EvalSettings) -> Any:
    """What generates for the settings' ``backend``: the model itself (hf, static), or for vllm an engine serving the
    model's base
    with exactly the vectors the model carries now (``use_vectors``, ``steering_scale``: every analysis changes the
    steering through the BEFT vectors, which the engine mirrors). One engine per base, kept for the command."""
    if settings.backend != "vllm":
        return model
    from steering.vllm_engine import VLLMError, VLLMModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (str(base.config.name_or_path), str(base.dtype).removeprefix("torch."))
    if key not in _ENGINES:
        device = "cuda" if next(model.parameters()).device.type == "cuda" else "cpu"
        try:
            _ENGINES[key] = VLLMModel(key[0], dtype=key[1], device=device, **settings.vllm_options())
        except VLLMError as e:
            raise UsageError(f"--backend vllm: {e}") from None
    engine = _ENGINES[key]
    zeros = {layer: torch.zeros(base.config.hidden_size) for layer in range(base.config.num_hidden_layers)}
    engine.load_vectors({**zeros, **(sv.get_vectors(model) if sv.vector_parameters(model) else {})})
    return engine


def accuracy(model: nn.Module, tokenizer: Any, benches: Sequence[Any], settings: EvalSettings, template: Any, *,
             greedy: bool = False) -> Accuracy:
    """Evaluate the model *as it is now* (vectors, hooks) on every benchmark with
    ``steering.evaluation.evaluate_model``.

    ``greedy`` (or temperature 0): T = 0, one sample, first seed. Otherwise the settings' temperature, seeds and
    samples per problem (default: the benchmark's own, 32 for AIME/AMC)."""
    from steering.evaluation import evaluate_model, metric_name

    greedy = greedy or settings.greedy
    params = settings.sampling_params(greedy=greedy)
    seeds = settings.seeds_for(greedy)
    per: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    for b in benches:
        k = settings.samples_for(b.default_samples, greedy)
        res = evaluate_model(generation_model(model, settings), tokenizer, b.problems, template=template,
                             params=params, num_samples=k, seeds=seeds, batch_size=settings.batch_size,
                             timeout_s=settings.timeout_s, options=settings.grading, backend=settings.backend,
                             progress=False)
        per[b.name] = {"accuracy": res.accuracy, "std": res.std, "metric": metric_name(k), "num_samples": k,
                       "seeds": seeds, "num_problems": len(b.problems)}
        results[b.name] = res
    mean = sum(v["accuracy"] for v in per.values()) / len(per)
    return Accuracy(mean, per, results)


# --------------------------------------------------------------------------------------------------------------------
# Token sequences (prompt + sampled completion) and teacher-forced batches


@dataclass
class Sequences:
    """Prompt and completion token ids, one row per sample; ``problem`` maps a row to its problem index."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    problem: list[int]
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)  # decoded as generation decodes them (what is scored)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def num_tokens(self) -> int:
        return sum(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))

    def batches(self, batch_size: int, device: str | torch.device = "cpu", pad_id: int = 0) -> Iterator["Batch"]:
        for start in range(0, len(self), batch_size):
            rows = list(range(start, min(start + batch_size, len(self))))
            yield Batch.build([self.prompt_ids[i] for i in rows], [self.completion_ids[i] for i in rows], rows,
                              device, pad_id)


def sample(model: nn.Module, tokenizer: Any, questions: Sequence[str], template: Any, params: Any, *, seed: int,
           batch_size: int | None, num_samples: int = 1, backend: str = "hf", progress: bool = False):
    """``(prompts, steering.generation.GenerationResult)``: ``num_samples`` completions per question, with whatever
    steering the model carries now (the same generation path as evaluation and training)."""
    from steering.generation import generate

    prompts = [template.render(q, tokenizer=tokenizer) for q in questions]
    return prompts, generate(model, tokenizer, prompts, params, num_return_sequences=num_samples,
                             batch_size=batch_size, seed=seed, backend=backend, progress=progress,
                             stops=template.stops(tokenizer, model))


def sample_sequences(model: nn.Module, tokenizer: Any, problems: Sequence[Mapping[str, Any]], template: Any,
                     settings: EvalSettings, *, num_samples: int = 1, progress: bool = False) -> Sequences:
    """Sample completions for ``problems`` with the evaluation settings (first seed, batch size, backend)."""
    prompts, res = sample(generation_model(model, settings), tokenizer, [p["question"] for p in problems], template,
                          settings.sampling_params(), seed=settings.seeds[0], batch_size=settings.batch_size,
                          num_samples=num_samples, backend=settings.backend, progress=progress)
    problem = [i for i in range(len(prompts)) for _ in range(num_samples)]
    return Sequences([list(p) for p in res.prompt_ids], [list(c) for c in res.completion_ids], problem,
                     [prompts[i] for i in problem], list(res.completions))


def sample_texts(model: nn.Module, tokenizer: Any, questions: Sequence[str], template: str, params: Any, *, seed: int,
                 batch_size: int | None) -> tuple[list[str], list[str]]:
    """``(prompts, completions)``: one completion per question, as the trace commands generate (the template by
    name, one seed, ``batch_size`` rows per call)."""
    from steering.templates import get_template

    prompts, res = sample(model, tokenizer, questions, get_template(template), params, seed=seed,
                          batch_size=batch_size)
    return prompts, list(res.completions)


def problems_of(benches: Sequence[Any], limit: int | None = None) -> list[dict[str, Any]]:
    """All problems of the benchmarks, in order (the first ``limit`` in all)."""
    out = [p for b in benches for p in b.problems]
    return out[:limit] if limit else out


def decode_tokens(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """Each token's own text (byte-level BPE pieces decoded one at a time)."""
    return [tokenizer.decode([int(i)]) for i in ids]
