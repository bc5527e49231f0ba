"""The math-correctness reward: +1 / -1 for whether a completion's final answer is the ground truth, graded the
way math-verify grades the same text.

What a call does, in order:

1. **Format.** ``answer_format="boxed"`` (the ``qwen_math`` template): the completion must contain a closed
   ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``); the last one is found in one linear pass.
   ``"answer_tag"`` (``r1``): the content of the last closed ``<answer>...</answer>``. No answer, an unterminated
   last box or tag, an empty one, one over ``MAX_ANSWER_CHARS`` characters or nested deeper than ``MAX_NESTING``
   brackets counts as *unparsed* (reward for incorrect) and never reaches sympy. These checks are the only places
   where the reward is stricter than math-verify, which may still grade a text without a final box from its other
   math.
2. **What math-verify reads.** ``boxed``: the whole completion, through math-verify's own extraction (``parse`` with
   its default ``LatexExtractionConfig`` and ``ExprExtractionConfig``): a "final answer is ..." sentence first, then
   the boxed answer and, only when that does not parse, "answer: ..." phrases and the last other math or number in
   the text. Whitespace and newlines inside a box, nested braces, ``$`` inside
   a box, ``\\text{}``, units, percentages and thousands separators are handled by math-verify exactly as when it
   reads the text itself, never rewritten here. (math-verify only looks for ``\\boxed``: a completion whose only box
   is an ``\\fbox{}`` passes the format check and is then graded by math-verify's other rules.) ``answer_tag``: the
   tag's content is graded as math-verify grades a completion that boxes it, ``\\boxed{content}``; the text around
   the tag is not read. The ground truth is parsed by math-verify as it is when it holds math delimiters (``$``,
   ``\\(``, ``\\[``, ``\\boxed``), else inside ``$$...$$``.
3. **Several boxes** follow math-verify's rule (``extract_boxed_content`` of latex2sympy2_extended, which math-verify
   applies to the boxed part of the text): starting from the last ``\\boxed{}``, each box before it joins the answer
   while the text between the two is shorter than 10 characters, or shorter than 70 and holding "and", "or", a comma
   or a semicolon (and the two contents differ; a repeated box counts once). All the boxes inside one ``$...$``,
   ``$$...$$`` or ``\\[...\\]`` join, and so do such environments joined by "and", "or" or a comma. Two or more joined answers are compared as a set: ``\\boxed{1}, \\boxed{2}`` is
   ``{1, 2}`` and ``\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}`` is ``{(2, 2), (6, 2)}``, while
   ``first \\boxed{3} then \\boxed{5}`` is ``{3, 5}``, not 5.
4. **Fast path.** When the boxed answer and the ground truth are both a plain integer (``72``, ``-3``, ``1,000``) or
   a fraction of integers (``3/4``, ``\\frac{3}{4}``), and nothing else in the text can change what math-verify reads
   (a single ``\\boxed{`` in the text, no "final answer", no percent sign after the box), math-verify compares the
   two exact rationals, whatever the grading options; that comparison is done here, in microseconds and without
   sympy. Everything else goes to math-verify. Tests check the fast path against math-verify on fuzzed numbers and
   contexts and on the grading corpus (``tests/data/grader_corpus.jsonl``, ``python -m analysis grader-report``).
5. **math-verify** (``parse`` both sides, ``verify`` with ``GradingOptions``: math-verify's own ``float_rounding``,
   ``numeric_precision``, ``strict`` and ``allow_set_relation_comp``, with its defaults) runs in a warm worker of a
   ``steering.deadline_pool`` pool, within ``timeout_s``. math-verify's own timeouts use ``signal.alarm``, which only
   works in the main thread, so they are off; the pool's deadline bounds the time instead (see that module). A sample
   that runs out of time scores as incorrect with ``timed_out=True``.

The pool (``NUM_WORKERS`` processes, 2 by default; ``start_workers(num_workers=n)`` sets another size) starts on the
first sample that needs math-verify. Time bound: a sample takes at most ``timeout_s`` plus a few milliseconds,
including the wait for a free worker (with more concurrent callers than workers, samples can time out while queueing;
raise ``NUM_WORKERS``). The one exception is the first math-verify sample in a process, which also waits for the pool
to start (2-3 s: each worker imports sympy and warms math-verify up; at most ``STARTUP_TIMEOUT_S``);
``start_workers()`` does that ahead of time.

``score``, ``score_batch`` and ``MathReward`` never raise on any completion or ground truth: an exception becomes an
incorrect sample, logged and counted (``status="error"``). Bad options (an unknown ``answer_format``, bad grading
options, a missing ground-truth column) are configuration errors and do raise.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any
from dataclasses import dataclass
from fractions import Fraction

from steering.deadline_pool import SharedPool

logger = logging.getLogger(__name__)

ANSWER_FORMATS = ("boxed", "answer_tag")
REWARD_STYLES = {"pm1": (1.0, -1.0), "binary": (1.0, 0.0)}  # style -> (correct, incorrect)


def accuracy_from_reward(mean_reward: float, reward_style: str) -> float:
    """The fraction correct that a mean reward of ``reward_style`` stands for."""
    correct, incorrect = REWARD_STYLES[reward_style]
    return (mean_reward - incorrect) / (correct - incorrect)

# Guards that decide before any sympy work. Real final answers are short and shallow; math-verify's parser is
# exponential in bracket nesting (ten bare nested braces already take seconds), so deeper answers are unparsable.
MAX_ANSWER_CHARS = 500
MAX_NESTING = 20

NUM_WORKERS = 2
MAX_TIMEOUT_S = 3600.0  # an hour per answer check; far larger values overflow the workers' timers (every check fails)


def check_timeout(timeout_s: float) -> None:
    """Reject a per-answer time limit outside (0, MAX_TIMEOUT_S] seconds, NaN and infinity included (``ValueError``
    whose message the caller prefixes with the setting's name)."""
    if not timeout_s > 0:
        raise ValueError(f"must be > 0, got {timeout_s}")
    if not timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"must be at most {MAX_TIMEOUT_S:g} seconds (larger limits overflow the grading workers' "
                         f"timers, and every answer would score as a failure), got {timeout_s}")


STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports sympy + math-verify; on a loaded machine that can take a while


@dataclass(frozen=True)
class GradingOptions:
    """math-verify's ``verify`` options, under its own names and with its defaults (math-verify 0.9)."""

    float_rounding: int = 6  # decimal places floats are rounded to before comparing (its "precision")
    numeric_precision: int = 15  # significant digits of numeric evaluation
    strict: bool = True  # False: variables match by position (f(x) == f(y)) and sets compare with tuples
    allow_set_relation_comp: bool = False  # True: a relation in the answer (1 < x < 2) may equal a set in the gold

    def __post_init__(self):
        for name in ("float_rounding", "numeric_precision"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "float_rounding" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'float_rounding' else 1}, got {value!r}")
        for name in ("strict", "allow_set_relation_comp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


DEFAULT_OPTIONS = GradingOptions()


# ----------------------------------------------------------------------------------------------------------------
# 1. Format: the final answer
# ----------------------------------------------------------------------------------------------------------------

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Brace tokens for the balance scan: a double backslash (a LaTeX line break, skipped so that "\\}" closes),
# an escaped brace (literal, not structural), or a brace.
_BRACE_TOKEN = re.compile(r"\\\\|\\[{}]|[{}]")
_SPACE_THEN_WORD = re.compile(r"[ \t]+([^\s$]+)")


@dataclass(frozen=True)
class _Box:
    content: str
    plain: bool  # written exactly "\boxed{...}": the form math-verify's box patterns match
    end: int  # index just past the box


def extract_answer(text: str, answer_format: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (``answer_format="boxed"``) or ``<answer>...</answer>``
    (``"answer_tag"``), or None when there is none or the last one is unterminated. Linear time in ``len(text)``."""
    if answer_format == "boxed":
        box = _last_box(text)
        return None if box is None else box.content
    if answer_format == "answer_tag":
        return _last_answer_tag(text)
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def _last_box(text: str, max_len: int | None = None) -> _Box | None:
    """With ``max_len``, a box whose content runs past ``max_len`` characters yields its first ``max_len + 1``
    characters (which the caller's length guard rejects) without scanning the rest."""
    last = None
    for last in _BOX_CMD.finditer(text):  # C-speed scan; keeping only the last match object
        pass
    if last is None:
        return None
    pos = last.end()
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if pos < len(text) and text[pos] == "{":
        plain = last.group() == "\\boxed" and pos == last.end()
        endpos = len(text) if max_len is None else min(len(text), pos + max_len + 2)
        close = _closing_brace(text, pos, endpos)
        if close is not None:
            return _Box(text[pos + 1:close], plain, close + 1)
        if endpos < len(text):
            return _Box(text[pos + 1:endpos], plain, endpos)  # too long to be an answer, closed or not
        return None  # the last box never closes: a truncated answer
    # "\boxed 5": the brace-less form takes the next word on the same line, up to whitespace or a "$".
    word = _SPACE_THEN_WORD.match(text, last.end())
    return _Box(word.group(1), False, word.end()) if word else None


def _closing_brace(text: str, open_pos: int, endpos: int | None = None) -> int | None:
    """Index of the brace closing the one at ``open_pos`` (before ``endpos``), or None. Jumps from brace to brace
    with a C-level regex scan, so the Python loop runs once per brace, not per character."""
    depth = 0
    for tok in _BRACE_TOKEN.finditer(text, open_pos, len(text) if endpos is None else endpos):
        t = tok.group()
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                return tok.start()
    return None


def _last_answer_tag(text: str) -> str | None:
    start = text.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    if end < 0:
        return None  # the last answer is unterminated
    return text[start:end].strip()


def _nesting_depth(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth -= 1
    return deepest


# ----------------------------------------------------------------------------------------------------------------
# 2. What math-verify reads, and the fast path
# ----------------------------------------------------------------------------------------------------------------

# Unescaped "$", "\(", "\[" or a box: the ground truth is already math-verify input.
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")


def _truth_text(gold) -> str:
    """Ground truths may come as numbers (72) from a dataset; a missing one (None) is "", which never matches."""
    return "" if gold is None else str(gold)


def gold_input(gold: str) -> str:
    """The text math-verify parses for a ground truth: as it is when it holds math delimiters, else as display math
    (which, unlike ``$...$``, may span lines)."""
    return gold if _MATH_DELIMITER.search(gold) else f"$${gold}$$"


# Exact numbers whose math-verify parse is the same rational: integers (no leading zeros, optional thousands
# commas) and fractions of plain integers, in ASCII digits (re.ASCII: other scripts' digits are math-verify's call).
_INTEGER = r"(?:0|[1-9]\d{0,2}(?:,\d{3})+|[1-9]\d*)"
_EXACT_INTEGER = re.compile(rf"-?{_INTEGER}", re.ASCII)
_EXACT_SLASH = re.compile(r"(-?)(0|[1-9]\d*)/([1-9]\d*)", re.ASCII)
_EXACT_FRAC = re.compile(r"(-?)\\[dt]?frac(?:\{(0|[1-9]\d*)\}\{([1-9]\d*)\}|(\d)([1-9]))", re.ASCII)
# What else in a text makes math-verify read something other than the one box: a "final answer" sentence (its
# priority-0 and -50 patterns, with the same case folding) or a percent sign after the box (which turns the math
# environment holding the box into a percentage).
_FINAL_ANSWER = re.compile(r"(?i:final answer)")
_PERCENT_AFTER = re.compile(r"%|[Pp]ercent|[Pp]ct")


def _exact_number(s: str) -> Fraction | None:
    if _EXACT_INTEGER.fullmatch(s):
        return Fraction(s.replace(",", ""))
    m = _EXACT_SLASH.fullmatch(s) or _EXACT_FRAC.fullmatch(s)
    if m is None:
        return None
    sign, num, den = m.group(1), *(g for g in m.groups()[1:] if g is not None)
    value = Fraction(int(num), int(den))
    return -value if sign == "-" else value


def _fast_verdict(text: str, box: _Box, gold: str) -> bool | None:
    """math-verify's verdict on ``text`` when the box and the ground truth are exact numbers that it must read as
    they are; None when math-verify has to decide."""
    if not box.plain:
        return None
    pred = _exact_number(box.content.strip())
    if pred is None:
        return None
    truth = _exact_number(gold.strip(" \t\r\n"))  # math-verify strips the box's content, not the ground truth's
    if truth is None:
        return None
    if text.count("\\boxed") != 1 or "\\fbox" in text or _FINAL_ANSWER.search(text) \
            or _PERCENT_AFTER.search(text, box.end):
        return None
    return pred == truth


# ----------------------------------------------------------------------------------------------------------------
# 3. math-verify, in the deadline pool's workers
# ----------------------------------------------------------------------------------------------------------------

def _math_verify(text: str, gold: str, options: GradingOptions) -> tuple[bool, bool]:
    """Runs in a worker: (correct, gold_parsed) for a completion text (or ``\\boxed{answer}``) and a ground truth,
    exactly as math-verify's ``parse`` + ``verify`` decide. Its own timeouts are off: the pool bounds the time."""
    from math_verify import parse, verify

    gold_parsed = parse(gold_input(gold), parsing_timeout=None)
    if not gold_parsed:
        return False, False
    pred_parsed = parse(text, parsing_timeout=None)
    if not pred_parsed:
        return False, True
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, **dataclasses.asdict(options))), True


_WARMUP = [("so x = \\boxed{3}", "3"), ("\\boxed{1}, \\boxed{2}", "\\{2,1\\}"),
           ("$\\boxed{\\sqrt{2}/2}$", "\\frac{\\sqrt2}{2}"), ("\\boxed{(1,2]}", "(1, 2]"),
           ("The answer is \\boxed{\\text{(A)}}", "A"), ("\\boxed{0.5}", "1/2")]


def _warm_up() -> None:
    """Run by each worker before it counts as ready: sympy's lazy imports and math-verify's first-use costs
    (parser, solve, sets, simplify: ~1 s in all) are paid here, never against a sample's deadline."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silences "Timeout is disabled" (on purpose here)
    for text, gold in _WARMUP:
        _math_verify(text, gold, DEFAULT_OPTIONS)


_WORKERS = SharedPool(warmup="steering.rewards:_warm_up", startup_timeout_s=STARTUP_TIMEOUT_S)


def _get_pool():
    return _WORKERS.get(NUM_WORKERS)


def start_workers(wait: bool = True, num_workers: int | None = None) -> None:
    """Start the math-verify workers now (otherwise the first sample that needs them does) and, with ``wait``,
    block until all of them are ready. Optional: it takes the few seconds of start-up out of the first samples.
    ``num_workers`` sets the pool size for this process (before the pool exists; default ``NUM_WORKERS``)."""
    global NUM_WORKERS
    if num_workers is not None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        with _WORKERS.lock:
            if _WORKERS.current is not None and num_workers != _WORKERS.current.size:
                raise RuntimeError("the reward worker pool is already running; set num_workers before first use")
            NUM_WORKERS = num_workers
    pool = _get_pool()
    if wait and not pool.wait_ready(STARTUP_TIMEOUT_S):
        raise RuntimeError(f"math-verify workers did not start within {STARTUP_TIMEOUT_S} s; see the log")


_UNPARSED_GOLD: set[str] = set()  # ground truths already warned about (bounded below)


def _slow_verdict(text: str, gold: str, options: GradingOptions, timeout_s: float) -> tuple[bool, str]:
    """(correct, status) from math-verify in a worker; status is "math_verify", "timeout" or "error". Never raises."""
    try:
        outcome = _get_pool().call(_math_verify, (text, gold, options), timeout_s)
    except Exception:  # noqa: BLE001 - "never raises": the sample scores incorrect, and the log says why
        logger.exception("reward: math-verify dispatch failed for %r vs %r", text[-100:], gold[:100])
        return False, "error"
    if outcome.status == "ok":
        correct, gold_parsed = outcome.value
        if not gold_parsed and gold not in _UNPARSED_GOLD and len(_UNPARSED_GOLD) < 1000:
            _UNPARSED_GOLD.add(gold)
            logger.warning("math-verify cannot parse the ground truth %r: every answer to it scores incorrect",
                           gold[:200])
        return correct, "math_verify"
    if outcome.status == "timeout":
        logger.debug("math-verify timed out (%s) on %r vs %r", outcome.value, text[-100:], gold[:100])
        return False, "timeout"
    logger.warning("math-verify failed on %r vs %r: %s", text[-100:], gold[:100], outcome.value)
    return False, "error"


# ----------------------------------------------------------------------------------------------------------------
# 4. Rewards
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RewardResult:
    reward: float
    correct: bool
    parsed: bool            # an answer was found in the expected format, non-empty, within the size guards
    extracted: str | None   # the final box's or tag's content (None when there was none)
    timed_out: bool = False
    status: str = ""        # how it was decided: unparsed | fast | math_verify | timeout | error


@dataclass
class _Sample:
    """One sample on its way through the pipeline: decided (``status`` set) or waiting for math-verify."""
    extracted: str | None
    parsed: bool
    text: str = ""  # what math-verify reads
    gold: str = ""
    correct: bool = False
    status: str | None = None


def _check_options(answer_format: str, reward_style: str, options) -> GradingOptions:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if reward_style not in REWARD_STYLES:
        raise ValueError(f"reward_style must be one of {tuple(REWARD_STYLES)}, got {reward_style!r}")
    if options is None:
        return DEFAULT_OPTIONS
    if not isinstance(options, GradingOptions):
        raise ValueError(f"options must be a GradingOptions, got {type(options).__name__}")
    return options


def _triage(completion, gold, answer_format: str) -> _Sample:
    """Format check, size guards and fast path. Never raises."""
    try:
        if not isinstance(completion, str):
            return _Sample(None, False, status="unparsed")
        if answer_format == "boxed":
            text = completion
            box = _last_box(completion, max_len=MAX_ANSWER_CHARS)  # never scans a huge box to its end
        else:
            content = _last_answer_tag(completion)
            # The tag's content is graded as math-verify grades a box that holds it.
            text = "" if content is None else f"\\boxed{{{content}}}"
            box = None if content is None else _Box(content, True, len(text))
    except Exception:  # noqa: BLE001
        logger.exception("reward: answer extraction failed")
        return _Sample(None, False, status="unparsed")
    if box is None or not box.content.strip():
        return _Sample(None if box is None else box.content, False, status="unparsed")
    if len(box.content) > MAX_ANSWER_CHARS or _nesting_depth(box.content) > MAX_NESTING:
        return _Sample(box.content, False, status="unparsed")
    try:
        gold_text = _truth_text(gold)
        fast = _fast_verdict(text, box, gold_text)
    except Exception:  # noqa: BLE001
        logger.exception("reward: comparing %r with %r failed", box.content[:100], str(gold)[:100])
        return _Sample(box.content, True, status="error")
    if fast is not None:
        return _Sample(box.content, True, correct=fast, status="fast")
    return _Sample(box.content, True, text=text, gold=gold_text)


def _decide(samples: list[_Sample], options: GradingOptions, timeout_s: float) -> None:
    """Send the undecided samples to math-verify (in parallel over the pool), each within its own ``timeout_s``."""
    waiting = [s for s in samples if s.status is None]
    if len(waiting) == 1:  # the common case of score(): no thread hop
        waiting[0].correct, waiting[0].status = _slow_verdict(waiting[0].text, waiting[0].gold, options, timeout_s)
        return
    futures = []
    if waiting:
        try:
            executor = _get_pool().executor
            for s in waiting:
                futures.append((s, executor.submit(_slow_verdict, s.text, s.gold, options, timeout_s)))
        except Exception:  # noqa: BLE001 - e.g. the executor is already shut down at interpreter exit
            logger.exception("reward: could not dispatch to the math-verify pool")
    for s, future in futures:
        s.correct, s.status = future.result()  # _slow_verdict never raises
    for s in waiting:
        if s.status is None:  # never dispatched
            s.correct, s.status = False, "error"


def score(completion: str, ground_truth: str, answer_format: str = "boxed", reward_style: str = "pm1",
          timeout_s: float = 2.0, options: GradingOptions | None = None) -> RewardResult:
    """Reward one completion. Never raises on any completion or ground truth; takes at most ``timeout_s``
    (plus milliseconds) apart from the pool's start-up on the first math-verify sample of a process."""
    return score_batch([completion], [ground_truth], answer_format, reward_style, timeout_s, options)[0]


def score_batch(completions: list, ground_truths: list, answer_format: str = "boxed", reward_style: str = "pm1",
                timeout_s: float = 2.0, options: GradingOptions | None = None) -> list[RewardResult]:
    """``score`` over a batch: the fast path runs here, the rest in parallel over the worker pool, each sample
    within its own ``timeout_s``. ``options``: math-verify's grading options (default: its own defaults)."""
    options = _check_options(answer_format, reward_style, options)
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    samples = [_triage(c, g, answer_format) for c, g in zip(completions, ground_truths)]
    _decide(samples, options, timeout_s)
    good, bad = REWARD_STYLES[reward_style]
    return [RewardResult(good if s.correct else bad, s.correct, s.parsed, s.extracted, s.status == "timeout",
                         s.status) for s in samples]


def verify_answer(extracted: str, ground_truth: str, timeout_s: float = 2.0,
                  options: GradingOptions | None = None) -> bool:
    """Whether an answer already taken out of a completion equals the ground truth, graded as a box holding it
    (the ``answer_tag`` path). Never raises; a timeout or an error is False."""
    if not isinstance(extracted, str):
        return False
    return score(f"<answer>{extracted}</answer>", ground_truth, "answer_tag", timeout_s=timeout_s,
                 options=options).correct


def _completion_text(completion) -> str | None:
    """TRL passes a string, or (conversational datasets) a list of messages: take the last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else None
    return None


class MathReward:
    """Callable for ``trl.GRPOTrainer(reward_funcs=[MathReward(...)])``: one float per completion, +1/-1 (``pm1``)
    or 1/0 (``binary``), ground truths from the dataset column ``answer_column``, graded with ``options``.

    Keeps counters since the last ``pop_stats()``, which the trainer writes to its log lines. ``ends``
    (``steering.generation.EndCounter``) also counts how the scored completions ended: the reward is the one place
    every rollout backend's completions (TRL's, ours, vLLM's) pass through."""

    __name__ = "math_verify"  # TRL names the reward column after this

    def __init__(self, answer_format: str = "boxed", reward_style: str = "pm1", timeout_s: float = 2.0,
                 answer_column: str = "answer", options: GradingOptions | None = None, ends: Any = None):
        self.options = _check_options(answer_format, reward_style, options)
        self.ends = ends
        self.answer_format = answer_format
        self.reward_style = reward_style
        self.timeout_s = timeout_s
        self.answer_column = answer_column
        self._lock = threading.Lock()
        self._counts = {"num": 0, "unparsed": 0, "timeouts": 0, "errors": 0}

    def __call__(self, prompts, completions, **columns) -> list[float]:
        if self.answer_column not in columns:
            raise ValueError(f"MathReward: no ground-truth column {self.answer_column!r} among the dataset columns "
                             f"{sorted(k for k in columns if k not in ('trainer_state', 'log_metric', 'log_extra'))}; "
                             f"pass answer_column=... to MathReward")
        truths = list(columns[self.answer_column])
        if self.ends is not None and columns.get("completion_ids") is not None:
            self.ends.record(columns["completion_ids"])
        texts = [_completion_text(c) for c in completions]
        results = score_batch(texts, truths, self.answer_format, self.reward_style, self.timeout_s, self.options)
        unparsed = sum(not r.parsed for r in results)
        timeouts = sum(r.timed_out for r in results)
        errors = sum(r.status == "error" for r in results)
        with self._lock:
            self._counts["num"] += len(results)
            self._counts["unparsed"] += unparsed
            self._counts["timeouts"] += timeouts
            self._counts["errors"] += errors
        logger.debug("math_verify reward: %d/%d unparsed, %d timed out, %d errors, mean reward %.3f",
                     unparsed, len(results), timeouts, errors,
                     sum(r.reward for r in results) / max(len(results), 1))
        return [r.reward for r in results]

    def pop_stats(self) -> dict:
        """Counts since the last call: reward/num, reward/unparsed, reward/unparsed_frac, reward/timeouts,
        reward/errors."""
        with self._lock:
            c = dict(self._counts)
            for key in self._counts:
                self._counts[key] = 0
        ends = self.ends.pop_stats() if self.ends is not None else {}
        return {"reward/num": c["num"], "reward/unparsed": c["unparsed"],
                "reward/unparsed_frac": c["unparsed"] / c["num"] if c["num"] else 0.0,
                "reward/timeouts": c["timeouts"], "reward/errors": c["errors"], **ends}
