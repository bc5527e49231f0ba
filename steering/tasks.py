"""Procedurally generated math tasks, for offline training, validation and evaluation.

Every row is ``{"question": str, "answer": str}``; the answer is the canonical ground truth (``"68"``, ``"-3"``),
which math-verify parses as a number. Everything is deterministic in the seed (``random.Random`` seeded with a
string, so it does not depend on ``PYTHONHASHSEED``) and needs no network.

Tasks (``TASKS``, or :func:`make_tasks` by name):

- ``arithmetic``: ``What is 12 + 7?`` -- additions, subtractions (possibly negative results) and optionally
  multiplications of integers with up to ``digits`` digits.
- ``facts``: single-digit arithmetic facts (``What is 7 * 8?``), 900 distinct questions; the offline demo's base
  model (``train.demo_base``) is pretrained on them.
- ``word``: one-step word problems (``Tom has 12 apples and buys 7 more. How many apples does he have?``); results
  are never negative.
- ``mixed``: half ``arithmetic``, half ``word``.
- ``reasoning_gym``: any reasoning-gym dataset (optional: ``pip install reasoning-gym``).

**Held-out partition.** Every question falls, by a hash of its text alone (no seed), into the *held-out* part
(:func:`is_heldout`, 10% of all questions) or the rest. :func:`split_tasks` takes training questions from the rest
and validation / test questions from the held-out part only, so validation and test questions are new to the RL run
whatever seeds it used (and to a demo base built with ``pretrain_part="train"``; the committed one has seen every
``facts`` question).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

Row = dict[str, str]

HELDOUT_FRACTION = 0.1
OPS = ("+", "-", "*")

# --------------------------------------------------------------------------------------------------------------------
# Held-out partition


def question_hash(question: str) -> float:
    """A number in [0, 1) that depends only on the question's text (stable across runs, machines and seeds)."""
    digest = hashlib.sha256(question.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(question: str) -> bool:
    """Whether a question is in the held-out partition (validation / test questions; never used to pretrain)."""
    return question_hash(question) < HELDOUT_FRACTION


def _keep(part: str | None) -> Callable[[str], bool]:
    if part is None or part == "all":
        return lambda q: True
    if part == "heldout":
        return is_heldout
    if part == "train":
        return lambda q: not is_heldout(q)
    raise ValueError(f"part must be 'all', 'train' or 'heldout', got {part!r}")


# --------------------------------------------------------------------------------------------------------------------
# Row samplers: (rng, **kw) -> one row


def _check(ops: Iterable[str], digits: int) -> tuple[str, ...]:
    ops = tuple(ops)
    if not ops:
        raise ValueError("ops is empty; give at least one of '+', '-', '*'")
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"unsupported ops {bad}; supported: {list(OPS)}")
    if not isinstance(digits, int) or not 1 <= digits <= 6:
        raise ValueError(f"digits must be an integer in 1..6, got {digits!r}")
    return ops


