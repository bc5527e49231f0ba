"""Annotators: label the sentences of a reasoning trace with the behaviour labels of Venhoff et al.

An annotator turns a trace's text into labelled **character spans** ``{"start": c0, "end": c1, "label": str}``
(``text[c0:c1]`` is the labelled piece; ``end`` is exclusive). Two are built in:

- :class:`HeuristicAnnotator` (``"heuristic"``): an offline, keyword/regex **heuristic**. It labels whole sentences
  by how they open and which phrases they contain. It is a stand-in for tests, demos and offline runs, *not* the
  papers' method, and its labels are much noisier than an LLM judge's.
- :class:`ChatAnnotator` (``"chat"``): an LLM judge behind any OpenAI-compatible ``/chat/completions`` endpoint
  (OpenAI, vLLM, SGLang, llama.cpp server, ...), as in the papers (they used GPT-4o). Plain stdlib HTTP
  (``urllib``); the transport is pluggable, so prompt building and response parsing are tested offline.

The labels of Venhoff et al. (arXiv 2506.18167) and what they mean:

==========================  ===========================================================================
``initializing``            rephrasing the task, stating initial thoughts
``deduction``               a deduction step based on the current approach and assumptions
``adding-knowledge``        enriching the approach with recalled facts
``example-testing``         generating examples / checks to test the current approach
``uncertainty-estimation``  stating its own uncertainty
``backtracking``            deciding to change the approach
==========================  ===========================================================================

Sentence-level statistics (the behaviour evaluation) use :func:`sentence_labels`: every sentence of a text gets the
label whose spans cover most of its characters, or ``None`` ("none") when no span overlaps it.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

LABELS: tuple[str, ...] = (
    "initializing",
    "deduction",
    "adding-knowledge",
    "example-testing",
    "uncertainty-estimation",
    "backtracking",
)
LABEL_DESCRIPTIONS: dict[str, str] = {
    "initializing": "The model is rephrasing the given task and states initial thoughts.",
    "deduction": "The model is performing a deduction step based on its current approach and assumptions.",
    "adding-knowledge": "The model is enriching the current approach with recalled facts.",
    "example-testing": "The model generates examples to test its current approach.",
    "uncertainty-estimation": "The model is stating its own uncertainty.",
    "backtracking": "The model decides to change its approach.",
}
NONE_LABEL = "none"  # the key for sentences no span covers, in sentence statistics

Span = dict  # {"start": int, "end": int, "label": str}


class AnnotationError(ValueError):
    """An annotator could not produce spans (bad endpoint response, unreachable server, bad configuration)."""


class Annotator(Protocol):
    name: str

    def annotate(self, text: str) -> list[Span]:
        """Labelled character spans of ``text``, sorted by start, non-overlapping."""
        ...


def normalize_label(label: str) -> str | None:
    """``"Uncertainty_Estimation"``, ``"5. backtracking"`` -> the canonical label, or None if it is not one."""
    s = re.sub(r"^\s*\d+\s*[.)]\s*", "", str(label)).strip().strip("\"'").lower().replace("_", "-").replace(" ", "-")
    return s if s in LABELS else None


# --------------------------------------------------------------------------------------------------------------------
# Sentences

# A sentence ends at . ! ? (possibly followed by closing quotes/brackets) followed by whitespace, or at a blank line /
# newline. Decimal points ("3.5") and abbreviations glued to the next character never end a sentence.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*(?=\s)|\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of the sentences of ``text``, whitespace stripped, empty ones dropped.

    A sentence ends after ``.``, ``!`` or ``?`` followed by whitespace, or at a newline."""
    out: list[tuple[int, int]] = []
    start = 0
    cuts = [m.end() for m in _SENT_END.finditer(text)] + [len(text)]
    for cut in cuts:
        a, b = start, cut
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
        start = cut
    return out


def sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def sentence_labels(text: str, spans: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """For each sentence of ``text``, the label whose spans cover most of its characters (None if none overlaps).

    Ties go to the label listed first in :data:`LABELS` (then alphabetically for unknown labels)."""
    order = {label: i for i, label in enumerate(LABELS)}
    out: list[str | None] = []
    for a, b in sentence_spans(text):
        cover: dict[str, int] = {}
        for sp in spans:
            overlap = min(b, int(sp["end"])) - max(a, int(sp["start"]))
            if overlap > 0:
                cover[sp["label"]] = cover.get(sp["label"], 0) + overlap
        if not cover:
            out.append(None)
        else:
            out.append(max(cover, key=lambda lab: (cover[lab], -order.get(lab, len(LABELS)), lab)))
    return out


def label_counts(texts: Iterable[str], spans_per_text: Iterable[Sequence[Mapping[str, Any]]],
                 labels: Sequence[str] = LABELS) -> dict[str, int]:
    """Number of sentences per label (plus :data:`NONE_LABEL`), pooled over texts."""
    counts = {label: 0 for label in labels}
    counts[NONE_LABEL] = 0
    for text, spans in zip(texts, spans_per_text):
        for label in sentence_labels(text, spans):
            key = NONE_LABEL if label is None else label
            counts[key] = counts.get(key, 0) + 1
    return counts


def fractions(counts: Mapping[str, int]) -> dict[str, float]:
    """Counts -> fractions of the total (all zeros when there are no sentences)."""
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


# --------------------------------------------------------------------------------------------------------------------
# The offline heuristic


def _words(*phrases: str) -> str:
    return "|".join(phrases)


# Each rule: (label, regex matched at the *start* of the sentence or None, regex searched *anywhere* or None).
# Rules are tried in order; the first that matches labels the sentence.
_OPEN = r"^[\s\"'(*_-]*(?:"
_HEURISTIC_RULES: list[tuple[str, str | None, str | None]] = [
    ("backtracking",
     _OPEN + _words(r"wait\b", r"but\b", r"alternatively\b", r"hmm+\b", r"hold on\b", r"actually\b", r"oops\b",
                    r"no\s*[,.!]", r"on second thought", r"scratch that", r"instead\b") + ")",
     r"\b(?:let me|let's|i should|i need to|we should)\s+(?:re-?think|reconsider|start over|try (?:a different|another)"
     r"|go back|redo|re-?evaluate|re-?examine)|\b(?:i|that) (?:made a|was a) mistake"
     r"|\bthat(?:'s| is) (?:wrong|not right"
     r"|incorrect)"),
    ("uncertainty-estimation", None,
     r"\b(?:maybe|perhaps|not sure|unsure|possibly|probably|might|i think|i guess|i believe|unclear|uncertain|"
     r"not certain|i wonder|seems? (?:like|to)|could be|am i|is that right|does that make sense)\b"),
    ("example-testing", None,
     r"\b(?:let(?:'s| me| us) (?:check|verify|test|try|plug|double[- ]check|confirm|see if|see whether)|double[- ]check"
     r"|sanity check|for example|for instance|e\.g\.|plug(?:ging)? in|substitut\w*|check(?:ing)? (?:with|that|if|this|"
     r"the answer|our|my)|test(?:ing)? (?:with|it|this)|verif(?:y|ying|ied)|suppose (?:n|x|we take))\b"),
    ("adding-knowledge", None,
     r"\b(?:recall|remember that|we know that|i know that|it is known|well[- ]known|by definition|is defined as|"
     r"definition of|the formula|formula for|theorem|identity|the fact that|property of|rule of|the rule)\b"),
    ("initializing",
     _OPEN + _words(r"okay\b", r"ok\b", r"alright\b", r"all right\b", r"so,? (?:the|i|we) (?:problem|question|need|"
                    r"have|are)", r"the (?:problem|question|task) (?:is|asks|says|gives|wants)", r"we (?:need|have|are "
                    r"asked|want) to", r"i (?:need|have|want) to", r"let(?:'s| me) (?:start|begin|understand|read|"
                    r"think about|figure out|see what)", r"first\b", r"to (?:solve|find|answer|compute|figure)",
                    r"we are given", r"given\b") + ")",
     None),
    ("deduction", None,
     r"\b(?:so|therefore|thus|hence|which means|that means|this means|then|since|because|implies|we get|gives|"
     r"equals|so that|it follows|consequently|adding|subtracting|multiplying|dividing)\b|=|\d\s*[-+*/x\u00d7]\s*\d"),
]


@dataclass
class HeuristicAnnotator:
    """Offline **heuristic** annotator: one label per sentence from opening words and key phrases.

    Rules, first match wins (case-insensitive):

    1. ``backtracking``: opens with "Wait", "But", "Alternatively", "Hmm", "Hold on", "Actually", "Oops", "No,",
       "Instead", "On second thought", or says "let me reconsider / start over / try another ...", "that's wrong".
    2. ``uncertainty-estimation``: "maybe", "perhaps", "not sure", "possibly", "probably", "might", "I think",
       "seems", "could be", "unclear", ...
    3. ``example-testing``: "let's check / verify / test / try / plug in", "double-check", "for example",
       "substitute", "verify", ...
    4. ``adding-knowledge``: "recall", "we know that", "by definition", "the formula", "theorem", "identity", ...
    5. ``initializing``: opens with "Okay", "Alright", "The problem asks", "We need to", "I need to", "First",
       "To solve", "Let's start", "We are given", ...
    6. ``deduction``: "so", "therefore", "thus", "hence", "then", "since", "we get", "=", or arithmetic like
       ``3 + 4``.

    Sentences that match no rule stay unlabelled. Not the papers' method (they used an LLM judge): use it for
    tests, demos and offline smoke runs only.
    """

    name: str = "heuristic"
    labels: Sequence[str] = LABELS
    _rules: list[tuple[str, re.Pattern | None, re.Pattern | None]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [label for label in self.labels if label not in LABELS]
        if unknown:
            raise AnnotationError(f"heuristic annotator: unknown labels {unknown}; known: {list(LABELS)}")
        self._rules = [
            (label, re.compile(op, re.I) if op else None, re.compile(anywhere, re.I) if anywhere else None)
            for label, op, anywhere in _HEURISTIC_RULES if label in self.labels
        ]

    def label_sentence(self, sentence: str) -> str | None:
        for label, opening, anywhere in self._rules:
            if opening is not None and opening.search(sentence):
                return label
            if anywhere is not None and anywhere.search(sentence):
                return label
        return None

    def annotate(self, text: str) -> list[Span]:
        out: list[Span] = []
        for a, b in sentence_spans(text):
            label = self.label_sentence(text[a:b])
            if label is not None:
                out.append({"start": a, "end": b, "label": label})
        return out


# --------------------------------------------------------------------------------------------------------------------
# The LLM judge behind an OpenAI-compatible chat endpoint

# The papers' annotation prompt (Venhoff et al.'s format: ["label"]...["end-section"] markers around verbatim text).
ANNOTATION_PROMPT = """\
Please split the following reasoning chain of an LLM into annotated parts using labels and the following format \
["label"]...["end-section"]. A sentence should be split into multiple parts if it incorporates multiple behaviours \
indicated by the labels.

Available labels:
{labels}

The reasoning chain to analyze:
{text}

Answer only with the annotated text. Copy the text of every part verbatim. Only use the labels outlined above. If \
there is a tail that has no annotation leave it out."""

_SEGMENT_RE = re.compile(r"\[\s*\"?\s*([A-Za-z0-9_. -]+?)\s*\"?\s*\](.*?)\[\s*\"?\s*end[-_ ]section\s*\"?\s*\]",
                         re.S | re.I)

Transport = Callable[[str, dict, dict, float], dict]


def build_messages(text: str, labels: Sequence[str] = LABELS, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages asking the judge to annotate ``text``."""
    listing = "\n".join(f"{i}. {label} -> {LABEL_DESCRIPTIONS.get(label, '')}".rstrip(" ->")
                        for i, label in enumerate(labels))
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": ANNOTATION_PROMPT.format(labels=listing, text=text)})
    return messages


def response_content(response: Mapping[str, Any]) -> str:
    """The assistant text of an OpenAI-style chat-completions response (clear error otherwise)."""
    if "error" in response and response["error"]:
        err = response["error"]
        msg = err.get("message") if isinstance(err, Mapping) else err
        raise AnnotationError(f"annotation endpoint returned an error: {msg}")
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise AnnotationError(
            f"annotation endpoint response has no choices[0].message.content: {json.dumps(response)[:300]}"
        ) from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    if not isinstance(content, str):
        raise AnnotationError(f"annotation endpoint returned non-text content: {content!r:.200}")
    return content


def _normalized(text: str) -> tuple[str, list[int]]:
    """``text`` with every whitespace run collapsed to one space and quotes straightened, plus the map from each
    normalized character to its index in ``text``."""
    out: list[str] = []
    index: list[int] = []
    i = 0
    n = len(text)
    trans = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}
    while i < n:
        c = text[i]
        if c.isspace():
            j = i
            while j < n and text[j].isspace():
                j += 1
            out.append(" ")
            index.append(i)
            i = j
            continue
        out.append(trans.get(c, c).lower())
        index.append(i)
        i += 1
    return "".join(out), index


def parse_annotation(text: str, annotated: str, labels: Sequence[str] = LABELS) -> tuple[list[Span], dict[str, int]]:
    """Align the judge's ``["label"]...["end-section"]`` segments with ``text``.

    Each segment's text is searched (whitespace-, case- and quote-insensitively) in ``text`` from the end of the
    previous match, so repeated phrases go to the right place. Returns ``(spans, stats)``; ``stats`` counts the
    segments that were ``aligned``, had an ``unknown_label``, or were ``unaligned`` (not found verbatim)."""
    norm, index = _normalized(text)
    stats = {"segments": 0, "aligned": 0, "unknown_label": 0, "unaligned": 0}
    spans: list[Span] = []
    cursor = 0
    for m in _SEGMENT_RE.finditer(annotated):
        stats["segments"] += 1
        label = normalize_label(m.group(1))
        if label is None or label not in labels:
            stats["unknown_label"] += 1
            continue
        seg, _ = _normalized(m.group(2))
        seg = seg.strip()
        if not seg:
            stats["unaligned"] += 1
            continue
        pos = norm.find(seg, cursor)
        if pos < 0:
            pos = norm.find(seg)  # out of order: take the first occurrence
            if pos < 0:
                stats["unaligned"] += 1
                continue
        end_norm = pos + len(seg)
        start = index[pos]
        end = index[end_norm - 1] + 1
        if norm[end_norm - 1] == " ":  # cannot happen after strip(), kept for safety
            end = index[end_norm - 1]
        spans.append({"start": start, "end": end, "label": label})
        stats["aligned"] += 1
        cursor = max(cursor, end_norm)
    spans.sort(key=lambda s: (s["start"], s["end"]))
    # drop overlaps (keep the earlier span) so spans stay disjoint
    out: list[Span] = []
    for sp in spans:
        if out and sp["start"] < out[-1]["end"]:
            continue
        out.append(sp)
    return out, stats


def urllib_transport(url: str, payload: dict, headers: dict, timeout: float) -> dict:
    """POST ``payload`` as JSON with the standard library; return the decoded JSON response."""
    data = json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (URL given by the user)
        return json.loads(resp.read().decode("utf-8"))


@dataclass
class ChatAnnotator:
    """LLM-judge annotator over an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    ``base_url`` defaults to ``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``; the API key is read from the
    environment variable ``api_key_env`` (default ``OPENAI_API_KEY``) unless given; no key means no
    ``Authorization`` header (fine for a local vLLM / SGLang server). Greedy (temperature 0) by default. Transient
    failures (HTTP 429 / 5xx, timeouts) are retried with exponential backoff. ``transport`` replaces the HTTP call
    (tests pass a fake)."""

    model: str = "gpt-4o"
    base_url: str | None = None
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int | None = None
    timeout: float = 120.0
    retries: int = 4
    labels: Sequence[str] = LABELS
    system: str | None = None
    transport: Transport | None = None
    name: str = "chat"
    stats: dict[str, int] = field(default_factory=lambda: {"segments": 0, "aligned": 0, "unknown_label": 0,
                                                           "unaligned": 0, "requests": 0})

    def __post_init__(self) -> None:
        unknown = [label for label in self.labels if label not in LABELS]
        if unknown:
            raise AnnotationError(f"chat annotator: unknown labels {unknown}; known: {list(LABELS)}")
        if self.base_url is None:
            self.base_url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        if self.api_key is None and self.api_key_env:
            self.api_key = os.environ.get(self.api_key_env) or None

    @property
    def url(self) -> str:
        base = str(self.base_url).rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def payload(self, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": build_messages(text, self.labels, self.system),
                                "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, body: dict) -> dict:
        transport = self.transport or urllib_transport
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                self.stats["requests"] += 1
                return transport(self.url, body, self.headers(), self.timeout)
            except urllib.error.HTTPError as e:
                detail = ""
                try:
                    detail = e.read().decode("utf-8", "replace")[:300]
                except Exception:  # noqa: BLE001
                    pass
                if e.code in (401, 403):
                    raise AnnotationError(
                        f"annotation endpoint {self.url} refused the request (HTTP {e.code}); set ${self.api_key_env} "
                        f"or pass an API key. {detail}"
                    ) from None
                if e.code not in (408, 409, 429) and e.code < 500 or attempt == self.retries:
                    raise AnnotationError(f"annotation endpoint {self.url}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise AnnotationError(f"annotation endpoint {self.url} unreachable: {e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AnnotationError("unreachable")  # pragma: no cover

    def annotate(self, text: str) -> list[Span]:
        content = response_content(self._request(self.payload(text)))
        spans, stats = parse_annotation(text, content, self.labels)
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
        return spans


ANNOTATORS = ("heuristic", "chat")


def make_annotator(name: str, **options: Any) -> Annotator:
    """``"heuristic"`` or ``"chat"`` (options go to :class:`ChatAnnotator`: model, base_url, api_key_env, ...)."""
    if name == "heuristic":
        labels = options.get("labels")
        return HeuristicAnnotator(labels=labels) if labels else HeuristicAnnotator()
    if name == "chat":
        return ChatAnnotator(**{k: v for k, v in options.items() if v is not None})
    raise AnnotationError(f"unknown annotator {name!r}; choose one of {list(ANNOTATORS)}")


def annotate_traces(annotator: Annotator, texts: Iterable[str], prompts: Iterable[str | None] | None = None,
                    extra: Iterable[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Trace records ``{"text", "spans", ["prompt"], ...extra}`` for ``texts``, labelled by ``annotator``."""
    texts = list(texts)
    prompts = list(prompts) if prompts is not None else [None] * len(texts)
    extra = list(extra) if extra is not None else [{}] * len(texts)
    out = []
    for text, prompt, more in zip(texts, prompts, extra):
        rec: dict[str, Any] = {}
        if prompt is not None:
            rec["prompt"] = prompt
        rec["text"] = text
        rec["spans"] = annotator.annotate(text)
        rec.update(more)
        out.append(rec)
    return out
