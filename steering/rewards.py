"""The math-correctness reward: find the model's final answer, check it against the ground truth, +1 / -1.

What a call does, in order:

1. ``extract_answer`` takes the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) or of
   the last ``<answer>...</answer>``, in one linear pass whatever the text. No answer, an unterminated last box,
   an empty box, an answer over ``MAX_ANSWER_CHARS`` characters or nested deeper than ``MAX_NESTING`` brackets
   counts as *unparsed* (reward for incorrect).
2. A fast path compares the answer with the ground truth after light normalisation (spaces, ``$``, ``\\dfrac``,
   ``\\left``, a trailing period...): equal strings are correct; two plain numbers (``72``, ``-3.5``, ``1,000``,
   ``1/2``, ``\\frac{1}{2}``) are compared exactly. This decides most samples in microseconds, without sympy.
3. Everything else goes to math-verify (``parse`` both sides wrapped in ``$...$``, then ``verify``) in a small pool
   of persistent worker processes. math-verify's own timeout uses ``signal.alarm``, which only works in the main
   thread, so it is switched off. The deadline is enforced twice: the worker, in its own main thread, arms a
   one-shot ``SIGALRM`` for just before the deadline, which interrupts Python-level work (sympy evaluating
   ``9^{9^{9^{9}}}``) and leaves the worker alive and warm; the caller waits on the worker's pipe only until the
   deadline, and a worker that has not answered by then (stuck in C code that never sees the signal) is
   SIGKILLed and replaced. Either way the sample scores as incorrect with ``timed_out=True``.

The pool (``NUM_WORKERS`` processes, 2 by default; ``start_workers(n)`` sets another size) starts on the first sample
that needs math-verify. Workers are plain ``subprocess`` children running ``python -c``, not ``multiprocessing``
ones: that works from threads, from daemonic ``multiprocessing.Pool`` workers (which may not have
``multiprocessing`` children), after ``fork`` and under ``spawn``, and never re-imports the user's ``__main__``.
A worker exits when its pipe closes or its parent dies; the pool kills its workers at interpreter exit, and a
forked child forgets its parent's pool and starts its own.

Time bound: a sample takes at most ``timeout_s`` plus a few milliseconds, including the wait for a free worker
(with more concurrent callers than workers, samples can time out while queueing; raise ``NUM_WORKERS``). The one
exception is the first math-verify sample in a process, which also waits for the pool to start (2-3 s: each
worker imports sympy and warms math-verify up; at most ``STARTUP_TIMEOUT_S``); ``start_workers()`` does that
ahead of time. A killed worker's replacement takes as long to warm up, and meanwhile the pool is one worker
short, which is why interruptible work is stopped by the worker's own alarm rather than by a kill.

``score`` and ``MathReward`` never raise on any completion or ground truth: an exception becomes an incorrect
sample, logged and counted (``status="error"``). Bad options (an unknown ``answer_format``, a missing ground-truth
column) are configuration errors and do raise.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)

ANSWER_FORMATS = ("boxed", "answer_tag")
REWARD_STYLES = {"pm1": (1.0, -1.0), "binary": (1.0, 0.0)}  # style -> (correct, incorrect)

# Guards that decide before any sympy work. Real final answers are short and shallow; math-verify's parser is
# exponential in bracket nesting (ten bare nested braces already take seconds), so deeper answers are unparsable.
MAX_ANSWER_CHARS = 500
MAX_NESTING = 20

NUM_WORKERS = 2
STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports sympy + math-verify; on a loaded machine that can take a while
WORKER_ALARM_MARGIN_S = 0.05  # how long before the deadline a worker interrupts its own work


# ----------------------------------------------------------------------------------------------------------------
# 1. Extraction
# ----------------------------------------------------------------------------------------------------------------

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Brace tokens for the balance scan: a double backslash (a LaTeX line break, skipped so that "\\}" closes),
# an escaped brace (literal, not structural), or a brace.
_BRACE_TOKEN = re.compile(r"\\\\|\\[{}]|[{}]")
_SPACE_THEN_WORD = re.compile(r"[ \t]+([^\s$]+)")


def extract_answer(text: str, answer_format: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (``answer_format="boxed"``) or ``<answer>...</answer>``
    (``"answer_tag"``), or None when there is none or the last one is unterminated. Linear time in ``len(text)``."""
    if answer_format == "boxed":
        return _last_boxed(text)
    if answer_format == "answer_tag":
        return _last_answer_tag(text)
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def _last_boxed(text: str, max_len: int | None = None) -> str | None:
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
        endpos = len(text) if max_len is None else min(len(text), pos + max_len + 2)
        close = _closing_brace(text, pos, endpos)
        if close is not None:
            return text[pos + 1:close]
        if endpos < len(text):
            return text[pos + 1:endpos]  # too long to be an answer, closed or not
        return None  # the last box never closes: a truncated answer
    # "\boxed 5": the brace-less form takes the next word on the same line, up to whitespace or a "$".
    word = _SPACE_THEN_WORD.match(text, last.end())
    return word.group(1) if word else None


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
# 2. Fast path
# ----------------------------------------------------------------------------------------------------------------

