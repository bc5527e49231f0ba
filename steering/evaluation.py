"""Accuracy of a model on problems: generate with the shared generation path, score with the reward, aggregate.

Training validation (``train.validation.Validator``) and ``python -m analysis evaluate`` both go through
:func:`sample_and_score`, so the same problems, model and settings give the same verdicts (at T=0 the same number;
at T>0 the two seed their samples differently, and validation shards the problems across processes):

- completions come from :func:`steering.generation.generate`, the path training's rollouts use, with the steering
  vectors (or LoRA, or nothing) the model carries;
- each completion is graded by :func:`steering.rewards.score_batch`, the training reward's own check, with its
  :class:`steering.rewards.GradingOptions`;
- the verdicts are aggregated with the papers' metrics below.

Metrics, as plain functions of verdicts given per problem as a list of booleans, one per sample (``correct[i][j]``:
sample ``j`` of problem ``i`` was verified correct); accuracies are fractions in [0, 1]:

- :func:`avg_at_k`: the mean, over problems, of the fraction of a problem's ``k`` samples that are correct. This is
  the papers' "avg@32" (AIME24, AIME25 and AMC23 at T = 1) and, with one sample, their plain accuracy. It is an
  unbiased estimate of pass@1 that uses all ``k`` samples.
- :func:`pass_at_1`: the fraction of problems whose *first* sample is correct (what one sample per problem gives;
  with greedy decoding it is the greedy accuracy).
- :func:`pass_at_k`: the unbiased pass@k estimator of Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)`` per problem
  with ``n`` samples of which ``c`` are correct, averaged over problems.
- :func:`mean_std`: mean and standard deviation over seeds (sample std, ``ddof=1``; one seed gives std 0).

Library use::

    from steering.evaluation import evaluate_model
    from steering.generation import SamplingParams
    res = evaluate_model(model, tokenizer, problems, template="qwen_math",
                         params=SamplingParams(max_new_tokens=512, temperature=0.0), num_samples=1, seeds=[0])
    res.accuracy, res.per_problem_accuracy, res.seeds[0].correct
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from steering import generation, rewards

Correctness = Sequence[Sequence[bool]]

# --------------------------------------------------------------------------------------------------------------------
# Metrics


def _check(correct: Correctness) -> None:
    if len(correct) == 0:
        raise ValueError("no problems: correctness is empty")
    for i, row in enumerate(correct):
        if len(row) == 0:
            raise ValueError(f"problem {i} has no samples")


def avg_at_k(correct: Correctness) -> float:
    """Mean over problems of the fraction of that problem's samples that are correct (avg@k)."""
    _check(correct)
    return sum(sum(bool(x) for x in row) / len(row) for row in correct) / len(correct)


def pass_at_1(correct: Correctness) -> float:
    """Fraction of problems whose first sample is correct."""
    _check(correct)
    return sum(bool(row[0]) for row in correct) / len(correct)


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (number of samples), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k / i), numerically stable (Chen et al. 2021)
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(correct: Correctness, k: int) -> float:
    """Unbiased pass@k averaged over problems; every problem needs at least ``k`` samples."""
    _check(correct)
    return sum(pass_at_k_single(len(row), sum(bool(x) for x in row), k) for row in correct) / len(correct)


