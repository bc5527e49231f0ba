"""Generation with steering active: one entry point for rollouts (training) and evaluation.

Two backends, selected by name:

``"hf"``
    ``model.generate`` with a ``GenerationConfig`` built from :class:`SamplingParams`. The reference.

``"static"``
    The same ``model.generate`` call, with its decoding loop replaced through transformers' documented
    ``custom_generate=<callable>`` hook by :func:`static_decode`. transformers still does every preparation step
    (merging the model's generation defaults, EOS/pad handling, ``num_return_sequences`` expansion, the
    logits-processor list and the stopping criteria), so both backends sample from the same distribution by
    construction. Only the forward pass differs: a preallocated (static) KV cache and a decode step that reads the
    model's own modules (embedding, norms, q/k/v/o projections, rotary embedding, MLP, LM head). The steering vectors
    are PEFT BEFT biases *inside* ``mlp.down_proj``, so calling the MLP module applies them exactly as in
    ``model.forward``. On CUDA the decode step is compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA
    graphs); on CPU the same code runs eagerly, which is what the tests exercise.

Sampling is the same token selection as ``GenerationMixin._sample`` (processors, ``softmax``, ``torch.multinomial``,
pad after EOS), with the same random-number consumption, so on CPU in fp32 the two backends give token-identical
samples for the same seed (the logits agree to ~1e-6; a flip needs a uniform draw within that of a CDF boundary).

Supported: decoder-only Qwen2 and Llama families (``model.layers.{l}.self_attn/mlp``), full attention (no sliding
window), text only, batch sampling or greedy. Not supported by ``"static"`` (clear error): beam search, assisted
decoding, ``return_dict_in_generate``/scores, streamers.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steering import compat
from steering.hooks import causal_lm
from steering.vectors import SUPPORTED_MODEL_TYPES

BACKENDS = ("hf", "static")


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
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
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
        kwargs: dict[str, Any] = dict(
            max_new_tokens=int(self.max_new_tokens),
            eos_token_id=eos or None,
            pad_token_id=pad,
            repetition_penalty=float(self.repetition_penalty),
        )
        if self.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                          top_k=int(self.top_k), min_p=self.min_p)
        return GenerationConfig(**kwargs)


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
    kv_block: int | None = None,
    stops: Any = None,
) -> GenerationResult:
    """Sample completions for ``prompts`` (strings, or lists of token ids) with the steering vectors active.

    ``stops`` (``steering.templates.Stops``, from ``template.stops(tokenizer)``) says where completions end, besides
    the tokenizer's and the model's EOS: both backends stop there and cut there (:func:`end_completions`).

    ``batch_size`` bounds the number of *rows* (prompts x ``num_return_sequences``) per ``generate`` call. With a
    ``seed``, chunk ``c`` is seeded with ``seed + c``, so results do not depend on what earlier chunks consumed, and the
    two backends see the same random stream. Static backend only: ``compile`` (torch.compile + CUDA graphs) defaults
    to "on CUDA"; ``kv_block`` is the attention-length granularity (default 256, one CUDA graph per length).
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
            static = {"compile": compile, "kv_block": kv_block} if backend == "static" else {}
            sequences = generate_ids(model, input_ids, attention_mask, gen_cfg, backend=backend,
                                     stop_strings=stop_strings, tokenizer=tokenizer, **static)
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
    **static_options: Any,
) -> torch.Tensor:
    """``(batch*n, prompt_len + new)`` token ids from a left-padded batch: ``model.generate`` with either decoding loop.

    Used by :func:`generate` and by the GRPO rollouts (``train/rollout.py``, which pass TRL's own
    ``GenerationConfig``). ``stop_strings`` (they need the ``tokenizer``: transformers reads the token texts) end a
    row at the token that completes one; finished rows are padded to the batch's end, and :func:`end_completions`
    cuts them."""
    check_backend(backend)
    extra: dict[str, Any] = {}
    if stop_strings:
        if tokenizer is None:
            raise GenerationError("stop strings need the tokenizer (to read the text of the tokens); pass tokenizer=...")
        from transformers import StoppingCriteriaList, StopStringCriteria

        # A criterion, not the config's stop_strings: generate(custom_generate=<callable>) does not hand the tokenizer
        # on to the criteria it builds (transformers 5.x), so config stop strings fail on the static path.
        extra["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop_strings))])
    if backend == "hf":
        if compile or static_options:
            raise GenerationError(f"options {sorted(static_options) + (['compile'] if compile else [])} are for the "
                                  "static backend")
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                              **extra)
    import copy

    cfg = copy.deepcopy(generation_config)
    # The static loop owns its KV cache: keep transformers from allocating one of its own.
    cfg.cache_implementation = None
    loop = functools.partial(static_decode, compile=compile, **static_options)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg,
                          custom_generate=loop, **extra)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-padded ``(input_ids, attention_mask)`` for a list of token-id lists."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


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