_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_LATEX_SPACES = re.compile(r"\\[!,;: ]|~|\s+")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_SLASH_FRACTION = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac(?:\{([+-]?\d+)\}\{([+-]?\d+)\}|(\d)(\d))")


def _normalize(s: str) -> str:
    """Rewrites that never change the value: math-mode spaces, $ delimiters, an outer \\boxed, \\dfrac,
    \\left / \\right, a final period."""
    s = _LATEX_SPACES.sub("", s)
    for _ in range(2):  # "$\boxed{5}$", "\boxed{\boxed{5}}"
        if len(s) >= 2 and s[0] == s[-1] == "$":
            s = s.strip("$")
        for cmd in ("\\boxed{", "\\fbox{"):
            if s.startswith(cmd) and _closing_brace(s, len(cmd) - 1) == len(s) - 1:
                s = s[len(cmd):-1]
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = _LEFT_RIGHT.sub("", s)
    return s.rstrip(".")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, exact) for a plain number, else None. ``exact`` is False for decimals, which math-verify compares
    after rounding, so only their equality is decided here."""
    if _NUMBER.fullmatch(s):
        return Fraction(s.replace(",", "")), "." not in s
    m = _SLASH_FRACTION.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2))), True
    m = _LATEX_FRACTION.fullmatch(s)
    if m:
        num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
        if int(den) != 0:
            value = Fraction(int(num), int(den))
            return (-value if m.group(1) == "-" else value), True
    return None


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """True / False when string or plain-number comparison settles it, None when math-verify must decide."""
    p, g = _normalize(pred), _normalize(gold)
    if p == g and p:
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is None or gn is None:
        return None
    if pn[0] == gn[0]:
        return True
    if pn[1] and gn[1]:
        return False
    return None


# ----------------------------------------------------------------------------------------------------------------
# 3. math-verify in worker processes
# ----------------------------------------------------------------------------------------------------------------

def _math_verify(pred: str, gold: str) -> tuple[bool, bool]:
    """Runs in a worker. Returns (correct, gold_parsed). Both sides are wrapped in ``$...$`` so that bare LaTeX
    (``\\frac{1}{2}``), plain numbers, sets and intervals all parse. math-verify's own timeouts are off: the worker's
    alarm and the caller's deadline bound the time instead."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    if not gold_parsed:
        return False, False
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    if not pred_parsed:
        return False, True
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None)), True