def mean_std(values: Iterable[float], ddof: int = 1) -> tuple[float, float]:
    """``(mean, std)`` of per-seed values; std uses ``ddof`` (default 1, the sample std) and is 0 for one value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    mean = sum(vals) / len(vals)
    if len(vals) <= ddof:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - ddof)
    return mean, math.sqrt(var)


def metric_name(num_samples: int) -> str:
    return f"avg@{num_samples}" if num_samples > 1 else "pass@1"


# --------------------------------------------------------------------------------------------------------------------
# Settings


def grading_options(values: Mapping[str, Any]) -> rewards.GradingOptions:
    """The ``reward_*`` grading values (``reward_float_rounding`` ...: the training config's fields and the analysis
    flags share these names) as a ``steering.rewards.GradingOptions``; the one place that builds it from them."""
    return rewards.GradingOptions(**{f.name: values[f"reward_{f.name}"]
                                     for f in dataclasses.fields(rewards.GradingOptions)})


BACKENDS = ("hf", "static", "vllm")


@dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated: sampling, seeds, batching, grading, generation backend. Its defaults are the
    analysis commands' (``analysis.settings`` turns them into flags); training validation builds one from its config
    (``train.config.SteeringGRPOConfig.eval_settings``)."""

    temperature: float = 1.0  # 0 = greedy; 1.0 is the papers' setting
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 4096
    max_length: int | None = None  # a limit on prompt + completion per problem instead (overrides max_new_tokens)
    num_samples: int | None = None  # samples per problem; None: each benchmark's own default
    seeds: tuple[int, ...] = (0,)
    batch_size: int | None = 256  # completions per generation call; None: all at once
    timeout_s: float = 2.0  # seconds per answer check
    grading: rewards.GradingOptions = rewards.DEFAULT_OPTIONS
    backend: str = "hf"  # steering.generation's backend: hf, static or vllm
    vllm_kv_cache_gb: float | None = None  # vllm: the engine's KV-cache size (None: its own default)
    vllm_gpu_memory_utilization: float = 0.9  # vllm on GPU: the share of GPU memory the engine may take

    def check(self) -> None:
        """Reject bad values (``ValueError`` naming the field) before anything loads."""
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.sampling_params()  # SamplingParams' own checks (GenerationError is a ValueError)
        for name, value, low in (("max_length", self.max_length, 2), ("batch_size", self.batch_size, 1)):
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not self.seeds:
            raise ValueError("seeds is empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {list(self.seeds)}")
        try:
            rewards.check_timeout(self.timeout_s)
        except ValueError as e:
            raise ValueError(f"timeout_s {e}") from None
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.vllm_kv_cache_gb is not None and not self.vllm_kv_cache_gb > 0:
            raise ValueError(f"vllm_kv_cache_gb must be > 0, got {self.vllm_kv_cache_gb}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling_params(self, *, greedy: bool = False) -> generation.SamplingParams:
        """The sampling settings as ``steering.generation.SamplingParams``; ``greedy``: T = 0."""
        temperature = 0.0 if greedy else self.temperature
        return generation.SamplingParams(max_new_tokens=self.max_new_tokens, temperature=temperature,
                                         top_p=self.top_p, top_k=self.top_k, do_sample=temperature > 0)

    def seeds_for(self, greedy: bool = False) -> list[int]:
        """The evaluation seeds: the first alone when greedy (every seed would give the same completions)."""
        return list(self.seeds[:1]) if greedy or self.greedy else list(self.seeds)

    def samples_for(self, default_samples: int, greedy: bool = False) -> int:
        """Samples per problem of a benchmark whose own default is ``default_samples``: 1 when greedy, else
        ``num_samples`` or that default."""
        if greedy or self.greedy:
            return 1
        return self.num_samples if self.num_samples is not None else default_samples

    def vllm_options(self) -> dict[str, Any]:
        """The vLLM settings as ``steering.vllm_engine.VLLMModel`` keyword arguments."""
        return {"kv_cache_gb": self.vllm_kv_cache_gb, "gpu_memory_utilization": self.vllm_gpu_memory_utilization,
                "max_model_len": self.max_length}

    def record(self) -> dict[str, Any]:
        """The sampling settings as a command's result.json records them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "seeds": list(self.seeds), "num_samples": self.num_samples,
                "backend": self.backend}


# --------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class SeedResult:
    """One seed's evaluation: ``correct[i][j]`` is the verdict of sample ``j`` of problem ``i``; ``samples[i][j]``
    the full record (completion, extracted answer, reward, ...)."""

    seed: int
    correct: list[list[bool]]
    samples: list[list[dict[str, Any]]]

    @property
    def accuracy(self) -> float:
        """avg@k over this seed's samples (= plain accuracy with one sample per problem)."""
        return avg_at_k(self.correct)

    @property
    def pass_at_1(self) -> float:
        return pass_at_1(self.correct)

    @property
    def num_samples(self) -> int:
        return len(self.correct[0]) if self.correct else 0

    def metrics(self, pass_ks: Iterable[int] = ()) -> dict[str, Any]:
        k = self.num_samples
        out: dict[str, Any] = {
            "seed": self.seed,
            "accuracy": self.accuracy,
            f"avg@{k}": self.accuracy,
            "pass@1": self.pass_at_1,
            "num_problems": len(self.correct),
            "num_samples": k,
            "num_correct": sum(sum(row) for row in self.correct),
            "num_completions": sum(len(row) for row in self.correct),
            "num_unparsed": sum(1 for row in self.samples for s in row if not s.get("parsed")),  # the reward's count
            "num_timed_out": sum(1 for row in self.samples for s in row if s.get("timed_out")),
            # the per-problem table: problem i's correct samples (of k) under this seed, in the problems' order
            "problem_correct": [sum(bool(x) for x in row) for row in self.correct],
        }
        for pk in sorted(set(pass_ks)):
            if 1 < pk <= k:
                out[f"pass@{pk}"] = pass_at_k(self.correct, pk)
        return out


@dataclass
class EvalResult:
    """The evaluation of one model on one problem list, over one or more seeds.

    - ``accuracy`` / ``std``: mean and std over seeds of the per-seed avg@k;
    - ``per_seed_accuracy``: the per-seed avg@k values;
    - ``per_problem_accuracy``: for each problem, the fraction of its samples (all seeds) that are correct;
    - ``seeds``: the :class:`SeedResult` of each seed (verdicts and full sample records).
    """

    problems: list[dict[str, Any]]
    num_samples: int
    seeds: list[SeedResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def per_seed_accuracy(self) -> list[float]:
        return [s.accuracy for s in self.seeds]

    @property
    def accuracy(self) -> float:
        return mean_std(self.per_seed_accuracy)[0]

    @property
    def std(self) -> float:
        return mean_std(self.per_seed_accuracy)[1]

    @property
    def per_problem_accuracy(self) -> list[float]:
        n = len(self.problems)
        return [sum(sum(s.correct[i]) for s in self.seeds) / sum(len(s.correct[i]) for s in self.seeds)
                for i in range(n)]

    def records(self) -> Iterable[dict[str, Any]]:
        for s in self.seeds:
            for row in s.samples:
                yield from row

    def summary(self, pass_ks: Iterable[int] = ()) -> dict[str, Any]:
        per_seed = [s.metrics(pass_ks) for s in self.seeds]
        mean, std = mean_std(self.per_seed_accuracy)
        out = {"accuracy": mean, "std": std, "num_samples": self.num_samples,
               "metric": metric_name(self.num_samples), "per_seed": per_seed}
        p1_mean, p1_std = mean_std([p["pass@1"] for p in per_seed])
        out["pass@1"], out["pass@1_std"] = p1_mean, p1_std
        return out


# --------------------------------------------------------------------------------------------------------------------
# Generate, then score


def problem_key(problem: Mapping[str, Any]) -> str:
    """A short content hash of a problem (question and answer): what matches the same problem across two evaluation
    runs (``analysis compare``), whatever its index."""
    text = f"{problem['question']}\0{problem['answer']}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def as_problems(problems: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{"id", "question", "answer"}`` rows (an ``id`` is kept if present, else the index)."""
    out = []
    for i, p in enumerate(problems):
        if not isinstance(p, Mapping) or "question" not in p or "answer" not in p:
            raise ValueError(f"problem {i} must be a mapping with 'question' and 'answer'")
        out.append({"id": p.get("id", i), "question": str(p["question"]), "answer": str(p["answer"])})
    return out


def sample_and_score(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Mapping[str, Any]],
    prompts: Sequence[str],
    *,
    params: Any,
    answer_format: str,
    seed: int,
    generation_seed: int,
    num_samples: int = 1,
    batch_size: int | None = None,
    reward_style: str = "pm1",
    timeout_s: float = 2.0,
    options: Any = None,
    backend: str = "hf",
    progress: bool = False,
    budgets: Sequence[int] | None = None,
    stops: Any = None,
) -> SeedResult:
    """One evaluation seed: ``num_samples`` completions of each prompt (``prompts[i]`` asks ``problems[i]``), each
    scored against its ground truth.

    ``generate`` gets ``generation_seed`` (chunk ``c`` of the call is seeded ``generation_seed + c``); ``seed`` is
    what the result records. ``budgets[i]``, if given, cuts problem ``i``'s completions to that many tokens (see
    :func:`evaluate_model`'s ``max_length``). The other arguments go to ``steering.generation.generate``
    (``params``, ``batch_size``, ``backend``, ``progress``, ``stops``: the template's, ``template.stops(tokenizer)``) and ``steering.rewards.score_batch`` (``answer_format``,
    ``reward_style``, ``timeout_s``, ``options``)."""
    if len(prompts) != len(problems):
        raise ValueError(f"{len(prompts)} prompts for {len(problems)} problems")
    result = generation.generate(model, tokenizer, list(prompts), params, num_return_sequences=num_samples,
                                 batch_size=batch_size, seed=generation_seed, backend=backend, progress=progress,
                                 stops=stops)
    if budgets is not None:
        _truncate(result, tokenizer, budgets, num_samples)
    texts, extras = _completion_texts(result, len(prompts), num_samples)
    verdicts = rewards.score_batch([t for row in texts for t in row],
                                   [p["answer"] for p in problems for _ in range(num_samples)],
                                   answer_format=answer_format, reward_style=reward_style, timeout_s=timeout_s,
                                   options=options)
    correct: list[list[bool]] = []
    samples: list[list[dict[str, Any]]] = []
    for i, p in enumerate(problems):
        c_row, s_row = [], []
        for j, text in enumerate(texts[i]):
            r = verdicts[i * num_samples + j]
            c_row.append(bool(r.correct))
            s_row.append({"problem_id": p["id"], "seed": seed, "sample": j, "question": p["question"],
                          "answer": p["answer"], "completion": text, "extracted": r.extracted,
                          "parsed": bool(r.parsed), "correct": bool(r.correct), "reward": float(r.reward),
                          "timed_out": bool(r.timed_out), "status": r.status, **extras[i][j]})
        correct.append(c_row)
        samples.append(s_row)
    return SeedResult(seed, correct, samples)


def _completion_texts(result: Any, n_prompts: int, n_samples: int) -> tuple[list[list[str]], list[list[Any]]]:
    """(texts, extras) per prompt from a :class:`steering.generation.GenerationResult`, whose rows are in prompt order:
    prompt ``i``'s samples are rows ``i*n .. i*n+n-1``."""
    flat = list(result.completions)
    if len(flat) != n_prompts * n_samples:
        raise RuntimeError(f"generate returned {len(flat)} completions for {n_prompts} prompts x {n_samples} samples")
    ids, finished = result.completion_ids, result.finished
    texts = [flat[i * n_samples:(i + 1) * n_samples] for i in range(n_prompts)]
    extras = [[{"num_tokens": len(ids[i * n_samples + j]), "finished": bool(finished[i * n_samples + j]),
                "ended": result.ended[i * n_samples + j]}
               for j in range(n_samples)] for i in range(n_prompts)]
    return texts, extras


def _truncate(result: Any, tokenizer: Any, budgets: Sequence[int], n: int) -> None:
    """Cut row ``r`` (prompt ``r // n``) to ``budgets[r // n]`` completion tokens, re-decoding the text."""
    for r, ids in enumerate(result.completion_ids):
        budget = budgets[r // n]
        if len(ids) > budget:
            result.completion_ids[r] = ids[:budget]
            result.completions[r] = tokenizer.decode(ids[:budget], skip_special_tokens=True)
            result.finished[r] = False
            result.ended[r] = "length"


# Generation seeds chunk c of a call with ``seed + c``; evaluation seed s uses ``s * SEED_STRIDE`` so that the chunks of
# different evaluation seeds never share a random stream.
SEED_STRIDE = 1_000_003


def evaluate_model(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Mapping[str, Any]],
    *,
    template: Any = "qwen_math",
    params: Any = None,
    num_samples: int = 1,
    seeds: Iterable[int] = (0,),
    batch_size: int | None = None,
    reward_style: str = "pm1",
    timeout_s: float = 2.0,
    backend: str = "hf",
    progress: bool = False,
    answer_format: str | None = None,
    max_length: int | None = None,
    options: Any = None,
) -> EvalResult:
    """Generate ``num_samples`` completions per problem for each seed, and verify each against the ground truth.

    Args:
        model, tokenizer: a causal LM (plain, steered PeftModel, LoRA PeftModel, ...) and its tokenizer.
        problems: ``{"question", "answer"}`` mappings (an ``id`` is kept if present).
        template: a :class:`steering.templates.PromptTemplate` or a name / path for ``get_template`` ("qwen_math",
            "r1"). The prompt is ``template.render(question, tokenizer)``; completions end where
            ``template.stops(tokenizer, model)`` says; answers are extracted in the template's ``answer_format``
            (unless ``answer_format`` is given).
        params: :class:`steering.generation.SamplingParams` (T = 0 is greedy). Default: T = 1, 1024 new tokens.
        num_samples: completions per problem and seed (k of avg@k).
        seeds: one evaluation per seed; ``generate`` gets ``seed * SEED_STRIDE`` (see :data:`SEED_STRIDE`).
        batch_size: rows (prompts x samples) per generation call (``steering.generation.generate``'s
            ``batch_size``; results depend on it, since each chunk is seeded on its own). Default: all at once.
        reward_style, timeout_s, options: passed to ``steering.rewards.score_batch`` (the training reward's check;
            ``options`` is a ``steering.rewards.GradingOptions``, default math-verify's own).
        backend, progress: passed to ``generate`` (the same generation path training uses).
        max_length: if given, a limit on prompt + completion tokens per problem (the papers' "max length", 4096 for
            Qwen): generation runs to ``max_length - shortest prompt`` new tokens and each completion is then cut to
            ``max_length - its prompt length`` (cutting later tokens never changes earlier ones, so this is exactly
            a per-problem limit). ``params.max_new_tokens`` is ignored then.

    Returns:
        :class:`EvalResult`: ``.accuracy`` (mean avg@k over seeds), ``.std``, ``.per_seed_accuracy``,
        ``.per_problem_accuracy``, and per seed ``.seeds[s].correct[i][j]`` / ``.seeds[s].samples[i][j]``.
    """
    from steering.templates import get_template

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    probs = as_problems(problems)
    if not probs:
        raise ValueError("no problems to evaluate")
    tmpl = get_template(template) if isinstance(template, (str, os.PathLike)) else template
    fmt = answer_format or tmpl.answer_format
    if params is None:
        params = generation.SamplingParams(max_new_tokens=1024, temperature=1.0)
    prompts = [tmpl.render(p["question"], tokenizer=tokenizer) for p in probs]
    stops = tmpl.stops(tokenizer, model)  # where completions end: the template's, as in training
    budgets = None
    if max_length is not None:
        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        budgets = [max(0, int(max_length) - n) for n in lengths]
        params = dataclasses.replace(params, max_new_tokens=max(1, max(budgets)))
    seed_results = [sample_and_score(model, tokenizer, probs, prompts, params=params, answer_format=fmt, seed=seed,
                                     generation_seed=seed * SEED_STRIDE, num_samples=num_samples,
                                     batch_size=batch_size, reward_style=reward_style, timeout_s=timeout_s,
                                     options=options, backend=backend, progress=progress, budgets=budgets,
                                     stops=stops)
                    for seed in seeds]
    settings = {"template": tmpl.name, "answer_format": fmt, "sampling": dataclasses.asdict(params),
                "num_samples": num_samples, "seeds": seeds, "batch_size": batch_size,
                "generation_seeds": [s * SEED_STRIDE for s in seeds], "reward_style": reward_style,
                "reward_timeout_s": timeout_s,
                "grading_options": dataclasses.asdict(options or rewards.DEFAULT_OPTIONS),
                "backend": backend, "max_length": max_length,
                "stops": {"token_ids": list(stops.token_ids), "strings": list(stops.strings)}}
    return EvalResult(probs, num_samples, seed_results, settings)
