"""Properties of the math reward (issue: rewards): the reward table, the fast path agreeing with math-verify, and a
time bound that holds whatever the text, in the main thread, in worker threads and in subprocesses."""

import multiprocessing
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steering import rewards
from steering.rewards import MathReward, RewardResult, extract_answer, score, verify_answer

SLACK_S = 0.5  # scheduling on a loaded 2-core machine; the measured overhead past the deadline is a few ms
FUZZ_TIMEOUT_S = 1.0  # the fuzz tests use a shorter deadline than the default 2 s to keep the suite fast

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def workers():
    rewards.start_workers()  # the pool's one-off start-up is not part of any sample's time bound


# --------------------------------------------------------------------------------------------------------------
# The reward table
# --------------------------------------------------------------------------------------------------------------

TABLE = [
    # completion, ground truth, answer_format, reward, parsed
    ("So the total is \\boxed{72}.", "72", "boxed", 1.0, True),
    ("So the total is \\boxed{71}.", "72", "boxed", -1.0, True),
    ("So the total is 72.", "72", "boxed", -1.0, False),
    ("Half: \\boxed{\\frac{1}{2}}", "0.5", "boxed", 1.0, True),
    ("Half: \\boxed{0.5}", "\\frac{1}{2}", "boxed", 1.0, True),
    ("Half: \\boxed{1/2}", "\\frac{1}{2}", "boxed", 1.0, True),
    ("Half: \\boxed{\\dfrac12}", "0.5", "boxed", 1.0, True),
    ("\\boxed{72.0}", "72", "boxed", 1.0, True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "boxed", 1.0, True),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}", "boxed", 1.0, True),  # escaped braces inside a box
    ("first \\boxed{3} then \\boxed{5}", "5", "boxed", 1.0, True),  # the last box wins
    ("first \\boxed{5} then \\boxed{3}", "5", "boxed", -1.0, True),
    ("\\boxed{5} and finally \\boxed{", "5", "boxed", -1.0, False),  # an unterminated last box
    ("\\boxed{}", "5", "boxed", -1.0, False),
    ("\\boxed{x = 3}", "3", "boxed", 1.0, True),  # math-verify, not the fast path
    ("<think>2+2</think> <answer>4</answer>", "4", "answer_tag", 1.0, True),
    ("<answer>3</answer> wait <answer>4</answer>", "4", "answer_tag", 1.0, True),
    ("<answer>4</answer> wait <answer>5", "4", "answer_tag", -1.0, False),
    ("<answer> \\frac{1}{2} </answer>", "0.5", "answer_tag", 1.0, True),
    ("\\boxed{4} but no tags", "4", "answer_tag", -1.0, False),
    ("x" * 100_000 + "\\boxed{42}", "42", "boxed", 1.0, True),
    ("x" * 100_000, "42", "boxed", -1.0, False),
]


@pytest.mark.parametrize("completion, truth, fmt, reward, parsed", TABLE, ids=[t[0][:30] for t in TABLE])
def test_reward_table(completion, truth, fmt, reward, parsed):
    r = score(completion, truth, answer_format=fmt)
    assert (r.reward, r.parsed, r.correct) == (reward, parsed, reward > 0), r
    binary = score(completion, truth, answer_format=fmt, reward_style="binary")
    assert binary.reward == (1.0 if reward > 0 else 0.0)


def test_extract_answer_cases():
    assert extract_answer("\\boxed{\\frac{a}{b^{2}}}", "boxed") == "\\frac{a}{b^{2}}"
    assert extract_answer("\\boxed {7}", "boxed") == "7"
    assert extract_answer("so \\boxed 7$.", "boxed") == "7"
    assert extract_answer("\\fbox{7}", "boxed") == "7"
    assert extract_answer("\\boxed{a\\\\}b}", "boxed") == "a\\\\"  # "\\" is a line break, so "}" closes
    assert extract_answer("\\boxedfoo{7}", "boxed") is None  # not the \boxed command
    assert extract_answer("\\boxed{\\boxed{7}}", "boxed") == "7"
    assert extract_answer("\\boxed{", "boxed") is None
    assert extract_answer("<answer>\n 7 \n</answer>", "answer_tag") == "7"
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer("x", "latex")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="reward_style"):
        score("\\boxed{1}", "1", reward_style="pm2")
    with pytest.raises(ValueError, match="answer_format"):
        MathReward(answer_format="box")


def test_verify_answer_forms():
    assert verify_answer("\\frac{1}{2}", "0.5")
    assert verify_answer("72", "72.0")
    assert verify_answer("\\text{(A)}", "A")
    assert verify_answer("1,000", "1000")
    assert not verify_answer("0.33", "1/3")  # math-verify rounds to 6 places, not 2
    assert not verify_answer("", "1")
    assert not verify_answer("1" * 1000, "1" * 1000)  # over the length guard: unparsable, even if equal
    assert not verify_answer("(" * 30 + "1" + ")" * 30, "1")  # over the nesting guard