_WARMUP_PAIRS = [("x=3", "3"), ("\\{1,2\\}", "\\{2,1\\}"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("(1,2]", "(1, 2]"),
                 ("\\text{(A)}", "A"), ("0.5", "1/2")]


class _WorkerDeadline(BaseException):
    """Raised by the worker's own alarm. A BaseException, so that math-verify's and sympy's ``except Exception``
    handlers let it through."""


def _worker_main(read_fd: str, write_fd: str, parent_pid: str) -> None:
    """Worker loop: receive (request id, function, args, budget in s), send back (request id, status, value) with
    status "ok", "timeout" or "error"."""
    import signal

    # Ctrl-C reaches the whole process group; the parent decides what happens to its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_alarm(signum, frame):
        raise _WorkerDeadline()

    signal.signal(signal.SIGALRM, on_alarm)
    inbox = Connection(int(read_fd), writable=False)
    outbox = Connection(int(write_fd), readable=False)

    # If the parent is SIGKILLed while this worker is busy, the pipe EOF is not seen until the work ends.
    def watch_parent():
        while os.getppid() == int(parent_pid):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silences "Timeout is disabled" (on purpose here)
    # Pay sympy's lazy imports and math-verify's first-use costs (parser, solve, sets, simplify: ~1 s in all)
    # before saying ready, so that they never count against a sample's deadline.
    for pred, gold in _WARMUP_PAIRS:
        _math_verify(pred, gold)
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            request = inbox.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        request_id, fn, args, budget_s = request
        # This process's main thread may use SIGALRM: a one-shot timer interrupts Python-level work (sympy) just
        # before the parent's deadline, so the worker answers "timeout" and stays alive and warm. Work stuck in
        # C code never sees the signal; the parent kills that worker at the deadline.
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(budget_s, 0.001))
                value = fn(*args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            reply = (request_id, "ok", value)
        except _WorkerDeadline:
            reply = (request_id, "timeout", f"interrupted after {budget_s:.2f} s")
        except BaseException as e:  # noqa: BLE001 - anything the function does is reported, never fatal
            reply = (request_id, "error", f"{type(e).__name__}: {e}")
        try:
            outbox.send(reply)
        except (EOFError, OSError):
            return  # the parent is gone
        except Exception as e:  # noqa: BLE001 - an unpicklable result
            outbox.send((request_id, "error", f"unpicklable result: {type(e).__name__}: {e}"))


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from steering.rewards import _worker_main; _worker_main(*sys.argv[2:])")


class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, _PACKAGE_ROOT, str(to_child_r), str(from_child_w),
                 str(os.getpid())],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, close_fds=True,
            )
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(from_child_r, writable=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Send SIGKILL. Safe from any thread: a thread blocked on this worker's pipe then sees EOF."""
        try:
            self.proc.kill()
        except OSError:
            pass

    def reap(self) -> None:
        """Wait for the killed process and close the pipes; only by the thread that owns the worker."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("math-verify worker (pid %s) survived SIGKILL for 5 s", self.proc.pid)
        for conn in (self.outbox, self.inbox):
            conn.close()


@dataclass
class _Outcome:
    status: str  # "ok", "timeout", "error"
    value: object = None


class _WorkerPool:
    """A fixed number of worker processes, checked out one caller at a time, replaced when killed or dead."""

    def __init__(self, size: int):
        self.size = size
        self.owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: set[_Worker] = set()  # started, not yet discarded (idle, busy or starting)
        self._ids = itertools.count()
        self._ready_changed = threading.Condition(self._lock)
        self._ready: set[_Worker] = set()  # warmed up and not discarded (idle or busy)
        self._ever_ready = threading.Event()  # one worker has been ready: the pool's start-up is over
        self.startup_error: str | None = None  # why a worker failed to start before any was ever ready
        self._started_at = time.monotonic()
        self._closed = False
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="math-verify")
        self._top_up()

    def _top_up(self) -> None:
        """Start workers until there are ``size``; each is handed out once it reports ready."""
        with self._lock:
            # No retrying when no worker has ever started: the cause (say, math-verify not importable) would
            # only repeat, one process per sample.
            broken = self.startup_error is not None and not self._ever_ready.is_set()
            missing = 0 if self._closed or broken else self.size - len(self._workers)
            new = []
            for _ in range(missing):
                try:
                    worker = _Worker()
                except Exception:  # noqa: BLE001
                    logger.exception("math-verify worker: could not start a process")
                    break
                self._workers.add(worker)
                new.append(worker)
        for worker in new:
            threading.Thread(target=self._await_ready, args=(worker,), daemon=True).start()

    def _await_ready(self, worker: _Worker) -> None:
        try:
            ok = worker.inbox.poll(STARTUP_TIMEOUT_S) and worker.inbox.recv()[0] == "ready"
        except (EOFError, OSError):
            ok = False
        if ok:
            with self._lock:
                self._ready.add(worker)
                self._ready_changed.notify_all()
            self._ever_ready.set()
            self._idle.put(worker)
        else:
            if not self._closed:  # at shutdown, close() killing a starting worker is expected
                error = (f"math-verify worker (pid {worker.proc.pid}) did not start (exit code "
                         f"{worker.proc.poll()}); see its stderr above")
                logger.error(error)
            self._discard(worker, replace=False)
            if not self._closed and not self._ever_ready.is_set():
                self.startup_error = error  # after the discard, so that callers see a consistent pool

    def _discard(self, worker: _Worker, replace: bool = True) -> None:
        """Kill a worker now; reap it and start its replacement off the caller's path (that takes ~10-30 ms)."""
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
            self._ready.discard(worker)

        def reap_and_replace():
            worker.reap()
            if replace:
                self._top_up()

        threading.Thread(target=reap_and_replace, daemon=True).start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until all ``size`` workers are warmed up (replacing any that died), or ``timeout_s``."""
        self._top_up()
        with self._ready_changed:
            return self._ready_changed.wait_for(lambda: len(self._ready) >= self.size, timeout_s)

    def _acquire(self, deadline: float) -> _Worker | None:
        self._top_up()
        while True:
            wait = deadline - time.monotonic()
            starting = not self._ever_ready.is_set()
            if starting:  # the pool is still starting: that wait is not the sample's fault
                if self.startup_error is not None:
                    return None
                # In short slices, to notice a failed start-up rather than wait it out.
                wait = min(max(wait, self._started_at + STARTUP_TIMEOUT_S - time.monotonic()), 0.1)
            try:
                worker = self._idle.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if starting and time.monotonic() < self._started_at + STARTUP_TIMEOUT_S:
                    continue
                return None
            if worker.alive():
                return worker
            self._discard(worker)  # died while idle (OOM killer...): replace it and take another

    def call(self, fn, args: tuple, timeout_s: float) -> _Outcome:
        """Run ``fn(*args)`` in a worker; give up at ``timeout_s`` after the call (waiting for a worker included)."""
        deadline = time.monotonic() + timeout_s
        starting = not self._ever_ready.is_set()
        worker = self._acquire(deadline)
        if worker is None and self.startup_error is not None and not self._ever_ready.is_set():
            return _Outcome("error", self.startup_error)
        if worker is None:
            return _Outcome("timeout", "no free worker before the deadline")
        if starting:  # the wait was for the pool's start-up: the sample still gets its full time
            deadline = time.monotonic() + timeout_s
        request_id = next(self._ids)
        healthy = False
        try:
            # The worker interrupts itself a little before the deadline (and survives); the kill below is for
            # work that ignores the signal.
            budget = deadline - time.monotonic() - WORKER_ALARM_MARGIN_S
            worker.outbox.send((request_id, fn, args, budget))
            if not worker.inbox.poll(max(deadline - time.monotonic(), 0.0)):
                return _Outcome("timeout", f"no answer within {timeout_s} s; worker killed")
            reply_id, status, value = worker.inbox.recv()
            if reply_id != request_id:
                return _Outcome("error", f"worker replied to request {reply_id}, expected {request_id}")
            healthy = True
            return _Outcome(status, value)
        except (EOFError, OSError) as e:
            return _Outcome("error", f"worker pipe failed: {type(e).__name__}: {e}")
        finally:
            # Only a worker that answered this very request goes back; any other (timed out, broken, or
            # interrupted mid-request with a reply still in flight) is killed and replaced.
            if healthy:
                self._idle.put(worker)
            else:
                self._discard(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
        for worker in workers:
            worker.kill()
        for worker in workers:
            try:
                worker.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _get_pool() -> _WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _WorkerPool(NUM_WORKERS)
        return _POOL


def start_workers(wait: bool = True, num_workers: int | None = None) -> None:
    """Start the math-verify workers now (otherwise the first sample that needs them does) and, with ``wait``,
    block until all of them are ready. Optional: it takes the few seconds of start-up out of the first samples.
    ``num_workers`` sets the pool size for this process (before the pool exists; default ``NUM_WORKERS``)."""
    global NUM_WORKERS
    if num_workers is not None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        with _POOL_LOCK:
            if _POOL is not None and num_workers != NUM_WORKERS:
                raise RuntimeError("the reward worker pool is already running; set num_workers before first use")
            NUM_WORKERS = num_workers
    pool = _get_pool()
    if wait and not pool.wait_ready(STARTUP_TIMEOUT_S):
        raise RuntimeError(f"math-verify workers did not start within {STARTUP_TIMEOUT_S} s; see the log")


def _close_pool_at_exit() -> None:
    pool = _POOL
    if pool is not None and pool.owner_pid == os.getpid():
        pool.close()


def _forget_pool_after_fork() -> None:
    # The child must not use or kill the parent's workers (their pipes are shared); it starts its own pool.
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


atexit.register(_close_pool_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)

_UNPARSED_GOLD: set[str] = set()  # ground truths already warned about (bounded below)


def _slow_verdict(pred: str, gold: str, timeout_s: float) -> tuple[bool, str]:
    """(correct, status) from math-verify in a worker; status is "math_verify", "timeout" or "error"."""
    outcome = _get_pool().call(_math_verify, (pred, gold), timeout_s)
    if outcome.status == "ok":
        correct, gold_parsed = outcome.value
        if not gold_parsed and gold not in _UNPARSED_GOLD and len(_UNPARSED_GOLD) < 1000:
            _UNPARSED_GOLD.add(gold)
            logger.warning("math-verify cannot parse the ground truth %r: every answer to it scores incorrect",
                           gold[:200])
        return correct, "math_verify"
    if outcome.status == "timeout":
        logger.debug("math-verify timed out (%s) on answer %r vs %r", outcome.value, pred[:100], gold[:100])
        return False, "timeout"
    logger.warning("math-verify failed on answer %r vs %r: %s", pred[:100], gold[:100], outcome.value)
    return False, "error"


def verify_answer(extracted: str, ground_truth: str, timeout_s: float = 2.0) -> bool:
    """Whether the extracted answer equals the ground truth (fast path, else math-verify in a worker within
    ``timeout_s``). Never raises; a timeout or an error is False."""
    return _verdict(extracted, ground_truth, timeout_s)[0]


def _verdict(extracted: str, ground_truth: str, timeout_s: float) -> tuple[bool, str]:
    """(correct, status) for an extracted answer: size guards, fast path, then math-verify. Never raises."""
    try:
        if not isinstance(extracted, str) or not extracted.strip():
            return False, "unparsed"
        if len(extracted) > MAX_ANSWER_CHARS or _nesting_depth(extracted) > MAX_NESTING:
            return False, "unparsed"
        fast = _fast_verdict(extracted, _truth_text(ground_truth))
    except Exception:  # noqa: BLE001
        logger.exception("reward: comparing %r with %r failed", str(extracted)[:100], str(ground_truth)[:100])
        return False, "error"
    if fast is not None:
        return fast, "fast"
    return _safe_slow_verdict(extracted, ground_truth, timeout_s)


# ----------------------------------------------------------------------------------------------------------------
# 4. Rewards
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RewardResult:
    reward: float
    correct: bool
    parsed: bool            # an answer was found in the expected format, non-empty, within the size guards
    extracted: str | None   # the answer text found (None when there was none)
    timed_out: bool = False
    status: str = ""        # how it was decided: unparsed | fast | math_verify | timeout | error


def _check_options(answer_format: str, reward_style: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if reward_style not in REWARD_STYLES:
        raise ValueError(f"reward_style must be one of {tuple(REWARD_STYLES)}, got {reward_style!r}")


def _extract_stage(completion, answer_format: str) -> tuple[str | None, bool]:
    """(extracted, parsed). Never raises."""
    try:
        if not isinstance(completion, str):
            return None, False
        if answer_format == "boxed":
            extracted = _last_boxed(completion, max_len=MAX_ANSWER_CHARS)  # never scans a huge box to its end
        else:
            extracted = _last_answer_tag(completion)
    except Exception:  # noqa: BLE001
        logger.exception("reward: answer extraction failed")
        return None, False
    if extracted is None or not extracted.strip():
        return extracted, False
    if len(extracted) > MAX_ANSWER_CHARS or _nesting_depth(extracted) > MAX_NESTING:
        return extracted, False
    return extracted, True


def _result(correct: bool, parsed: bool, extracted, status: str, reward_style: str) -> RewardResult:
    good, bad = REWARD_STYLES[reward_style]
    return RewardResult(good if correct else bad, correct, parsed, extracted, status == "timeout",
                        status if parsed else "unparsed")


def score(completion: str, ground_truth: str, answer_format: str = "boxed", reward_style: str = "pm1",
          timeout_s: float = 2.0) -> RewardResult:
    """Reward one completion. Never raises on any completion or ground truth; takes at most ``timeout_s``
    (plus milliseconds) apart from the pool's start-up on the first math-verify sample of a process."""
    _check_options(answer_format, reward_style)
    return score_batch([completion], [ground_truth], answer_format, reward_style, timeout_s)[0]


def score_batch(completions: list, ground_truths: list, answer_format: str = "boxed", reward_style: str = "pm1",
                timeout_s: float = 2.0) -> list[RewardResult]:
    """``score`` over a batch: the fast path runs here, the rest in parallel over the worker pool, each sample
    within its own ``timeout_s``."""
    _check_options(answer_format, reward_style)
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    results: list[RewardResult | None] = [None] * len(completions)
    slow = []
    for i, (completion, gold) in enumerate(zip(completions, ground_truths)):
        extracted, parsed = _extract_stage(completion, answer_format)
        if not parsed:
            results[i] = _result(False, False, extracted, "unparsed", reward_style)
            continue
        try:
            fast = _fast_verdict(extracted, _truth_text(gold))
        except Exception:  # noqa: BLE001
            logger.exception("reward: fast comparison failed")
            results[i] = _result(False, True, extracted, "error", reward_style)
            continue
        if fast is None:
            slow.append((i, extracted, gold))
        else:
            results[i] = _result(fast, True, extracted, "fast", reward_style)
    if len(slow) == 1:  # the common case of score(): no thread hop
        i, extracted, gold = slow[0]
        correct, status = _safe_slow_verdict(extracted, gold, timeout_s)
        results[i] = _result(correct, True, extracted, status, reward_style)
    elif slow:
        futures = []
        try:
            executor = _get_pool().executor
            for i, extracted, gold in slow:
                futures.append((i, extracted, executor.submit(_safe_slow_verdict, extracted, gold, timeout_s)))
        except Exception:  # noqa: BLE001 - e.g. the executor is already shut down at interpreter exit
            logger.exception("reward: could not dispatch to the math-verify pool")
        submitted = {i for i, _, _ in futures}
        for i, extracted, _ in slow:
            if i not in submitted:
                results[i] = _result(False, True, extracted, "error", reward_style)
        for i, extracted, future in futures:
            correct, status = future.result()  # _safe_slow_verdict never raises
            results[i] = _result(correct, True, extracted, status, reward_style)
    return results  # type: ignore[return-value]


def _truth_text(gold) -> str:
    """Ground truths may come as numbers (72) from a dataset; a missing one (None) is "", which never matches."""
    return "" if gold is None else str(gold)


def _safe_slow_verdict(extracted: str, gold, timeout_s: float) -> tuple[bool, str]:
    try:
        return _slow_verdict(extracted, _truth_text(gold), timeout_s)
    except Exception:  # noqa: BLE001 - "never raises": the sample scores incorrect, and the log says why
        logger.exception("reward: math-verify dispatch failed for %r vs %r", extracted[:100], str(gold)[:100])
        return False, "error"


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
    or 1/0 (``binary``), ground truths from the dataset column ``answer_column``.

    Keeps counters since the last ``pop_stats()`` and, when TRL passes its ``log_metric`` callback, also logs the
    batch's unparsed fraction and timeouts as ``math_verify/unparsed_frac`` and ``math_verify/timeouts``."""

    __name__ = "math_verify"  # TRL names the reward column after this

    def __init__(self, answer_format: str = "boxed", reward_style: str = "pm1", timeout_s: float = 2.0,
                 answer_column: str = "answer"):
        _check_options(answer_format, reward_style)
        self.answer_format = answer_format
        self.reward_style = reward_style
        self.timeout_s = timeout_s
        self.answer_column = answer_column
        self._lock = threading.Lock()
        self._counts = {"num": 0, "unparsed": 0, "timeouts": 0, "errors": 0}

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if self.answer_column not in kwargs:
            raise ValueError(f"MathReward: no ground-truth column {self.answer_column!r} among the dataset columns "
                             f"{sorted(k for k in kwargs if k not in ('trainer_state', 'log_metric', 'log_extra'))}; "
                             f"pass answer_column=... to MathReward")
        truths = list(kwargs[self.answer_column])
        texts = [_completion_text(c) for c in completions]
        results = score_batch(texts, truths, self.answer_format, self.reward_style, self.timeout_s)
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
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and results:
            log_metric("math_verify/unparsed_frac", unparsed / len(results))
            log_metric("math_verify/timeouts", float(timeouts))
        return [r.reward for r in results]

    def pop_stats(self) -> dict:
        """Counts since the last call: reward/num, reward/unparsed, reward/unparsed_frac, reward/timeouts,
        reward/errors."""
        with self._lock:
            c = dict(self._counts)
            for key in self._counts:
                self._counts[key] = 0
        return {"reward/num": c["num"], "reward/unparsed": c["unparsed"],
                "reward/unparsed_frac": c["unparsed"] / c["num"] if c["num"] else 0.0,
                "reward/timeouts": c["timeouts"], "reward/errors": c["errors"]}
