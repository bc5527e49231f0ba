"""Procedural math tasks: determinism, correct answers, disjoint splits."""

import re

import pytest

from steering import tasks
from steering.tasks import TASKS, is_heldout, make_tasks, split_tasks

_ARITH = re.compile(r"^(?:What is|Compute|Calculate) (\d+) ([-+*]) (\d+)[?.]$")
_WORD_OPS = {
    "and buys": "+", "found": "+", "adds": "+",
    "gives away": "-", "lost": "-", "takes out": "-",
    "bags with": "*",
}


def recompute(question: str) -> int:
    """The answer, recomputed from the question text alone."""
    m = _ARITH.match(question)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    else:
        nums = [int(x) for x in re.findall(r"\d+", question)]
        assert len(nums) == 2, question
        ops = {op for key, op in _WORD_OPS.items() if key in question}
        assert len(ops) == 1, question
        (a, b), op = nums, ops.pop()
    return a + b if op == "+" else a - b if op == "-" else a * b


@pytest.mark.parametrize("name", ["arithmetic", "facts", "word", "mixed"])
def test_deterministic_and_seed_dependent(name):
    a = make_tasks(name, 50, seed=3)
    assert a == make_tasks(name, 50, seed=3)
    assert a != make_tasks(name, 50, seed=4)
    assert all(set(r) == {"question", "answer"} for r in a)
    assert all(isinstance(r["question"], str) and isinstance(r["answer"], str) for r in a)
    assert len({r["question"] for r in a}) == 50  # distinct


@pytest.mark.parametrize("name,kw", [
    ("arithmetic", {}),
    ("arithmetic", {"ops": ("+", "-", "*"), "digits": 3}),
    ("facts", {}),
    ("word", {}),
    ("word", {"ops": ("*", "-"), "digits": 1}),
    ("mixed", {"ops": ("+", "-", "*")}),
])
def test_answers_are_correct(name, kw):
    rows = make_tasks(name, 300, seed=0, **kw)
    for r in rows:
        assert r["answer"] == str(recompute(r["question"])), r
        assert re.fullmatch(r"-?\d+", r["answer"])
    if name == "word":
        assert all(int(r["answer"]) >= 0 for r in rows)


def test_ops_and_digits_are_respected():
    rows = make_tasks("arithmetic", 200, seed=1, ops=("*",), digits=1)
    for r in rows:
        m = _ARITH.match(r["question"])
        assert m and m.group(2) == "*" and int(m.group(1)) < 10 and int(m.group(3)) < 10
    two = make_tasks("arithmetic", 500, seed=1)
    assert {(_ARITH.match(r["question"]).group(2)) for r in two} == {"+", "-"}
    assert any(int(r["answer"]) < 0 for r in two)  # subtraction may go negative
    assert max(int(n) for r in two for n in re.findall(r"\d+", r["question"])) <= 99


def test_mixed_has_both_kinds():
    rows = make_tasks("mixed", 200, seed=0)
    n_arith = sum(bool(_ARITH.match(r["question"])) for r in rows)
    assert 60 < n_arith < 140


def test_splits_are_disjoint_and_deterministic():
    train, val, test = split_tasks("mixed", 2000, 200, 300, seed=7)
    assert (len(train), len(val), len(test)) == (2000, 200, 300)
    q_train, q_val, q_test = ({r["question"] for r in s} for s in (train, val, test))
    assert len(q_train) == 2000 and len(q_val) == 200 and len(q_test) == 300
    assert not q_train & q_val and not q_train & q_test and not q_val & q_test
    # Validation and test questions are held out (never used to pretrain the demo base); training ones are not.
    assert all(is_heldout(q) for q in q_val | q_test)
    assert not any(is_heldout(q) for q in q_train)
    assert split_tasks("mixed", 2000, 200, 300, seed=7) == (train, val, test)
    # Different seeds still never cross the train / held-out boundary.
    train2, _, test2 = split_tasks("mixed", 2000, 200, 300, seed=8)
    assert not {r["question"] for r in train2} & q_test
    assert not q_train & {r["question"] for r in test2}


def test_heldout_partition_is_about_ten_percent():
    rows = make_tasks("mixed", 4000, seed=0)
    frac = sum(is_heldout(r["question"]) for r in rows) / len(rows)
    assert 0.07 < frac < 0.13


def test_stream_is_deterministic_and_never_heldout():
    a = [next(it) for it in [tasks.stream("mixed", 0)] for _ in range(300)]
    it = tasks.stream("mixed", 0)
    assert a == [next(it) for _ in range(300)]
    assert not any(is_heldout(r["question"]) for r in a)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown task"):
        make_tasks("nope", 3, 0)
    with pytest.raises(ValueError, match="unsupported ops"):
        make_tasks("arithmetic", 3, 0, ops=("/",))
    with pytest.raises(ValueError, match="too small"):
        make_tasks("arithmetic", 500, 0, ops=("+",), digits=1)  # only 300 distinct questions exist


# reasoning-gym is an optional package (its own test is below); every other task is procedural.
PROCEDURAL_TASKS = sorted(set(TASKS) - {"reasoning_gym"})


@pytest.mark.parametrize("name", PROCEDURAL_TASKS)
def test_registry_every_task_is_a_problem_source_the_reward_grades(name):
    """What registering a task promises: ``procedural:NAME`` is a problem source, deterministic in its seed (another
    seed gives other problems), whose ground truths the reward grades correct when a completion boxes them and
    wrong when it boxes another number."""
    from steering import rewards
    from steering.problems import make_procedural, parse_procedural

    spec = parse_procedural(f"procedural:{name}:40")
    assert spec.task == name and spec.n == 40
    problems = make_procedural(spec, 40, seed=5, part="heldout")
    assert [p["id"] for p in problems] == list(range(40))
    assert problems == make_procedural(spec, 40, seed=5, part="heldout")
    assert problems != make_procedural(spec, 40, seed=6, part="heldout")
    assert all(is_heldout(p["question"]) for p in problems)
    answers = [p["answer"] for p in problems]
    right = rewards.score_batch([f"So the answer is \\boxed{{{a}}}." for a in answers], answers)
    wrong = rewards.score_batch([f"So the answer is \\boxed{{{int(a) + 1}}}." for a in answers], answers)
    assert all(r.correct and r.reward == 1.0 for r in right)
    assert not any(r.correct for r in wrong)


def test_reasoning_gym_missing_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "reasoning_gym" or name.startswith("reasoning_gym."):
            raise ImportError("No module named 'reasoning_gym'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install reasoning-gym"):
        make_tasks("reasoning_gym", 5, 0)


def test_facts_cover_the_single_digit_table():
    rows = make_tasks("facts", 900, seed=0)
    assert len({r["question"] for r in rows}) == 900
    pairs = {tuple(_ARITH.match(r["question"]).group(1, 2, 3)) for r in rows}
    assert len(pairs) == 300  # 10 x 10 x 3 ops, each in 3 phrasings
    with pytest.raises(ValueError, match="too small"):
        make_tasks("facts", 901, seed=0)
    held = make_tasks("facts", 500, seed=0, part="heldout", allow_fewer=True)
    assert 60 < len(held) < 130 and all(is_heldout(r["question"]) for r in held)


def test_equation_of():
    for r in make_tasks("mixed", 300, seed=2, ops=("+", "-", "*")) + make_tasks("facts", 100, seed=2):
        eq = tasks.equation_of(r["question"])
        a, op, b = eq.split()
        assert str(recompute(f"What is {a} {op} {b}?")) == r["answer"]
    assert tasks.equation_of("What is the capital of France?") is None