# --------------------------------------------------------------------------------------------------------------------
# The static decoding loop (a transformers ``custom_generate`` callable)


def static_decode(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool = False,
    streamer: Any = None,
    *,
    compile: bool | None = None,
    kv_block: int | None = None,
    sync_every: int | None = None,
    prefill_tokens: int = 16384,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """Decoding loop with the signature of ``GenerationMixin._sample`` (what ``generate(custom_generate=...)`` calls;
    ``steering.compat.DECODING_LOOP_ARGS``); token selection identical to it.

    ``kv_block``: attention reads the cache up to the current length rounded up to this block (default 256), so the
    cost of a step grows with the sequence, not with ``max_new_tokens``; each distinct length is one CUDA graph.
    ``sync_every``: how often the host checks whether every row has finished (1 on CPU, 16 on CUDA; rows that finish
    are padded, and the output is trimmed to the step where the last one finished, so this never changes results).
    """
    if streamer is not None:
        raise GenerationError("the static generation backend does not support streamers; use backend='hf'")
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise GenerationError("the static generation backend does not support beam search; use backend='hf'")
    if getattr(generation_config, "return_dict_in_generate", False):
        raise GenerationError("the static generation backend returns token ids only (no return_dict_in_generate)")
    if model_kwargs.get("inputs_embeds") is not None:
        raise GenerationError("the static generation backend takes input_ids, not inputs_embeds")

    device = input_ids.device
    batch, prompt_len = input_ids.shape
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    max_length = int(generation_config.max_length)
    max_new = max_length - prompt_len
    if max_new <= 0:
        return input_ids

    do_sample = bool(generation_config.do_sample)
    # The pad token of transformers' own loop: pad_token_id, else the first EOS token (generate's special-token rule).
    pad_id = generation_config.pad_token_id
    if pad_id is None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        pad_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad_token = None if pad_id is None else torch.tensor(int(pad_id), device=device)
    has_eos_stopping = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if has_eos_stopping and pad_token is None:
        raise GenerationError("pad_token_id is needed to pad finished rows; set it in the generation config")
    if sync_every is None:
        sync_every = 1 if device.type != "cuda" else 16

    decoder = get_static_decoder(model, compile=compile, kv_block=kv_block)
    decoder.reserve(batch, prompt_len + max_new, device)
    logits = decoder.prefill(input_ids, attention_mask, prefill_tokens=prefill_tokens)

    out = torch.empty((batch, max_length), dtype=input_ids.dtype, device=device)
    out[:, :prompt_len] = input_ids
    positions = attention_mask.sum(dim=1)  # rotary position of the first generated token = real prompt length
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    done_at = torch.full((batch,), max_new, dtype=torch.long, device=device)
    if pad_token is not None:
        pad_token = pad_token.to(device)
    cur = prompt_len
    steps = 0
    for step in range(max_new):
        if step > 0:
            logits = decoder.decode(out[:, cur - 1], positions, cur - 1)
            positions = positions + 1
        scores = logits_processor(out[:, :cur], logits)
        if do_sample:
            probs = F.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if has_eos_stopping:
            next_tokens = next_tokens * unfinished + pad_token * (1 - unfinished)
        out[:, cur] = next_tokens
        cur += 1
        steps += 1
        still = unfinished & ~stopping_criteria(out[:, :cur], None)
        done_at = torch.where((unfinished == 1) & (still == 0), torch.full_like(done_at, step + 1), done_at)
        unfinished = still
        if steps % sync_every == 0 or cur >= max_length:
            if not _any_unfinished(unfinished, synced_gpus):
                break
    # Trim to the step where the last row finished: exactly the length transformers' own loop returns.
    final = int(done_at.max().item()) if batch else 0
    return out[:, : prompt_len + max(final, 0)]


def _any_unfinished(unfinished: torch.Tensor, synced_gpus: bool) -> bool:
    flag = unfinished.max() if unfinished.numel() else torch.zeros((), dtype=torch.long, device=unfinished.device)
    if synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = flag.clone()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


# --------------------------------------------------------------------------------------------------------------------
# The static-cache forward


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, StaticDecoder]" = weakref.WeakKeyDictionary()


