"""Generation with steering active: one entry point for rollouts (training), evaluation and analysis.

Three backends, selected by name:

``"hf"``
    ``model.generate`` with a ``GenerationConfig`` built from :class:`SamplingParams` and a dynamic KV cache. The
    reference.

``"static"``
    The same ``model.generate`` call with transformers' own static KV cache (``cache_implementation="static"``): a
    cache of fixed shape, for which transformers compiles the model's forward (CUDA graphs) on CUDA. The model's own
    forward and sampling loop, only the cache differs, so both backends sample from the same distribution; on CPU in
    fp32 they give the same tokens for the same seed (tested). Public transformers API only.

``"vllm"``
    A vLLM engine (``steering.vllm_engine.VLLMModel``) serving the same base with the vectors as ``down_proj``
    biases; the engine batches and samples, completions are cut here like every other backend's. Greedy completions
    equal ``"hf"``'s (tested on vLLM-CPU).

Every backend ends completions where the template says (``stops``: end tokens and stop strings) and cuts them with
:func:`end_completions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


BACKENDS = ("hf", "static", "vllm")


class GenerationError(ValueError):
    """Bad input to the generation path: the message says what to fix."""


# --------------------------------------------------------------------------------------------------------------------
# Public API


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` (or ``do_sample=False``) means greedy.

    ``top_k == 0`` and ``top_p == 1`` disable those filters (the paper's recipe: T=1, top-p 1, no top-k).
    ``stop_token_ids`` adds end tokens to the tokenizer's EOS and the model's ``generation_config.eos_token_id``.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # written so that NaN fails too
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return (not self.do_sample) or self.temperature == 0

    def generation_config(self, tokenizer: Any = None, model: nn.Module | None = None, stops: Any = None):
        """The ``transformers.GenerationConfig`` both backends use. Every sampling field is set explicitly, so the
        model's own ``generation_config.json`` defaults (e.g. Qwen's top_k=20) never leak in. ``stops``
        (``steering.templates.Stops``) adds its end tokens (its stop strings go to :func:`generate_ids`)."""
        from transformers import GenerationConfig

        eos = eos_token_ids(tokenizer, model, [*(self.stop_token_ids or []), *(stops.token_ids if stops else ())])
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None and model is not None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None and eos:
            pad = eos[0]
        config_values: dict[str, Any] = dict(
            max_new_tokens=int(self.max_new_tokens),
            eos_token_id=eos or None,
            pad_token_id=pad,
            repetition_penalty=float(self.repetition_penalty),
        )
        if self.greedy:
            config_values.update(do_sample=False)
        else:
            config_values.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                                 top_k=int(self.top_k), min_p=self.min_p)
        return GenerationConfig(**config_values)


@dataclass
class GenerationResult:
    """Outputs in row order: prompt ``i``'s ``num_return_sequences`` samples are rows ``i*n .. i*n+n-1``.

    ``completion_ids`` are cut after the first end token or after the first token that completes a stop string (that
    token kept: see :func:`end_completions`); ``ended[r]`` says how row ``r`` ended: ``"stop"`` (a stop string),
    ``"eos"`` (an end token) or ``"length"`` (``max_new_tokens``); ``finished[r]`` is ``ended[r] != "length"``.
    ``completions`` are decoded with special tokens stripped.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    finished: list[bool]
    num_return_sequences: int = 1
    backend: str = "hf"
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    ended: list[str] = field(default_factory=list)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def eos_token_ids(tokenizer: Any = None, model: nn.Module | None = None, extra: Sequence[int] | None = None) -> list[int]:
    """End tokens: the tokenizer's EOS, then the model's ``generation_config.eos_token_id`` (like TRL), then extras."""
    out: list[int] = []

    def add(x: Any) -> None:
        if x is None:
            return
        for t in (x if isinstance(x, (list, tuple)) else [x]):
            if t is not None and int(t) not in out:
                out.append(int(t))

    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    if model is not None:
        gen_cfg = getattr(model, "generation_config", None)
        add(getattr(gen_cfg, "eos_token_id", None))
        if not out:
            add(getattr(model.config, "eos_token_id", None))
    add(list(extra or []))
    return out


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    num_return_sequences: int = 1,
    batch_size: int | None = None,
    seed: int | None = None,
    backend: str = "hf",
    progress: bool = False,
    add_special_tokens: bool = True,
    compile: bool | None = None,
    stops: Any = None,
) -> GenerationResult:
    """Sample completions for ``prompts`` (strings, or lists of token ids) with the steering vectors active.

    ``stops`` (``steering.templates.Stops``, from ``template.stops(tokenizer)``) says where completions end, besides
    the tokenizer's and the model's EOS: both backends stop there and cut there (:func:`end_completions`).

    ``batch_size`` bounds the number of *rows* (prompts x ``num_return_sequences``) per ``generate`` call. With a
    ``seed``, chunk ``c`` is seeded with ``seed + c``, so results do not depend on what earlier chunks consumed, and the
    HF backends see the same random stream. Static backend only: ``compile=False`` keeps transformers from compiling
    the forward (it does on CUDA).
    """
    import time

    check_backend(backend)
    n = int(num_return_sequences)
    if n < 1:
        raise GenerationError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if not len(prompts):
        return GenerationResult([], [], [], [], n, backend)
    prompt_ids = _tokenize(tokenizer, prompts, add_special_tokens)
    gen_cfg = params.generation_config(tokenizer, model, stops)
    stop_strings = list(stops.strings) if stops is not None else []
    if backend == "vllm":
        return _generate_vllm(model, tokenizer, prompt_ids, params, gen_cfg, stop_strings, n, seed)
    # Rows are repeated here (prompt i -> rows i*n .. i*n+n-1), exactly as transformers' own num_return_sequences
    # expansion does; doing it ourselves also allows n > 1 with greedy decoding, which transformers refuses.
    eos = list(gen_cfg.eos_token_id or [])
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else 0
    per_chunk = len(prompt_ids) if batch_size is None else max(1, int(batch_size) // n)
    chunks = [list(range(i, min(i + per_chunk, len(prompt_ids)))) for i in range(0, len(prompt_ids), per_chunk)]
    device = _model_device(model)
    iterator: Any = enumerate(chunks)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(chunks), desc=f"generate[{backend}]")
    completion_ids: list[list[int]] = []
    ended: list[str] = []
    stats: dict[str, Any] = {"steps": 0, "chunks": len(chunks)}
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for c, idx in iterator:
            if seed is not None:
                _seed_all(seed + c)
            input_ids, attention_mask = left_pad([prompt_ids[i] for i in idx for _ in range(n)], pad, device)
            sequences = generate_ids(model, input_ids, attention_mask, gen_cfg, backend=backend, compile=compile,
                                     stop_strings=stop_strings, tokenizer=tokenizer)
            comp, how = end_completions(sequences[:, input_ids.shape[1]:], eos, stop_strings, tokenizer)
            completion_ids.extend(comp)
            ended.extend(how)
            stats["steps"] += int(sequences.shape[1] - input_ids.shape[1])
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True) if tokenizer is not None else []
    rows_prompts = [prompt_ids[i] for i in range(len(prompt_ids)) for _ in range(n)]
    finished = [e != "length" for e in ended]
    return GenerationResult(rows_prompts, completion_ids, texts, finished, n, backend, seconds, stats, ended=ended)