def _compute(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


_ARITH_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.")


def sample_arithmetic(rng: random.Random, ops: Iterable[str] = ("+", "-"), digits: int = 2) -> Row:
    ops = _check(ops, digits)
    top = 10**digits - 1
    op = rng.choice(ops)
    a, b = rng.randint(0, top), rng.randint(0, top)
    template = rng.choice(_ARITH_TEMPLATES)
    return {"question": template.format(a=a, op=op, b=b), "answer": str(_compute(a, op, b))}


_NAMES = (("Tom", "he"), ("Sam", "he"), ("Ben", "he"), ("Max", "he"),
          ("Ann", "she"), ("Mia", "she"), ("Eva", "she"), ("Zoe", "she"))
_ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells", "stickers")
# (op, template). For '-', a >= b is enforced so that no answer is negative.
_WORD_TEMPLATES = (
    ("+", "{N} has {a} {x} and buys {b} more. How many {x} does {p} have?"),
    ("+", "{N} had {a} {x} and found {b} more. How many {x} does {p} have now?"),
    ("+", "A box has {a} {x}. {N} adds {b} {x}. How many {x} are in the box?"),
    ("-", "{N} has {a} {x} and gives away {b}. How many {x} does {p} have left?"),
    ("-", "{N} had {a} {x} and lost {b} of them. How many {x} are left?"),
    ("-", "A box has {a} {x}. {N} takes out {b}. How many {x} are in the box?"),
    ("*", "{N} buys {a} bags with {b} {x} in each. How many {x} does {p} have?"),
)


def sample_word(rng: random.Random, ops: Iterable[str] = ("+", "-"), digits: int = 2) -> Row:
    ops = _check(ops, digits)
    top = 10**digits - 1
    op = rng.choice(ops)
    template = rng.choice([t for o, t in _WORD_TEMPLATES if o == op])
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(1, top), rng.randint(1, top)
    if op == "-" and a < b:
        a, b = b, a
    question = template.format(N=name, p=pronoun, x=item, a=a, b=b)
    return {"question": question, "answer": str(_compute(a, op, b))}


_ARITH_RE = re.compile(r"^(?:What is|Compute|Calculate) (-?\d+) ([-+*]) (-?\d+)[?.]$")
_WORD_KEYS = (("bags with", "*"), ("and buys", "+"), ("found", "+"), ("adds", "+"), ("gives away", "-"),
              ("lost", "-"), ("takes out", "-"))


def equation_of(question: str) -> str | None:
    """The equation a question of the ``arithmetic`` / ``word`` tasks asks for (``"12 + 7"``), or None for a question
    these generators did not make. Used to write worked completions for the demo base."""
    m = _ARITH_RE.match(question.strip())
    if m:
        return f"{m.group(1)} {m.group(2)} {m.group(3)}"
    nums = re.findall(r"\d+", question)
    if len(nums) != 2:
        return None
    for key, op in _WORD_KEYS:
        if key in question:
            return f"{nums[0]} {op} {nums[1]}"
    return None


def sample_mixed(rng: random.Random, ops: Iterable[str] = ("+", "-"), digits: int = 2) -> Row:
    sampler = sample_arithmetic if rng.random() < 0.5 else sample_word
    return sampler(rng, ops=ops, digits=digits)


def sample_facts(rng: random.Random, ops: Iterable[str] = ("+", "-", "*")) -> Row:
    return sample_arithmetic(rng, ops=ops, digits=1)


SAMPLERS: dict[str, Callable[..., Row]] = {
    "arithmetic": sample_arithmetic,
    "facts": sample_facts,
    "word": sample_word,
    "mixed": sample_mixed,
}


def _rng(name: str, seed: int, stream: str = "") -> random.Random:
    return random.Random(f"steering.tasks:{name}:{int(seed)}:{stream}")


def _generate(name: str, n: int, seed: int, *, unique: bool = True, part: str | None = None,
              exclude: Iterable[str] = (), stream: str = "", allow_fewer: bool = False, **kw: Any) -> list[Row]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown procedural task {name!r}; known: {sorted(SAMPLERS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sampler = SAMPLERS[name]
    keep = _keep(part)
    rng = _rng(name, seed, stream)
    seen = set(exclude)
    rows: list[Row] = []
    misses, max_misses = 0, 2000 + 50 * n
    while len(rows) < n:
        row = sampler(rng, **kw)
        q = row["question"]
        if (unique and q in seen) or not keep(q):
            misses += 1
            if misses > max_misses:
                if allow_fewer:
                    return rows
                raise ValueError(
                    f"could only make {len(rows)} of {n} distinct {name!r} questions (part={part or 'all'}, {kw}): "
                    "the question space is too small; use more digits, more ops, or fewer rows (or allow_fewer=True)"
                )
            continue
        if unique:
            seen.add(q)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Public generators: (n, seed, **kw) -> rows


def arithmetic(n: int, seed: int = 0, ops: Iterable[str] = ("+", "-"), digits: int = 2, *, unique: bool = True,
               part: str | None = None, allow_fewer: bool = False) -> list[Row]:
    """``n`` arithmetic questions (``What is 12 + 7?``) with operands in ``0 .. 10**digits - 1``."""
    return _generate("arithmetic", n, seed, ops=tuple(ops), digits=digits, unique=unique, part=part,
                     allow_fewer=allow_fewer)


def word(n: int, seed: int = 0, ops: Iterable[str] = ("+", "-"), digits: int = 2, *, unique: bool = True,
         part: str | None = None, allow_fewer: bool = False) -> list[Row]:
    """``n`` one-step word problems with operands in ``1 .. 10**digits - 1`` and non-negative answers."""
    return _generate("word", n, seed, ops=tuple(ops), digits=digits, unique=unique, part=part,
                     allow_fewer=allow_fewer)


def mixed(n: int, seed: int = 0, ops: Iterable[str] = ("+", "-"), digits: int = 2, *, unique: bool = True,
          part: str | None = None, allow_fewer: bool = False) -> list[Row]:
    """Half arithmetic, half word problems (each row picks one at random)."""
    return _generate("mixed", n, seed, ops=tuple(ops), digits=digits, unique=unique, part=part,
                     allow_fewer=allow_fewer)


def reasoning_gym(n: int, seed: int = 0, dataset: str = "basic_arithmetic", *, unique: bool = True,
                  part: str | None = None, **kw: Any) -> list[Row]:
    """``n`` rows of a reasoning-gym dataset (``pip install reasoning-gym``), as ``{"question", "answer"}``.

    Note that reasoning-gym's own scoring may accept answers that math-verify does not (non-numeric answers)."""
    try:
        import reasoning_gym as rg
    except ImportError:
        raise ImportError(
            "the 'reasoning_gym' task needs the reasoning-gym package, which is not installed: "
            "pip install reasoning-gym  (or: pip install -e '.[gym]')"
        ) from None
    keep = _keep(part)
    size = max(n, 1)
    for _ in range(6):
        data = rg.create_dataset(dataset, size=size, seed=int(seed), **kw)
        rows, seen = [], set()
        for item in data:
            q, a = str(item["question"]), str(item["answer"])
            if (unique and q in seen) or not keep(q):
                continue
            seen.add(q)
            rows.append({"question": q, "answer": a})
            if len(rows) == n:
                return rows
        size *= 4
    raise ValueError(f"could only make {len(rows)} of {n} distinct reasoning-gym {dataset!r} questions (part={part})")


def facts(n: int, seed: int = 0, ops: Iterable[str] = ("+", "-", "*"), *, unique: bool = True,
          part: str | None = None, allow_fewer: bool = False) -> list[Row]:
    """``n`` single-digit arithmetic facts (``What is 7 * 8?``): 900 distinct questions in all. The offline demo's
    base model learned every one of them in pretraining, so RL on this task elicits knowledge it already has."""
    return _generate("arithmetic", n, seed, ops=tuple(ops), digits=1, unique=unique, part=part,
                     allow_fewer=allow_fewer)


TASKS: dict[str, Callable[..., list[Row]]] = {
    "arithmetic": arithmetic,
    "facts": facts,
    "word": word,
    "mixed": mixed,
    "reasoning_gym": reasoning_gym,
}


def make_tasks(name: str, n: int, seed: int = 0, **kw: Any) -> list[Row]:
    """``n`` rows of the task ``name`` (a key of ``TASKS``), deterministic in ``seed``; questions are distinct."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](n, seed, **kw)


def split_tasks(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0,
                **kw: Any) -> tuple[list[Row], list[Row], list[Row]]:
    """Disjoint ``(train, val, test)`` splits of the task ``name``.

    Training questions come from the non-held-out partition, validation and test questions from the held-out one
    (see :func:`is_heldout`), so no question is in two splits, and val / test questions were never used to pretrain
    the demo base. Deterministic in ``seed``."""
    kw.pop("part", None)
    train = make_tasks(name, n_train, seed, part="train", **kw)
    heldout = make_tasks(name, n_val + n_test, seed, part="heldout", **kw)
    val, test = heldout[:n_val], heldout[n_val:]
    return train, val, test


# --------------------------------------------------------------------------------------------------------------------
# Infinite stream for pretraining the demo base


def stream(name: str, seed: int = 0, *, part: str | None = "train", **kw: Any):
    """An endless, deterministic iterator of rows (with repeats) of a procedural task, from one partition."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown procedural task {name!r}; known: {sorted(SAMPLERS)}")
    sampler, keep, rng = SAMPLERS[name], _keep(part), _rng(name, seed, "stream")
    while True:
        row = sampler(rng, **kw)
        if keep(row["question"]):
            yield row
