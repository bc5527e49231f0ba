"""Difference-of-Means (DiffMean) behaviour vectors, computed in one streaming pass over labelled traces.

**Traces** are JSONL records (one per line)::

    {"text": "Okay, so ... Wait, that is wrong. ...",
     "spans": [{"start": 33, "end": 52, "label": "backtracking"}, ...],
     "prompt": "<|im_start|>system\\n...<|im_start|>assistant\\n"}          # optional

``text`` is the reasoning trace; each span labels the characters ``text[start:end]`` (``end`` exclusive) with one of
:data:`steering.annotate.LABELS` (other labels are allowed and simply become more vectors). ``prompt`` is optional
context tokenised in front of the trace (e.g. the rendered chat prompt that produced it); it is run through the
model but never counted. Any other keys are kept and ignored.

**Tokens.** The prompt is tokenised with the tokenizer's special tokens (BOS for Llama; none for Qwen), the trace
without, and the two id lists are concatenated (exactly what generation produces). Character spans map to the trace
tokens whose offset range overlaps ``[start, end)`` (``return_offsets_mapping``; needs a fast tokenizer), giving the
token range ``[t0, t1)``.

**Positive positions** of a span (``PositionSpec``):

- ``shift`` (Venhoff et al.): the span's tokens shifted one back, ``[t0 - 1, t1 - 1)``: the positions whose
  next-token prediction is a token of the span.
- ``window`` (Ward et al.): ``W`` tokens starting ``K`` before the span, ``[t0 - K, t0 - K + W)``; ``K = 12, W = 5``
  is offsets -12..-8.

**Clipping.** Positions are kept only inside the trace's own tokens, ``[first trace token, last token]``: a span at
the very start of a trace loses the position ``t0 - 1`` (it would be the prompt's last token, or BOS, or nothing),
and a window that falls (partly) before the trace keeps only its part inside the trace. A span left with no positions
is skipped (counted in ``skipped_spans``). The prompt therefore only provides context.

**Means** at every requested hook point (default ``blocks.{l}.hook_resid_post`` for every layer ``l``: the output of
decoder layer ``l``, which is exactly where the steering vector ``s_l`` -- the ``down_proj`` bias -- is added):

- positive mean for label ``c``: with ``weighting="span"`` (default, as Venhoff et al.: every span counts once,
  however long) the mean over each span's positions, averaged over spans; with ``weighting="token"`` the mean over
  all positive positions pooled;
- negative mean: the mean over *all* trace tokens of all traces (also "the overall mean activation");
- ``u = pos - neg``, rescaled per layer to the norm of the negative (overall mean) activation.

Everything is kept as running float64 sums, so memory does not grow with the number of traces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steering import hooks
from steering import vectors as sv
from steering.files import read_jsonl, write_text_atomic
from steering.generation import pad_id_of, pad_rows

DEFAULT_HOOK = "blocks.{layer}.hook_resid_post"
WARD_OFFSET = 12
WARD_WIDTH = 5


class TraceError(ValueError):
    """A traces file or record that does not follow the documented format."""


# --------------------------------------------------------------------------------------------------------------------
# Traces


def validate_trace(obj: Any, where: str = "trace") -> dict[str, Any]:
    """Check one trace record; return it with integer span bounds. Errors name the record and what is wrong."""
    if not isinstance(obj, Mapping):
        raise TraceError(f"{where}: expected a JSON object with 'text' and 'spans', got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise TraceError(f"{where}: 'text' must be a string")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise TraceError(f"{where}: 'prompt' must be a string when given")
    spans = obj.get("spans", [])
    if not isinstance(spans, list):
        raise TraceError(f"{where}: 'spans' must be a list of {{start, end, label}} objects")
    clean = []
    for i, sp in enumerate(spans):
        if not isinstance(sp, Mapping) or not {"start", "end", "label"} <= set(sp):
            raise TraceError(f"{where}: span {i} must be an object with 'start', 'end' and 'label'")
        start, end, label = sp["start"], sp["end"], sp["label"]
        if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
            raise TraceError(f"{where}: span {i} needs integer character offsets, got start={start!r} end={end!r}")
        if not 0 <= start < end <= len(text):
            raise TraceError(f"{where}: span {i} [{start}, {end}) is not a non-empty range inside the text "
                             f"(length {len(text)})")
        if not isinstance(label, str) or not label:
            raise TraceError(f"{where}: span {i} needs a non-empty string label")
        clean.append({"start": start, "end": end, "label": label})
    out = dict(obj)
    out["spans"] = clean
    return out


def iter_traces(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Stream validated traces from a JSONL file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"traces file {str(path)!r} does not exist")
    for lineno, obj in read_jsonl(path, TraceError):
        yield validate_trace(obj, f"{path}:{lineno}")


def load_traces(path: str | os.PathLike) -> list[dict[str, Any]]:
    return list(iter_traces(path))


def write_traces(path: str | os.PathLike, traces: Iterable[Mapping[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(dict(t), ensure_ascii=False) + "\n" for t in traces))


def trace_labels(traces: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Span count per label."""
    counts: dict[str, int] = {}
    for t in traces:
        for sp in t.get("spans", []):
            counts[sp["label"]] = counts.get(sp["label"], 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------------------------------
# Positions


@dataclass(frozen=True)
class PositionSpec:
    """Which token positions represent a span: ``shift`` = ``[t0-1, t1-1)``; ``window`` = ``[t0-K, t0-K+W)``."""

    mode: str = "shift"
    offset: int = WARD_OFFSET
    width: int = WARD_WIDTH

    def __post_init__(self) -> None:
        if self.mode not in ("shift", "window"):
            raise ValueError(f"positions mode must be 'shift' or 'window', got {self.mode!r}")
        if self.mode == "window" and (self.width < 1 or self.offset < 0):
            raise ValueError(f"window needs width >= 1 and offset >= 0, got offset={self.offset} width={self.width}")

    def raw(self, t0: int, t1: int) -> range:
        """Unclipped positions for a span covering tokens ``[t0, t1)``."""
        if self.mode == "shift":
            return range(t0 - 1, t1 - 1)
        return range(t0 - self.offset, t0 - self.offset + self.width)

    def positions(self, t0: int, t1: int, lo: int, hi: int) -> list[int]:
        """Positions clipped to ``[lo, hi)`` (the trace's own tokens)."""
        return [p for p in self.raw(t0, t1) if lo <= p < hi]

    def describe(self) -> dict[str, Any]:
        if self.mode == "shift":
            return {"mode": "shift", "positions": "[t0-1, t1-1)"}
        return {"mode": "window", "offset": self.offset, "width": self.width,
                "positions": f"[t0-{self.offset}, t0-{self.offset}+{self.width})"}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None) -> "PositionSpec":
        if not meta:
            return cls()
        return cls(meta.get("mode", "shift"), int(meta.get("offset", WARD_OFFSET)), int(meta.get("width", WARD_WIDTH)))