@st.composite
def numbers(draw):
    """A plain number written as an integer, a decimal, a slash fraction or a LaTeX fraction."""
    num = draw(st.integers(-1000, 1000))
    den = draw(st.integers(1, 12))
    form = draw(st.sampled_from(["int", "dec", "slash", "frac", "dfrac"]))
    if form == "int":
        return str(num)
    if form == "dec":
        return str(num / 8)  # exact in binary, so the decimal string is exact
    if form == "slash":
        return f"{num}/{den}"
    if form == "frac":
        return f"-\\frac{{{abs(num)}}}{{{den}}}" if num < 0 else f"\\frac{{{num}}}{{{den}}}"
    return f"\\dfrac{{{num}}}{{{den}}}"


@settings(max_examples=150, deadline=None, database=None)
@given(pred=numbers(), gold=numbers())
def test_fast_path_agrees_with_math_verify(pred, gold):
    """Whenever the fast path decides, math-verify (run here, in-process) decides the same."""
    fast = rewards._fast_verdict(pred, gold)
    if fast is None:
        return
    assert fast == rewards._math_verify(pred, gold)[0], (pred, gold)


@settings(max_examples=60, deadline=None, database=None)
@given(a=st.integers(-10**6, 10**6), b=st.integers(1, 10**6))
def test_fast_path_decides_plain_numbers(a, b):
    value = Fraction(a, b)
    assert rewards._fast_verdict(f"{a}/{b}", f"\\frac{{{value.numerator}}}{{{value.denominator}}}") is True
    assert rewards._fast_verdict(str(a), str(a + 1)) is False


# --------------------------------------------------------------------------------------------------------------
# Fuzz: a valid reward within the time bound, whatever the text
# --------------------------------------------------------------------------------------------------------------

ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9}}}}",  # sympy tries to evaluate this tower: it really hangs (cut off at the deadline)
    "\\boxed{" + "\\frac{1}{" * 60 + "2" + "}" * 60 + "}",
    "\\boxed{" + "\\frac{1}{2}" * 40 + "}",
    "\\boxed{" * 50_000,
    "\\boxed{" + "{" * 200_000,
    "\\boxed{" + "{" * 15 + "1" + "}" * 15 + "}",
    "\\boxed{10!!!!!}",
    "<answer>" * 1000 + "</answer>" * 3,
    "\\boxed{\\}}}}}}",
    "\\boxed{\ud800}",  # a lone surrogate
    "\\boxed{\x00\\x}",
]
TRUTHS = ["72", "1", "\\frac{1}{2}", "0.5", "x^2+1", "(1, 2]", "\\text{(A)}", "", "\\boxed{", "{"]


def latex_soup():
    atoms = ["\\frac", "\\sqrt", "{", "}", "^", "_", "\\boxed{", "\\left(", "\\right)", "\\pi", "x", "1", "9",
             "+", "-", "=", ",", "\\{", "\\}", "$", "<answer>", "</answer>", "\\text{", " ", "(", ")", "[", "]"]
    return st.lists(st.sampled_from(atoms), max_size=60).map("".join)