def _generate_vllm(engine: Any, tokenizer: Any, prompt_ids: list[list[int]], params: SamplingParams, gen_cfg: Any,
                   stop_strings: list[str], n: int, seed: int | None) -> GenerationResult:
    """The ``vllm`` backend: ``engine`` is a ``steering.vllm_engine.VLLMModel``; vLLM batches and schedules the rows
    itself, and its completions are cut like every other backend's."""
    import time

    from steering.vllm_engine import VLLMModel

    if not isinstance(engine, VLLMModel):
        raise GenerationError(f"the vllm backend generates with a steering.vllm_engine.VLLMModel, got "
                              f"{type(engine).__name__}")
    eos = list(gen_cfg.eos_token_id or [])
    start = time.perf_counter()
    rows = engine.sample(prompt_ids, params, num_return_sequences=n, seed=seed, eos_ids=eos,
                         stop_strings=stop_strings)
    seconds = time.perf_counter() - start
    completion_ids, ended = end_completions(rows, eos, stop_strings, tokenizer)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True) if tokenizer is not None else []
    rows_prompts = [ids for ids in prompt_ids for _ in range(n)]
    stats = {"steps": max((len(r) for r in rows), default=0), "chunks": 1}
    return GenerationResult(rows_prompts, completion_ids, texts, [e != "length" for e in ended], n, "vllm", seconds,
                            stats, ended=ended)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise GenerationError(f"unknown generation backend {backend!r}; choose one of {list(BACKENDS)}")
    return backend


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    generation_config: Any,
    *,
    backend: str = "hf",
    compile: bool | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
) -> torch.Tensor:
    """``(batch*n, prompt_len + new)`` token ids from a left-padded batch: ``model.generate`` with a dynamic (hf) or
    static KV cache.

    Used by :func:`generate` and by the GRPO rollouts (``train/rollout.py``, which pass TRL's own
    ``GenerationConfig``). ``stop_strings`` (they need the ``tokenizer``: transformers reads the token texts) end a
    row at the token that completes one; finished rows are padded to the batch's end, and :func:`end_completions`
    cuts them."""
    check_backend(backend)
    if backend == "vllm":
        raise RuntimeError("generate_ids runs a transformers model; the vllm backend generates through "
                           "steering.generation.generate with a steering.vllm_engine.VLLMModel")  # a caller's bug
    extra: dict[str, Any] = {}
    if stop_strings:
        if tokenizer is None:
            raise GenerationError("stop strings need the tokenizer (to read the text of the tokens); pass tokenizer=...")
        from transformers import StoppingCriteriaList, StopStringCriteria

        extra["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop_strings))])
    if backend == "static":
        generation_config = static_cache_config(generation_config, compile, input_ids.device)
    elif compile is not None:
        raise GenerationError("compile applies to the static backend only")
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                          **extra)