def span_token_range(offsets: Sequence[Sequence[int]], start: int, end: int) -> tuple[int, int] | None:
    """``[t0, t1)``: the tokens whose character range overlaps ``[start, end)`` (zero-width tokens ignored)."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hit:
        return None
    return hit[0], hit[-1] + 1


@dataclass
class SpanPositions:
    label: str
    start: int  # character range in the trace text
    end: int
    t0: int  # token range in the full sequence (prompt + trace)
    t1: int
    positions: list[int]  # positive positions (clipped)


@dataclass
class EncodedTrace:
    input_ids: list[int]
    trace_start: int  # index of the first trace token in input_ids
    spans: list[SpanPositions] = field(default_factory=list)
    skipped_spans: int = 0  # spans with no token (truncated away) or no position left after clipping

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def trace_positions(self) -> range:
        return range(self.trace_start, self.length)

    def positions_by_label(self) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {}
        for sp in self.spans:
            out.setdefault(sp.label, []).append(sp.positions)
        return out


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TraceError("character spans need a fast tokenizer (offset mapping); load it with use_fast=True")


def encode_trace(tokenizer: Any, trace: Mapping[str, Any], spec: PositionSpec = PositionSpec(),
                 max_length: int | None = None, labels: Iterable[str] | None = None) -> EncodedTrace:
    """Tokenise one trace and work out every span's token range and positive positions (see the module doc)."""
    _check_fast(tokenizer)
    prompt = trace.get("prompt")
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (prompt and bos and prompt.startswith(bos))
    prefix = list(tokenizer(prompt or "", add_special_tokens=add_special)["input_ids"])
    enc = tokenizer(trace["text"], add_special_tokens=False, return_offsets_mapping=True)
    ids = prefix + list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    start = len(prefix)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
        offsets = offsets[: max(0, max_length - start)]
    out = EncodedTrace(input_ids=ids, trace_start=min(start, len(ids)))
    wanted = set(labels) if labels is not None else None
    for sp in trace.get("spans", []):
        if wanted is not None and sp["label"] not in wanted:
            continue
        rng = span_token_range(offsets, sp["start"], sp["end"])
        if rng is None:
            out.skipped_spans += 1
            continue
        t0, t1 = rng[0] + start, rng[1] + start
        pos = spec.positions(t0, t1, out.trace_start, len(ids))
        if not pos:
            out.skipped_spans += 1
            continue
        out.spans.append(SpanPositions(sp["label"], sp["start"], sp["end"], t0, t1, pos))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Streaming means


