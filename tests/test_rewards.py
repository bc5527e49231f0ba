"""Properties of the math reward (issue: rewards): the reward table, the fast path agreeing with math-verify, the
grading options, and a time bound that holds whatever the text, in the main thread, in worker threads and in
subprocesses. The grading corpus (tests/test_grader_corpus.py) checks the verdicts against math-verify at large."""

import inspect
import multiprocessing
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steering import rewards
from steering.rewards import GradingOptions, MathReward, RewardResult, extract_answer, score, verify_answer

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
    ("\\boxed{3} misses the end points so counting them gives \\boxed{5}", "5", "boxed", 1.0, True),  # the last box
    ("\\boxed{5} misses the end points so counting them gives \\boxed{3}", "5", "boxed", -1.0, True),  # wins
    # Boxes close together (or joined by and / or / a comma) are one answer, a set: math-verify's rule.
    ("first \\boxed{3} then \\boxed{5}", "5", "boxed", -1.0, True),
    ("\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}", "(2, 2), (6, 2)", "boxed", 1.0, True),
    ("\\boxed{1},\\boxed{2},\\boxed{3}", "\\{1,2,3\\}", "boxed", 1.0, True),
    ("\\boxed{k = 45} \\quad\\text{and}\\quad \\boxed{n = 2}", "k = 45, n = 2", "boxed", 1.0, True),
    # Newlines inside a box: read as math-verify reads them, never a stray number.
    ("\\[\n\\boxed{\n\\sqrt3\n}\n\\]", "$\\sqrt{3}$", "boxed", 1.0, True),
    ("\\boxed{\n4\\sqrt{2}\n}", "4", "boxed", -1.0, True),
    ("\\boxed{\\text{so } $x = 3$}", "3", "boxed", 1.0, True),  # "$" inside a box
    ("The total is \\boxed{1000}.", "1,000", "boxed", 1.0, True),  # a GSM8K ground truth
    ("\\boxed{5} and finally \\boxed{", "5", "boxed", -1.0, False),  # an unterminated last box
    ("\\boxed{}", "5", "boxed", -1.0, False),
    ("\\boxed{x = 3}", "3", "boxed", 1.0, True),  # math-verify, not the fast path
    ("<think>2+2</think> <answer>4</answer>", "4", "answer_tag", 1.0, True),
    ("<answer>3</answer> wait <answer>4</answer>", "4", "answer_tag", 1.0, True),
    ("<answer>4</answer> wait <answer>5", "4", "answer_tag", -1.0, False),
    ("<answer> \\frac{1}{2} </answer>", "0.5", "answer_tag", 1.0, True),
    ("<answer>\n\\sqrt3\n</answer>", "\\sqrt{3}", "answer_tag", 1.0, True),
    ("<answer>(1, 2), (3, 4)</answer>", "(3,4),(1,2)", "answer_tag", 1.0, True),
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
    """A number as a model or a dataset writes it: exact forms the fast path reads, and near misses it must leave to
    math-verify (decimals, leading zeros, a plus sign, spaces, trailing periods)."""
    num = draw(st.one_of(st.integers(-1000, 1000), st.integers(-10**20, 10**20)))
    den = draw(st.integers(1, 12))
    form = draw(st.sampled_from(["int", "thousands", "dec", "slash", "frac", "dfrac", "tfrac", "short_frac", "near"]))
    if form == "int":
        return str(num)
    if form == "thousands":
        return f"{num:,}"
    if form == "dec":
        return str(num / 8)  # exact in binary, so the decimal string is exact
    if form == "slash":
        return f"{num}/{den}"
    if form in ("frac", "dfrac", "tfrac"):
        cmd = {"frac": "\\frac", "dfrac": "\\dfrac", "tfrac": "\\tfrac"}[form]
        return f"-{cmd}{{{abs(num)}}}{{{den}}}" if num < 0 else f"{cmd}{{{num}}}{{{den}}}"
    if form == "short_frac":
        return f"\\frac{abs(num) % 10}{den % 9 + 1}"
    return draw(st.sampled_from([f"0{abs(num)}", f"+{num}", f"{num}.", f" {num} ", f"{num} ", f"{num}.0",
                                 f"{abs(num)},{abs(num) % 1000:02d}", "-0", f"{num}\\%", f"\u00a0{num}",
                                 str(abs(num)).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))]))


# Texts around the box: plain reasoning, and the things that change what math-verify reads.
CONTEXTS = ["Adding them up gives \\boxed{%s}.", "\\boxed{%s}", "$x = \\boxed{%s}$", "\\[\\boxed{%s}\\]",
            "The final answer is $7$. I hope it is correct. \\boxed{%s}", "\\boxed{%s}$ percent", "$\\boxed{%s}$%%",
            "\\boxed{7} and \\boxed{%s}", "\\fbox{7}, \\boxed{%s}", "\\boxed {%s}", "\\fbox{%s}",
            "\\boxed{%s} (not 9)", "<answer>%s</answer>"]


def _fast(text, gold):
    """The fast path's verdict on a completion (or the box an answer tag becomes), as the reward runs it."""
    if text.startswith("<answer>"):
        content = extract_answer(text, "answer_tag")
        text = f"\\boxed{{{content}}}"
    box = rewards._last_box(text)
    return None if box is None else rewards._fast_verdict(text, box, gold), text