def get_static_decoder(model: nn.Module, *, compile: bool | None = None, kv_block: int | None = None) -> "StaticDecoder":
    """The :class:`StaticDecoder` of ``model`` (a Qwen2/Llama ``*ForCausalLM``, or a PeftModel around one).

    Kept per model, so the KV cache and the compiled CUDA graphs survive across calls (same addresses, no re-capture).
    """
    lm = causal_lm(model)
    decoder = _DECODERS.get(lm)
    if decoder is None or (compile is not None and decoder.compile_requested != compile) or (
        kv_block is not None and decoder.kv_block != kv_block
    ):
        decoder = StaticDecoder(lm, compile=compile, kv_block=kv_block)
        _DECODERS[lm] = decoder
    return decoder


def release_static_cache(model: nn.Module) -> None:
    """Free the KV cache of ``model``'s static decoder (the next call reallocates it; CUDA graphs get re-recorded)."""
    decoder = _DECODERS.get(causal_lm(model))
    if decoder is not None:
        decoder.release()


class StaticDecoder:
    """A Qwen2/Llama forward over a preallocated KV cache, built from the model's own submodules.

    The cache is ``(batch, n_kv_heads, capacity, head_dim)`` per layer, in the model's dtype. Row ``b``'s prompt sits
    at slots ``[0, P)`` (left padding included, masked), generated token ``t`` at slot ``P + t``; so one scalar slot index
    serves the whole batch and the decode step has static shapes.
    """

    def __init__(self, lm: nn.Module, *, compile: bool | None = None, kv_block: int | None = None):
        config = lm.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise GenerationError(
                f"the static generation backend supports model types {list(SUPPORTED_MODEL_TYPES)}, got {model_type!r}; "
                "use backend='hf'"
            )
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or (
            getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)
        ):
            raise GenerationError("the static generation backend supports full attention only (no sliding window)")
        # A weak reference: the registry maps the model to this object, which must not keep the model alive.
        self._lm = weakref.ref(lm)
        self._head: nn.Module | None = None  # the LM head, looked up before each call (TRL may replace it)
        self.inner = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        self.layers = list(self.inner.layers[: config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = int(getattr(attn, "head_dim", config.hidden_size // config.num_attention_heads))
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self._rope = compat.rotary_embedding_function(attn)
        self.compile_requested = compile
        self.kv_block = int(kv_block) if kv_block else 256
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # (batch, capacity) bool: which slots may be attended
        self._slots: torch.Tensor | None = None
        self.batch = 0
        self.capacity = 0
        self.prompt_len = 0
        self._compiled: Any = None

    # ---------------------------------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return self.layers[0].self_attn.k_proj.weight.dtype

    def reserve(self, batch: int, length: int, device: torch.device) -> None:
        """Make room for ``batch`` rows of ``length`` tokens. Capacity grows in steps of 256 and is kept, so the
        buffers (and the CUDA graphs that read them) are reused from call to call."""
        dtype = self._dtype()
        need = int(math.ceil(length / 256) * 256)
        same = (self.keys and self.batch == batch and self.capacity >= need and self.keys[0].device == device
                and self.keys[0].dtype == dtype)
        if same:
            return
        self.release()
        shape = (batch, self.num_kv_heads, need, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.valid = torch.ones((batch, need), dtype=torch.bool, device=device)
        self._slots = torch.arange(need, dtype=torch.long, device=device)  # slot indices, no host->device copies
        for t in (*self.keys, *self.values, self.valid):
            compat.mark_static_address(t)
        self.batch, self.capacity = batch, need

    def release(self) -> None:
        self.keys, self.values, self.valid, self._slots = [], [], None, None
        self.batch = self.capacity = 0

    @property
    def use_compile(self) -> bool:
        if self.compile_requested is not None:
            return bool(self.compile_requested)
        return bool(self.keys) and self.keys[0].device.type == "cuda"

    # ---------------------------------------------------------------------------------------------------------------
    def _layer(self, i: int, layer: nn.Module, x: torch.Tensor, cos, sin, mask, slots, kv_len: int, rows: slice):
        attn = layer.self_attn
        b, t, _ = x.shape
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, k, cos, sin)
        kc, vc = self.keys[i][rows], self.values[i][rows]
        kc.index_copy_(2, slots, k.to(kc.dtype))
        vc.index_copy_(2, slots, v.to(vc.dtype))
        keys, values = kc[:, :, :kv_len], vc[:, :, :kv_len]
        rep = self.num_heads // self.num_kv_heads
        if rep > 1 and t == 1:
            # Decode with grouped-query attention: the `rep` query heads that share a KV head become `rep` queries of
            # that head (head h reads KV head h // rep, as transformers' repeat_kv does), so the cache is never copied.
            o = F.scaled_dot_product_attention(q.reshape(b, self.num_kv_heads, rep, self.head_dim), keys, values,
                                               attn_mask=mask, scale=self.scaling)
            o = o.reshape(b, self.num_heads, 1, self.head_dim)
        else:
            if rep > 1:
                keys = keys.repeat_interleave(rep, dim=1)
                values = values.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        o = o.transpose(1, 2).reshape(b, t, -1)
        x = x + attn.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner.norm(x[:, -1:])
        return self._head(x)[:, -1].float()

    def _refresh_head(self) -> None:
        lm = self._lm()
        if lm is None:
            raise GenerationError("the model of this static decoder no longer exists")
        self._head = lm.get_output_embeddings()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, prefill_tokens: int = 16384):
        """Run the (left-padded) prompts, fill cache slots ``[0, P)``, return the last position's fp32 logits."""
        batch, plen = input_ids.shape
        device = input_ids.device
        self._refresh_head()
        valid_prompt = attention_mask.bool()
        self.valid[:, :plen].copy_(valid_prompt)
        self.valid[:, plen:].fill_(True)
        self.prompt_len = plen
        # transformers' convention: positions count real tokens; padding gets a dummy position.
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        slots = self._slots[:plen]
        causal = torch.ones((plen, plen), dtype=torch.bool, device=device).tril()
        eye = torch.eye(plen, dtype=torch.bool, device=device)
        rows_per_chunk = max(1, int(prefill_tokens) // max(plen, 1))
        out = []
        for r0 in range(0, batch, rows_per_chunk):
            rows = slice(r0, min(batch, r0 + rows_per_chunk))
            # Padding queries attend to themselves only, so their (never read) keys/values stay finite.
            mask = (causal & (valid_prompt[rows, None, :] | eye))[:, None]
            x = self.inner.embed_tokens(input_ids[rows])
            cos, sin = self.inner.rotary_emb(x, position_ids[rows])
            for i, layer in enumerate(self.layers):
                x = self._layer(i, layer, x, cos, sin, mask, slots, plen, rows)
            out.append(self._logits(x))
        return torch.cat(out, dim=0)

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, kv_len: int):
        x = self.inner.embed_tokens(tokens[:, None])
        cos, sin = self.inner.rotary_emb(x, positions[:, None])
        idx = torch.arange(kv_len, device=tokens.device)
        mask = (self.valid[:, :kv_len] & (idx <= slot)[None, :])[:, None, None, :]
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, cos, sin, mask, slot, kv_len, slice(None))
        return self._logits(x)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """One token per row: ``tokens`` go to cache slot ``slot`` at rotary ``positions``; returns fp32 logits."""
        if self._head is None:
            self._refresh_head()
        kv_len = min(self.capacity, int(math.ceil((slot + 1) / self.kv_block) * self.kv_block))
        slot_t = self._slots[slot : slot + 1]
        if not self.use_compile:
            return self._decode_step(tokens, positions, slot_t, kv_len)
        if self._compiled is None:
            self._compiled = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=False)
        if tokens.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # Clone: a CUDA-graph output is overwritten by the next replay.
        return self._compiled(tokens, positions, slot_t, kv_len).clone()


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _tokenize(tokenizer: Any, prompts: Sequence[Any], add_special_tokens: bool) -> list[list[int]]:
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise GenerationError("string prompts need a tokenizer")
        return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
    out = []
    for p in prompts:
        if isinstance(p, str):
            raise GenerationError("prompts must be all strings or all token-id lists, not a mix")
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