class DiffMeanAccumulator:
    """Running float64 sums of the negative (all trace tokens) and per-label positive activations, at ``names``."""

    def __init__(self, names: Sequence[str], hidden_size: int, weighting: str = "span") -> None:
        if weighting not in ("span", "token"):
            raise ValueError(f"weighting must be 'span' or 'token', got {weighting!r}")
        self.names = list(names)
        self.hidden_size = int(hidden_size)
        self.weighting = weighting
        self.neg_sum = torch.zeros(len(self.names), self.hidden_size, dtype=torch.float64)
        self.neg_count = 0
        self.pos_sum: dict[str, torch.Tensor] = {}
        self.pos_count: dict[str, int] = {}  # spans (span weighting) or positions (token weighting)
        self.n_spans: dict[str, int] = {}
        self.n_positions: dict[str, int] = {}
        self.n_traces = 0
        self.skipped_spans = 0

    def add(self, acts: torch.Tensor, trace: EncodedTrace) -> None:
        """``acts``: (len(names), seq, hidden) activations of one sequence (padding may follow ``trace.length``)."""
        if acts.dim() != 3 or acts.shape[0] != len(self.names) or acts.shape[-1] != self.hidden_size:
            raise ValueError(f"acts must be ({len(self.names)}, seq, {self.hidden_size}), got {tuple(acts.shape)}")
        acts = acts.detach()
        self.n_traces += 1
        self.skipped_spans += trace.skipped_spans
        lo, hi = trace.trace_start, trace.length
        if hi > lo:
            self.neg_sum += acts[:, lo:hi].double().sum(1).cpu()
            self.neg_count += hi - lo
        for sp in trace.spans:
            sel = acts[:, sp.positions].double()
            if sp.label not in self.pos_sum:
                self.pos_sum[sp.label] = torch.zeros_like(self.neg_sum)
                self.pos_count[sp.label] = 0
                self.n_spans[sp.label] = 0
                self.n_positions[sp.label] = 0
            if self.weighting == "span":
                self.pos_sum[sp.label] += sel.mean(1).cpu()
                self.pos_count[sp.label] += 1
            else:
                self.pos_sum[sp.label] += sel.sum(1).cpu()
                self.pos_count[sp.label] += len(sp.positions)
            self.n_spans[sp.label] += 1
            self.n_positions[sp.label] += len(sp.positions)

    @property
    def labels(self) -> list[str]:
        return sorted(self.pos_sum)

    def neg_mean(self) -> torch.Tensor:
        if self.neg_count == 0:
            raise ValueError("no trace tokens were seen: the traces are empty")
        return self.neg_sum / self.neg_count

    def pos_mean(self, label: str) -> torch.Tensor:
        if not self.pos_count.get(label):
            raise ValueError(f"no positions for label {label!r} (labels seen: {self.labels})")
        return self.pos_sum[label] / self.pos_count[label]

    def raw_vectors(self, label: str) -> torch.Tensor:
        """``pos - neg`` (len(names), hidden), float64, not rescaled."""
        return self.pos_mean(label) - self.neg_mean()

    def vectors(self, label: str, rescale: bool = True) -> torch.Tensor:
        u = self.raw_vectors(label)
        return rescale_to(u, self.neg_mean()) if rescale else u

    def summary(self) -> dict[str, Any]:
        return {"n_traces": self.n_traces, "n_trace_tokens": self.neg_count, "skipped_spans": self.skipped_spans,
                "weighting": self.weighting,
                "labels": {label: {"spans": self.n_spans[label], "positions": self.n_positions[label]}
                           for label in self.labels}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Means as tensors (for ``safetensors``): ``neg_mean`` and ``pos_mean.{label}``, (len(names), hidden)."""
        out = {"neg_mean": self.neg_mean().float().contiguous()}
        for label in self.labels:
            out[f"pos_mean.{label}"] = self.pos_mean(label).float().contiguous()
        return out


def rescale_to(u: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Rescale each row of ``u`` to the norm of the same row of ``ref`` (zero rows stay zero)."""
    un = u.norm(dim=-1, keepdim=True)
    scale = torch.where(un > 0, ref.norm(dim=-1, keepdim=True) / un.clamp_min(1e-300), torch.zeros_like(un))
    return u * scale


def hook_names(layers: Sequence[int], template: str = DEFAULT_HOOK) -> list[str]:
    return [template.format(layer=layer) for layer in layers]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer: Any,
    traces: Iterable[Mapping[str, Any]],
    *,
    layers: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    spec: PositionSpec = PositionSpec(),
    labels: Iterable[str] | None = None,
    weighting: str = "span",
    batch_size: int = 4,
    max_length: int | None = None,
    progress: Any = None,
) -> DiffMeanAccumulator:
    """One streaming pass over ``traces``: read activations at ``names`` (default ``blocks.{l}.hook_resid_post`` for
    ``layers``, default all) through :mod:`steering.hooks` and accumulate the DiffMean sums.

    Traces are batched ``batch_size`` at a time, right-padded; results do not depend on the batch size (up to float
    rounding)."""
    if names is None:
        layers = list(range(hooks.num_layers(model))) if layers is None else list(layers)
        names = hook_names(layers)
    hidden = int(hooks.causal_lm(model).config.hidden_size)
    acc = DiffMeanAccumulator(names, hidden, weighting)
    labels = None if labels is None else list(labels)
    device = sv.model_device(model)
    pad = pad_id_of(tokenizer)

    def encoded() -> Iterator[EncodedTrace]:
        for t in traces:
            e = encode_trace(tokenizer, t, spec, max_length, labels)
            if e.length:
                yield e

    buf: list[EncodedTrace] = []

    def flush() -> None:
        ids, mask = pad_rows([e.input_ids for e in buf], pad, side="right", device=device)
        _, cache = hooks.run_with_cache(model, input_ids=ids, attention_mask=mask, names=list(names), use_cache=False)
        stacked = torch.stack([cache[n] for n in names])  # (names, batch, seq, hidden)
        for i, e in enumerate(buf):
            acc.add(stacked[:, i], e)
        if progress is not None:
            progress(len(buf))
        buf.clear()

    for e in encoded():
        buf.append(e)
        if len(buf) >= batch_size:
            flush()
    if buf:
        flush()
    return acc