def static_cache_config(generation_config: Any, compile: bool | None = None,
                        device: torch.device | None = None) -> Any:
    """``generation_config`` with transformers' static KV cache (``cache_implementation="static"``): a cache of fixed
    shape, for which transformers compiles the forward (CUDA graphs) on CUDA. ``compile``: None or True =
    transformers' rule (compiled on CUDA), False = never."""
    import copy

    if compile and device is not None and device.type != "cuda":
        raise GenerationError("compile=True: transformers compiles static-cache decoding on CUDA only; on "
                              f"{device.type} leave compile unset")
    cfg = copy.deepcopy(generation_config)
    cfg.cache_implementation = "static"
    if compile is False:
        cfg.disable_compile = True
    return cfg


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads a teacher-forced batch: the tokenizer's pad token, else its end-of-sequence token, else 0
    (padded positions are masked out, so only that it is a valid id matters)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, side: str,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token-id lists padded to one width: ``side="left"`` for generation (every
    row ends at the last column, where the next token goes), ``side="right"`` for teacher-forced passes (real tokens
    keep positions 0..len-1, as in an unpadded run)."""
    if side not in ("left", "right"):
        raise GenerationError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-padded ``(input_ids, attention_mask)`` for a list of token-id lists (:func:`pad_rows`)."""
    return pad_rows(rows, pad_id, side="left", device=device)


END_REASONS = ("stop", "eos", "length")


def end_completions(completions: torch.Tensor | Sequence[Sequence[int]], eos_ids: Sequence[int],
                    stop_strings: Sequence[str] = (), tokenizer: Any = None) -> tuple[list[list[int]], list[str]]:
    """Each row cut where its completion ends, and how it ended (``"stop"``, ``"eos"`` or ``"length"``).

    A row ends at its first end token (kept), or at the first token at which the decoded text contains one of
    ``stop_strings`` (kept, even when the string ends inside it), whichever comes first. That is where vLLM's ``stop``
    ends a sequence; transformers' ``StopStringCriteria`` never stops earlier (it may stop later: it needs the string
    to overlap the last token's start), so cutting here makes every backend return the same tokens. Padding after the
    end is dropped with the rest."""
    rows = [list(map(int, r)) for r in (completions.cpu().tolist() if torch.is_tensor(completions) else completions)]
    eos = {int(t) for t in eos_ids}
    out: list[list[int]] = []
    how: list[str] = []
    for row in rows:
        end = next((k for k, t in enumerate(row) if t in eos), None)
        head = row if end is None else row[: end + 1]
        stop = _first_stop(head, stop_strings, tokenizer) if stop_strings else None
        if stop is not None and (end is None or stop < end):
            out.append(head[: stop + 1])
            how.append("stop")
        else:
            out.append(head)
            how.append("length" if end is None else "eos")
    return out, how


class EndCounter:
    """How rollouts ended, counted between reads: the fraction that ended at a stop string, at an end token, or at the
    length limit. ``record`` takes completions as they are trained on (already cut by whichever backend made them);
    cutting again changes nothing, so :func:`end_completions` classifies them."""

    def __init__(self, eos_ids: Sequence[int], stop_strings: Sequence[str] = (), tokenizer: Any = None):
        self.eos_ids = [int(t) for t in eos_ids]
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer
        self.counts = dict.fromkeys(END_REASONS, 0)

    def record(self, completion_ids: Sequence[Sequence[int]]) -> None:
        _, how = end_completions(completion_ids, self.eos_ids, self.stop_strings, self.tokenizer)
        for h in how:
            self.counts[h] += 1

    def pop_stats(self) -> dict[str, float]:
        """``completions/ended_by_{stop,eos,length}``: fractions since the last call (empty if nothing was recorded)."""
        total = sum(self.counts.values())
        out = {f"completions/ended_by_{k}": v / total for k, v in self.counts.items()} if total else {}
        self.counts = dict.fromkeys(END_REASONS, 0)
        return out


def _first_stop(ids: list[int], stop_strings: Sequence[str], tokenizer: Any) -> int | None:
    """The index of the first token at which ``decode(ids[:k+1])`` contains a stop string (None: never).

    Containment only grows with ``k``, so a binary search needs O(log n) decodes."""
    def contains(k: int) -> bool:
        text = tokenizer.decode(ids[: k + 1], skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not ids or not contains(len(ids) - 1):
        return None
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if contains(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _tokenize(tokenizer: Any, prompts: Sequence[Any], add_special_tokens: bool) -> list[list[int]]:
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise TypeError("string prompts need a tokenizer")  # a caller's bug, not bad input
        return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
    out = []
    for p in prompts:
        if isinstance(p, str):
            raise TypeError("prompts must be all strings or all token-id lists, not a mix")  # a caller's bug
        ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not ids:
            raise GenerationError("an empty prompt cannot be continued; give at least one token")
        out.append([int(t) for t in ids])
    return out


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _seed_all(seed: int) -> None:
    torch.manual_seed(int(seed))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed))