def huge_text():
    chunk = st.text(min_size=1, max_size=20)
    return st.tuples(chunk, st.sampled_from(["", "\\boxed{", "\\boxed{7}", "<answer>"])).map(
        lambda t: t[0] * (1_000_000 // len(t[0])) + t[1])


COMPLETIONS = st.one_of(
    st.text(max_size=300),
    latex_soup(),
    latex_soup().map(lambda s: f"\\boxed{{{s}}}"),
    latex_soup().map(lambda s: f"<answer>{s}</answer>"),
    st.integers(1, 5000).map(lambda d: "\\boxed{" + "{" * d + "1" + "}" * d + "}"),
    st.integers(1, 5000).map(lambda n: "\\boxed{" * n),
    st.sampled_from(ADVERSARIAL),
    huge_text(),
)


def _check(result, elapsed, timeout_s):
    assert isinstance(result, RewardResult)
    assert result.reward in (1.0, -1.0)
    assert result.correct == (result.reward == 1.0)
    assert elapsed <= timeout_s + SLACK_S, f"took {elapsed:.2f} s"


def _timed_score(completion, truth, fmt, timeout_s):
    start = time.monotonic()
    result = score(completion, truth, answer_format=fmt, timeout_s=timeout_s)
    return result, time.monotonic() - start


@FUZZ
@given(completion=COMPLETIONS, truth=st.sampled_from(TRUTHS), fmt=st.sampled_from(["boxed", "answer_tag"]))
def test_fuzz_main_thread(completion, truth, fmt):
    _check(*_timed_score(completion, truth, fmt, FUZZ_TIMEOUT_S), FUZZ_TIMEOUT_S)


_THREADS = ThreadPoolExecutor(max_workers=2)


@settings(FUZZ, max_examples=80)
@given(completion=COMPLETIONS, truth=st.sampled_from(TRUTHS), fmt=st.sampled_from(["boxed", "answer_tag"]))
def test_fuzz_worker_thread(completion, truth, fmt):
    result, elapsed = _THREADS.submit(_timed_score, completion, truth, fmt, FUZZ_TIMEOUT_S).result()
    _check(result, elapsed, FUZZ_TIMEOUT_S)


def _subprocess_cases():
    rng = random.Random(0)
    soup = ["\\frac", "{", "}", "^", "9", "x", "\\boxed{", "=", "1", "\\sqrt", "(", ")"]
    cases = [(c, "1", "boxed") for c in ADVERSARIAL]
    cases += [("".join(rng.choice(soup) for _ in range(rng.randint(0, 40))), rng.choice(TRUTHS), "boxed")
              for _ in range(20)]
    cases += [("y" * 1_000_000 + "\\boxed{7}", "7", "boxed"), ("\\boxed{x=3}", "3", "boxed")]
    return cases


def _score_cases_timed(cases):
    """Runs in a spawned, daemonic multiprocessing.Pool worker, which starts its own verification pool."""
    rewards.NUM_WORKERS = 1  # one is enough here, and starts in half the CPU time on a 2-core machine
    rewards.start_workers()
    return [_timed_score(c, t, f, FUZZ_TIMEOUT_S) for c, t, f in cases]


def test_time_bound_in_spawned_daemon_process():
    cases = _subprocess_cases()
    # Pool workers are daemonic: they may not have multiprocessing children, which is why the rewards' workers
    # are plain subprocesses.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out = pool.apply_async(_score_cases_timed, (cases,)).get(timeout=120)
    for result, elapsed in out:
        _check(result, elapsed, FUZZ_TIMEOUT_S)
    assert out[-1][0].correct and out[-1][0].status == "math_verify"
    assert out[-2][0].correct


# --------------------------------------------------------------------------------------------------------------
# Timeouts and the pool
# --------------------------------------------------------------------------------------------------------------

def test_slow_work_is_interrupted_and_the_worker_survives():
    pool = rewards._get_pool()
    before = {w.proc.pid for w in pool._workers}
    start = time.monotonic()
    outcome = pool.call(time.sleep, (60,), 0.5)  # a stand-in for a comparison that never ends
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and 0.4 <= elapsed <= 0.5 + SLACK_S, (outcome, elapsed)
    assert {w.proc.pid for w in pool._workers} == before  # interrupted by the worker's own alarm, not killed
    assert verify_answer("x = 3", "3")


def test_work_stuck_in_c_is_killed_and_the_pool_recovers():
    pool = rewards._get_pool()
    before = {w.proc.pid for w in pool._workers}
    start = time.monotonic()
    # Work that never lets the worker's alarm handler run (as C code that does not check for signals would):
    # block SIGALRM, then sleep.
    stuck = "(__import__('signal').pthread_sigmask(0, {14}), __import__('time').sleep(60))"
    assert signal.SIG_BLOCK == 0 and signal.SIGALRM == 14
    outcome = pool.call(eval, (stuck,), 0.5)
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and 0.5 <= elapsed <= 0.5 + SLACK_S, (outcome, elapsed)
    killed = before - {w.proc.pid for w in pool._workers}
    assert len(killed) == 1
    assert verify_answer("x = 3", "3", timeout_s=30)  # the other worker still serves (this is not the fast path)
    deadline = time.monotonic() + 30
    pid = killed.pop()
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the timed-out worker is still running"
    rewards.start_workers()  # wait for the replacement: the tests below assume a full pool
    assert len(pool._ready) == pool.size


def test_real_hang_times_out_at_default_deadline():
    start = time.monotonic()
    r = score("\\boxed{9^{9^{9^{9}}}}", "1")
    elapsed = time.monotonic() - start
    assert r.timed_out and r.reward == -1.0 and r.parsed and r.status == "timeout"
    assert 2.0 - 0.1 <= elapsed <= 2.0 + SLACK_S  # the worker's alarm fires just before the deadline
    assert score("\\boxed{x=3}", "3").correct


def test_workers_that_cannot_start_fail_fast(monkeypatch):
    monkeypatch.setattr(rewards, "_WORKER_BOOT", "import sys; sys.exit(3)")  # as if math-verify were missing
    pool = rewards._WorkerPool(1)
    try:
        start = time.monotonic()
        outcome = pool.call(abs, (1,), 2.0)
        assert outcome.status == "error" and "did not start" in outcome.value
        assert time.monotonic() - start < 10  # not STARTUP_TIMEOUT_S
        assert pool.call(abs, (1,), 2.0).status == "error"  # no new process per sample
        assert not pool._workers
    finally:
        pool.close()


def test_worker_errors_are_incorrect_not_raised():
    outcome = rewards._get_pool().call(int, ("not a number",), 2.0)
    assert outcome.status == "error" and "ValueError" in outcome.value
    assert verify_answer("x = 3", "3")


def test_concurrent_callers_get_right_answers():
    cases = [("\\boxed{x=%d}" % i, str(i), True) for i in range(12)]
    cases += [("\\boxed{\\sqrt{%d}}" % i, str(i), False) for i in range(2, 14)]
    with ThreadPoolExecutor(max_workers=6) as ex:
        # A long deadline: this is about right answers under concurrency, not about time (6 callers share 2
        # workers, and the deadline includes waiting for one).
        results = list(ex.map(lambda c: score(c[0], c[1], timeout_s=30), cases))
    assert [r.correct for r in results] == [c[2] for c in cases]
    assert not any(r.timed_out for r in results)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_its_own_pool():
    parent_pids = {w.proc.pid for w in rewards._get_pool()._workers}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not use (or kill) the parent's workers
        try:
            rewards.NUM_WORKERS = 1
            ok = score("\\boxed{x=3}", "3").correct and rewards._get_pool().owner_pid == os.getpid()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert {w.proc.pid for w in rewards._get_pool()._workers} == parent_pids
    assert verify_answer("x = 3", "3")


# --------------------------------------------------------------------------------------------------------------
# The TRL reward function
# --------------------------------------------------------------------------------------------------------------

def test_math_reward_for_trl():
    reward = MathReward()
    assert reward.__name__ == "math_verify"  # what trl.trainer.utils.get_callable_name reads
    metrics = []
    completions = ["\\boxed{4}", "\\boxed{5}", "no answer", [{"role": "assistant", "content": "\\boxed{x=4}"}],
                   None]
    out = reward(prompts=["p"] * 5, completions=completions, answer=["4", "4", "4", "4", "4"],
                 completion_ids=[[1]] * 5, trainer_state=None, log_metric=lambda k, v: metrics.append((k, v)))
    assert out == [1.0, -1.0, -1.0, 1.0, -1.0]
    assert reward.pop_stats() == {"reward/num": 5, "reward/unparsed": 2, "reward/unparsed_frac": 0.4,
                                  "reward/timeouts": 0, "reward/errors": 0}
    assert reward.pop_stats()["reward/num"] == 0  # popped
    assert ("math_verify/unparsed_frac", 0.4) in metrics

    binary = MathReward(answer_format="answer_tag", reward_style="binary", answer_column="solution")
    assert binary(["p", "p"], ["<answer>7</answer>", "<answer>8</answer>"], solution=[7, 7]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="solution"):
        binary(["p"], ["<answer>7</answer>"], answer=["7"])


def test_math_reward_counts_timeouts():
    reward = MathReward(timeout_s=0.5)
    out = reward(["p", "p"], ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{1}"], answer=["1", "1"])
    assert out == [-1.0, 1.0]
    stats = reward.pop_stats()
    assert stats["reward/timeouts"] == 1 and stats["reward/unparsed"] == 0


def test_fast_path_overhead():
    """The common case (an integer or fraction answer) is decided in well under a millisecond."""
    text = "Step 1: ... so the answer is \\boxed{\\frac{3}{4}}."
    score(text, "0.75")
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        score(text, "0.75")
    per_call = (time.perf_counter() - start) / n
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per call"


def test_huge_inputs_are_linear():
    for text in ["\\boxed{" + "{" * 1_000_000, "\\boxed{" * 200_000, "a" * 1_000_000 + "\\boxed{1}",
                 "<answer>" + "x" * 1_000_000]:
        start = time.monotonic()
        r = score(text, "1")
        assert time.monotonic() - start < 0.5
        assert r.reward in (1.0, -1.0)
    start = time.monotonic()
    assert extract_answer("\\boxed{" + "{}" * 500_000 + "}", "boxed") == "{}" * 500_000
    assert time.monotonic() - start < 2.0


def test_thread_safety_of_counters():
    reward = MathReward()
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(50):
            reward(["p"] * 4, ["\\boxed{1}", "\\boxed{2}", "x", "\\boxed{1"], answer=["1"] * 4)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = reward.pop_stats()
    assert stats["reward/num"] == 800 and stats["reward/unparsed"] == 400