# --------------------------------------------------------------------------------------------------------------------
# Writing a steering checkpoint without loading the steered model's weights


def check_same_shape(steered_config: Any, activations_config: Any, steered: str = "--model",
                     activations: str = "--activations-model") -> None:
    """The activations model must have the steered model's layer count and hidden size."""
    a = (int(steered_config.num_hidden_layers), int(steered_config.hidden_size))
    b = (int(activations_config.num_hidden_layers), int(activations_config.hidden_size))
    if a != b:
        raise sv.SteeringError(
            f"{activations} has {b[0]} layers x hidden size {b[1]} but the steered {steered} has {a[0]} layers x "
            f"hidden size {a[1]}; DiffMean vectors read from one model can only steer a model of the same shape"
        )


def save_vectors_checkpoint(
    vectors: Mapping[int, torch.Tensor],
    out_dir: str | os.PathLike,
    config: Any,
    *,
    base_model: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{layer: vector}`` as a normal steering checkpoint (via :func:`steering.vectors.save_checkpoint`) for a
    model with ``config``, without loading its weights: the base is built on the ``meta`` device, only the steering
    vectors are real tensors. The result loads with :func:`steering.vectors.load_steered_model` and
    ``peft.PeftModel.from_pretrained``, and training can start from it."""
    from transformers import AutoModelForCausalLM

    sv.check_supported(config)
    sv.check_fits(vectors, config, source="the vectors", target=f"the model {base_model!r}")
    _, hidden = sv.model_shape(config)
    layers = sorted(vectors)
    for layer, v in vectors.items():
        if not torch.isfinite(v).all():
            raise sv.SteeringError(f"vector for layer {layer} holds NaN or Inf")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    base.config.name_or_path = base_model
    model = sv.attach_steering(base, layers=layers, base_model_id=base_model)
    for name, module in model.named_modules():
        bias = getattr(module, "beft_bias", None)
        if isinstance(bias, nn.ParameterDict) and sv.ADAPTER_NAME in bias:
            layer = int(name.split("layers.")[1].split(".")[0])
            bias[sv.ADAPTER_NAME] = nn.Parameter(vectors[layer].detach().float().reshape(1, hidden).cpu().clone())
    return sv.save_checkpoint(model, out_dir, base_model=base_model, extra=dict(extra or {}))


def vectors_by_layer(u: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    return {int(layer): u[i].float().clone() for i, layer in enumerate(layers)}


def diffmean_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``diffmean`` block of a checkpoint's ``steering.json`` (None for other checkpoints)."""
    return sv.read_meta(ckpt_dir).get("diffmean")