@settings(max_examples=300, deadline=None, database=None)
@given(pred=numbers(), gold=numbers(), context=st.sampled_from(CONTEXTS),
       options=st.builds(GradingOptions, float_rounding=st.integers(0, 20), numeric_precision=st.integers(1, 30),
                         strict=st.booleans(), allow_set_relation_comp=st.booleans()))
def test_fast_path_agrees_with_math_verify(pred, gold, context, options):
    """Whenever the fast path decides, math-verify (run here, in-process, on the same text) decides the same."""
    fast, text = _fast(context % pred, gold)
    if fast is None:
        return
    assert fast == rewards._math_verify(text, gold, options)[0], (text, gold, options)


@settings(max_examples=60, deadline=None, database=None)
@given(a=st.integers(-10**6, 10**6), b=st.integers(1, 10**6))
def test_fast_path_decides_plain_numbers(a, b):
    value = Fraction(a, b)
    assert _fast(f"so \\boxed{{{a}/{b}}}.", f"\\frac{{{value.numerator}}}{{{value.denominator}}}"
                 if value.numerator >= 0 else f"-\\frac{{{-value.numerator}}}{{{value.denominator}}}")[0] is True
    assert _fast(f"so \\boxed{{{a:,}}}.", str(a + 1))[0] is False
    assert _fast(f"<answer>{a}</answer>", str(a))[0] is True


def test_fast_path_leaves_what_else_the_text_says_to_math_verify():
    for text in ["The final answer is $3$. I hope it is correct. \\boxed{5}", "$\\boxed{50}$ percent",
                 "\\boxed{3} \\boxed{5}", "\\fbox{3}, \\boxed{5}", "\\boxed {5}", "\\boxed{5.}", "\\boxed{1 000}"]:
        assert _fast(text, "5")[0] is None, text


# --------------------------------------------------------------------------------------------------------------
# Grading options
# --------------------------------------------------------------------------------------------------------------

def test_grading_options_default_to_math_verify_defaults():
    from math_verify import verify

    defaults = {name: p.default for name, p in inspect.signature(verify).parameters.items()}
    assert {name: defaults[name] for name in GradingOptions.__dataclass_fields__} == vars(GradingOptions())


def test_grading_options_change_verdicts():
    assert not score("\\boxed{0.3333}", "1/3").correct  # rounded to 6 places by default
    assert score("\\boxed{0.3333}", "1/3", options=GradingOptions(float_rounding=4)).correct
    assert not score("\\boxed{f(y)}", "f(x)").correct
    assert score("\\boxed{f(y)}", "f(x)", options=GradingOptions(strict=False)).correct
    assert not score("\\boxed{-2 \\le x \\le 7}", "x \\in [-2,7]").correct
    assert score("\\boxed{-2 \\le x \\le 7}", "x \\in [-2,7]",
                 options=GradingOptions(allow_set_relation_comp=True)).correct
    reward = MathReward(options=GradingOptions(float_rounding=4))
    assert reward(["p"], ["\\boxed{0.3333}"], answer=["1/3"]) == [1.0]


@pytest.mark.parametrize("bad", [{"float_rounding": -1}, {"float_rounding": "6"}, {"float_rounding": True},
                                 {"numeric_precision": 0}, {"strict": "yes"}, {"allow_set_relation_comp": 1}])
def test_bad_grading_options_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GradingOptions(**bad)


def test_options_must_be_grading_options():
    with pytest.raises(ValueError, match="GradingOptions"):
        score("\\boxed{1}", "1", options={"strict": False})
    with pytest.raises(ValueError, match="GradingOptions"):
        MathReward(options={"strict": False})


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

def test_real_hang_times_out_at_default_deadline():
    start = time.monotonic()
    r = score("\\boxed{9^{9^{9^{9}}}}", "1")
    elapsed = time.monotonic() - start
    assert r.timed_out and r.reward == -1.0 and r.parsed and r.status == "timeout"
    assert 2.0 - 0.1 <= elapsed <= 2.0 + SLACK_S  # the worker's alarm fires just before the deadline
    assert score("\\boxed{x=3}", "3").correct


def test_worker_errors_are_incorrect_not_raised(monkeypatch):
    def broken_pool():
        raise OSError("no processes left")

    monkeypatch.setattr(rewards, "_get_pool", broken_pool)
    r = score("\\boxed{x = 3}", "3")  # needs math-verify
    assert (r.reward, r.parsed, r.status) == (-1.0, True, "error")
    assert [r.status for r in rewards.score_batch(["\\boxed{x = 3}", "\\boxed{y = 3}", "\\boxed{3}"], ["3"] * 3)] \
        == ["error", "error", "fast"]


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
    assert metrics == []  # the counts reach the log once, through pop_stats

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
    """The common case (an integer or fraction answer and ground truth) is decided in well under a millisecond."""
    text = "Step 1: ... so the answer is \\boxed{\\frac{3}{4}}."
    assert score(text, "3/4").status == "fast"
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        score(text, "3/4")
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
