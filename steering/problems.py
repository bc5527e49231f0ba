"""Problems: the math questions and ground-truth answers that training, validation and evaluation read.

Every source becomes a list of problems, ``{"id": int, "question": str, "answer": str}``, where ``answer`` is the
ground truth as math-verify should read it and ``id`` is the row's index in its source. A source is one of:

- a **known dataset** (:data:`DATASETS`): ``deepscaler``, ``gsm8k``, ``math`` (training sets) and the evaluation
  benchmarks ``aime24``, ``aime25``, ``amc23``, ``math500``, ``minerva``, ``olympiadbench`` (plus ``gsm8k`` and
  ``math``, whose test splits are benchmarks too); ``six`` (:data:`SUITES`) names the papers' six benchmarks. They
  are read from the Hugging Face Hub with ``datasets.load_dataset`` (network once, then its cache);
- any other **Hub dataset id** (training only), with ``question`` / ``answer`` columns unless told otherwise;
- a **local file**: ``file:PATH`` or just ``PATH`` ending in ``.json``, ``.jsonl`` or ``.parquet`` (see
  :func:`read_file` for the shapes it accepts);
- a **procedural task**: ``procedural:TASK[:N][:key=value...]`` with ``TASK`` in :data:`steering.tasks.TASKS` and
  ``N`` problems. Keys: ``seed``, ``part`` (``heldout``, ``train`` or ``all``), ``offset`` (skip the first rows),
  ``digits``, ``ops`` (e.g. ``ops=+-*``); any other key is passed to the task as a string (``dataset=...`` for
  ``reasoning_gym``). What is not given comes from the use: training draws ``procedural_size`` rows from every
  partition with the run's seed; evaluation draws 100 held-out rows with seed 0, so its questions are new to the RL
  run and to the demo base. The test split of ``split_tasks(name, n_train, n_val, n_test, seed)`` is
  ``procedural:NAME:n_test:seed=S:offset=n_val``, its validation split ``procedural:NAME:n_val:seed=S``.

The ground truth is read from the answer column by an **answer parser** (:data:`ANSWER_PARSERS`): ``plain`` (the
value as it is), ``gsm8k`` (the text after the last ``####``, without thousands separators), ``boxed`` (the last
``\\boxed{}`` of a solution, found by the reward's own extractor, :func:`steering.rewards.extract_answer`) or
``auto`` (``gsm8k`` when the text holds ``####``, else ``boxed`` when it holds a box, else ``plain``; what local
evaluation files use).

A row with no question, a missing or unreadable answer, or that is not an object is a *bad row*. Training skips bad
rows and counts them (a few lost rows do not matter); an evaluation benchmark refuses them (its score must be over all
of its problems). A missing column, a missing or unreadable file and an unknown name are :class:`DataError`, raised
before any model loads, with a message that says what to fix.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Problem = dict[str, Any]


class DataError(ValueError):
    """A data source that is unknown, malformed, or cannot be read: the message says what to fix."""


# --------------------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class KnownDataset:
    """Where a known dataset lives on the Hub and how its rows map to problems."""

    name: str
    hub_id: str
    configs: tuple[str | None, ...]  # concatenated in this order (aime25 has two)
    question_column: str
    answer_column: str
    answer_parser: str
    test_split: str | None  # the split evaluated as a benchmark; None: a training set only
    default_samples: int  # samples per problem at T > 0 (the papers' avg@32 for AIME / AMC)
    description: str
    # How the column names were checked (no Hub access where this was written): see docs/evaluation.md.
    verified: str


_SEEN = "the Sinii et al. evaluation loader (get_ds), seen in public code search"
_PUBLIC = "several public loaders (code search)"
DATASETS: dict[str, KnownDataset] = {d.name: d for d in [
    KnownDataset("aime24", "Maxwell-Jia/AIME_2024", (None,), "Problem", "Answer", "plain", "train", 32,
                 "AIME 2024 I+II, 30 problems", _SEEN),
    KnownDataset("aime25", "opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "question", "answer", "plain",
                 "test", 32, "AIME 2025 I+II, 30 problems (two configs concatenated)", _SEEN),
    KnownDataset("amc23", "knoveleng/AMC-23", (None,), "problem", "answer", "plain", "train", 32,
                 "AMC 2023, 40 problems", _SEEN),
    KnownDataset("math500", "HuggingFaceH4/MATH-500", (None,), "problem", "answer", "plain", "test", 1,
                 "MATH-500, 500 problems", _SEEN),
    KnownDataset("minerva", "knoveleng/Minerva-Math", (None,), "problem", "solution", "boxed", "train", 1,
                 "Minerva-Math, 272 problems (answer = last \\boxed of the solution)", _SEEN),
    KnownDataset("olympiadbench", "knoveleng/OlympiadBench", (None,), "question", "answer", "plain", "train", 1,
                 "OlympiadBench (English, text-only, 675 problems)", _SEEN),
    KnownDataset("gsm8k", "openai/gsm8k", ("main",), "question", "answer", "gsm8k", "test", 1,
                 "GSM8K (test: 1319 problems; answer after '#### ')", _PUBLIC),
    KnownDataset("math", "DigitalLearningGmbH/MATH-lighteval", ("default",), "problem", "solution", "boxed", "test", 1,
                 "MATH (test: 5000 problems; answer = last \\boxed of the solution)", _PUBLIC),
    KnownDataset("deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", (None,), "problem", "answer", "plain", None,
                 1, "DeepScaleR-Preview training set, 40k problems", _PUBLIC),
]}
BENCHMARKS: dict[str, KnownDataset] = {name: d for name, d in DATASETS.items() if d.test_split is not None}
SUITES: dict[str, tuple[str, ...]] = {
    "six": ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"),
}

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
# The keys a local evaluation file may use, in the order they are looked for.
QUESTION_KEYS = ("question", "problem", "Question", "Problem", "prompt", "query")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "ground_truth", "expected_answer", "solution")
# The keys of a JSON object that may hold the list of records (``{"data": [...]}``).
RECORD_LIST_KEYS = ("data", "rows", "examples", "problems", "test", "train")
PROCEDURAL = "procedural:"
EVAL_PROCEDURAL_N = 100

_LABEL_RE = re.compile(r"^([A-Za-z][\w.\-]*)=(.+)$")
_HAS_BOX = re.compile(r"\\(?:boxed|fbox)")


# --------------------------------------------------------------------------------------------------------------------
# Answers

ANSWER_PARSERS = ("plain", "gsm8k", "boxed", "auto")


def _to_str(value: Any) -> str:
    """A dataset value as text: ``27.0`` -> ``"27"``, ``["x"]`` -> ``"x"`` (Parquet lists), else ``str``, stripped."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _to_str(value[0])
    return str(value).strip()


def check_answer_parser(parser: str) -> str:
    if parser not in ANSWER_PARSERS:
        raise DataError(f"answer_parser: {parser!r} is not one of {list(ANSWER_PARSERS)}")
    return parser


def parse_answer(raw: Any, parser: str = "auto") -> str | None:
    """The ground truth in ``raw`` read with ``parser`` (see the module docstring), or None if it cannot be read."""
    from steering.rewards import extract_answer

    check_answer_parser(parser)
    if raw is None:
        return None
    text = _to_str(raw)
    if parser == "auto":
        parser = "gsm8k" if "####" in text else "boxed" if _HAS_BOX.search(text) else "plain"
    if parser == "gsm8k":
        if "####" not in text:
            return None
        answer = text.rsplit("####", 1)[1].replace(",", "").strip()
    elif parser == "boxed":
        answer = extract_answer(text, "boxed")
    else:
        answer = text
    return answer if answer and answer.strip() else None


# --------------------------------------------------------------------------------------------------------------------
# Reading records: local files and the Hub


def is_file_source(source: str) -> bool:
    return source.startswith("file:") or Path(source).suffix.lower() in FILE_SUFFIXES


def file_path(source: str) -> Path:
    return Path(source[len("file:"):] if source.startswith("file:") else source)


def read_file(path: str | Path, where: str | None = None) -> list[Any]:
    """The records of a local file: JSONL (one object a line), JSON (a list of objects, or an object holding one
    such list under a key of :data:`RECORD_LIST_KEYS`) or Parquet. Records are returned as read; the caller decides
    what a record that is not an object means. ``where`` names the source in error messages."""
    path = Path(path)
    where = where or str(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{where}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet")
    if not path.is_file():
        raise DataError(f"{where}: file {str(path)!r} does not exist")
    try:
        if suffix == ".parquet":
            records = _read_parquet(path, where)
        elif suffix == ".jsonl":
            records = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{where}: line {lineno} is not valid JSON ({e.msg})") from None
        else:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
            records = _record_list(data, where)
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{where}: cannot read ({e.strerror or e})") from None
    if not records:
        raise DataError(f"{where}: holds no rows")
    return records


def _read_parquet(path: Path, where: str) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types on corrupt files
        raise DataError(f"{where}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _record_list(data: Any, where: str) -> list[Any]:
    if isinstance(data, dict):
        lists = [k for k in RECORD_LIST_KEYS if isinstance(data.get(k), list)]
        if len(lists) != 1:
            raise DataError(f"{where}: expected a JSON list of objects, or an object with exactly one list under "
                            f"one of {list(RECORD_LIST_KEYS)}" + (f" (it has {lists})" if lists else ""))
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{where}: expected a JSON list of objects")
    return data


def read_hub(hub_id: str, configs: Sequence[str | None], split: str, name: str | None = None) -> list[dict[str, Any]]:
    """The rows of a Hub dataset, its configs concatenated, via ``datasets.load_dataset`` (fails offline unless
    cached). ``name`` is the registry name shown in errors."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("loading Hub datasets needs the 'datasets' package: pip install datasets") from None
    rows: list[dict[str, Any]] = []
    for config in configs:
        where = hub_id + (f" ({config})" if config else "")
        try:
            ds = load_dataset(hub_id, config, split=split)
        except Exception as e:  # offline, gated, renamed, bad split...: one clear line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            label = where if name in (None, hub_id) else f"{name} = {where}"
            raise DataError(
                f"could not load {label} split {split!r} from the Hugging Face Hub ({type(e).__name__}: "
                f"{msg[:200]}). Offline? Load it once with network access (it is then cached), or export it to "
                "JSONL and give its path") from None
        rows.extend(dict(r) for r in ds)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Records -> problems


def record_keys(records: Iterable[Any]) -> list[str]:
    """Every key any record has, in the order they first appear."""
    return list(dict.fromkeys(k for r in records if isinstance(r, dict) for k in r))


def find_key(keys: Sequence[str], given: str | None, candidates: Sequence[str], what: str, where: str,
             fix: str) -> str:
    """The record key holding the ``what`` (question / answer): ``given`` if set, else the first of ``candidates``
    that a record has. ``fix`` tells the user how to name it."""
    if given is not None:
        if given in keys:
            return given
        raise DataError(f"{where}: no {what} key {given!r} in any row (the rows have keys {list(keys)}); {fix}")
    for key in candidates:
        if key in keys:
            return key
    tried = f"tried {list(candidates)}" if len(candidates) > 1 else f"looked for {candidates[0]!r}"
    raise DataError(f"{where}: cannot find the {what} key ({tried}); the rows have keys {list(keys)}; {fix}")


class _BadRow(Exception):
    """Why one record is not a problem."""


def _to_problem(index: int, record: Any, question_key: str, answer_key: str, parser: str) -> Problem:
    if not isinstance(record, dict):
        raise _BadRow("is not a JSON object")
    for key in (question_key, answer_key):
        if key not in record:
            raise _BadRow(f"has no key {key!r}")
    question, raw = record[question_key], record[answer_key]
    if not isinstance(question, str) or not question.strip():
        raise _BadRow("has an empty question" if question is None or isinstance(question, str)
                      else f"has a question that is not text ({type(question).__name__})")
    if raw is None or _to_str(raw) == "":
        raise _BadRow("has an empty answer")
    answer = parse_answer(raw, parser)
    if answer is None:
        raise _BadRow(f"has an answer the {parser!r} answer parser cannot read ({str(raw)[-80:]!r})")
    return {"id": index, "question": question.strip(), "answer": answer}


def to_problems(records: Sequence[Any], question_key: str, answer_key: str, parser: str, where: str, *,
                skip_bad: bool, limit: int | None = None) -> tuple[list[Problem], int]:
    """``(problems, number of bad rows skipped)``. With ``skip_bad`` a bad row is counted and skipped, otherwise it
    is a :class:`DataError` naming the row. ``limit`` stops after that many problems."""
    check_answer_parser(parser)
    problems: list[Problem] = []
    skipped = 0
    for i, record in enumerate(records):
        try:
            problems.append(_to_problem(i, record, question_key, answer_key, parser))
        except _BadRow as why:
            if not skip_bad:
                raise DataError(f"{where}: row {i} {why}") from None
            skipped += 1
            continue
        if limit is not None and len(problems) >= limit:
            break
    return problems, skipped


# --------------------------------------------------------------------------------------------------------------------
# Procedural tasks


@dataclass(frozen=True)
class ProceduralSpec:
    """``procedural:TASK[:N][:key=value...]``; what is not given is None (the use fills it in)."""

    task: str
    n: int | None = None
    seed: int | None = None
    part: str | None = None
    offset: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # passed to the task (digits, ops, dataset, ...)


def parse_procedural(source: str) -> ProceduralSpec:
    """Parse a ``procedural:...`` source (see the module docstring); no rows are made."""
    from steering.tasks import TASKS

    body = source[len(PROCEDURAL):] if source.startswith(PROCEDURAL) else source
    task, *parts = body.split(":")
    if task not in TASKS:
        raise DataError(f"unknown procedural task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    n = seed = part = None
    offset = 0
    options: dict[str, Any] = {}
    for i, p in enumerate(parts):
        if "=" not in p:
            if i != 0:
                raise DataError(f"procedural:{body}: expected key=value after the count, got {p!r}")
            n = _int(p, f"procedural:{body}: the number of problems")
            if n < 1:
                raise DataError(f"procedural:{body}: the number of problems must be >= 1, got {n}")
            continue
        key, value = p.split("=", 1)
        if key == "seed":
            seed = _int(value, f"procedural:{body}: seed")
        elif key == "offset":
            offset = _int(value, f"procedural:{body}: offset")
            if offset < 0:
                raise DataError(f"procedural:{body}: offset must be >= 0")
        elif key == "part":
            if value not in ("heldout", "train", "all"):
                raise DataError(f"procedural:{body}: part must be heldout, train or all, got {value!r}")
            part = value
        elif key == "digits":
            options[key] = _int(value, f"procedural:{body}: digits")
        elif key == "ops":
            options[key] = tuple(value)
        else:
            options[key] = value
    return ProceduralSpec(task, n, seed, part, offset, options)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{what} must be an integer, got {text!r}") from None


def make_procedural(spec: ProceduralSpec, n: int, seed: int, part: str | None) -> list[Problem]:
    """``n`` problems of a procedural task after skipping ``spec.offset``; ``part`` None draws from every
    partition."""
    from steering.tasks import make_tasks

    try:
        rows = make_tasks(spec.task, n + spec.offset, seed, part=part, **spec.options)[spec.offset:]
    except (ValueError, TypeError, ImportError) as e:
        raise DataError(f"procedural:{spec.task}: {e}") from None
    return [{"id": i, "question": r["question"], "answer": str(r["answer"])} for i, r in enumerate(rows)]


# --------------------------------------------------------------------------------------------------------------------
# Training data


@dataclass
class Problems:
    rows: list[Problem]
    skipped: int
    source: str


def load_problems(
    source: str,
    *,
    split: str = "train",
    config: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    answer_parser: str | None = None,
    procedural_size: int = 5000,
    seed: int = 0,
    limit: int | None = None,
) -> Problems:
    """Training (or validation) problems from any source (see the module docstring); bad rows are skipped and
    counted. A procedural source without a count gives ``procedural_size`` rows (at most ``limit``) with ``seed``."""
    if source.startswith(PROCEDURAL):
        spec = parse_procedural(source)
        n = spec.n if spec.n is not None else procedural_size
        rows = make_procedural(spec, n if limit is None else min(limit, n), seed if spec.seed is None else spec.seed,
                               spec.part)
        return Problems(rows, 0, source)
    known = DATASETS.get(source)
    parser = check_answer_parser(answer_parser or (known.answer_parser if known else "plain"))
    where = f"dataset {source!r}"
    if known is not None:
        records = read_hub(known.hub_id, (config,) if config else known.configs, split, source)
    elif is_file_source(source):
        records = read_file(file_path(source), where)
    else:
        records = read_hub(source, (config,), split)
    keys = record_keys(records)
    fix = "set question_column / answer_column"
    q_key = find_key(keys, None, (question_column or (known.question_column if known else "question"),),
                     "question", where, fix)
    a_key = find_key(keys, None, (answer_column or (known.answer_column if known else "answer"),), "answer", where,
                     fix)
    rows, skipped = to_problems(records, q_key, a_key, parser, where, skip_bad=True, limit=limit)
    if skipped:
        logger.warning("dataset %s: skipped %d bad rows (empty question, or missing/unreadable answer)", source,
                       skipped)
    if not rows:
        raise DataError(f"{where}: no usable rows (skipped {skipped})")
    return Problems(rows, skipped, source)


def split_off_validation(problems: Problems, val_size: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, validation): ``val_size`` rows held out at random (fixed seed), never trained on."""
    import random

    rows = list(problems.rows)
    if val_size <= 0:
        return rows, []
    if val_size >= len(rows):
        raise DataError(f"val_size {val_size} leaves no training rows ({len(rows)} usable); lower val_size")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:val_size])
    return [r for i, r in enumerate(rows) if i not in val_idx], [rows[i] for i in sorted(val_idx)]


# --------------------------------------------------------------------------------------------------------------------
# Evaluation benchmarks


@dataclass
class Benchmark:
    """A loaded benchmark: ``problems`` are ``{"id", "question", "answer"}`` rows."""

    name: str
    spec: str
    source: str
    problems: list[Problem]
    default_samples: int = 1
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "source": self.source, "num_problems": len(self.problems),
                "default_samples": self.default_samples, **self.info}


def valid_names() -> str:
    return ", ".join([*BENCHMARKS, *SUITES])


def _usage_hint() -> str:
    return (f"valid benchmarks: {valid_names()}; or file:PATH (.json/.jsonl/.parquet); "
            "or procedural:TASK[:N][:key=value...]")


def split_label(spec: str) -> tuple[str | None, str]:
    """``"val=file:x.jsonl"`` -> ``("val", "file:x.jsonl")``; a spec without a label -> ``(None, spec)``."""
    m = _LABEL_RE.match(spec)
    if m and not Path(spec).exists():
        return m.group(1), m.group(2)
    return None, spec


def expand_specs(items: list[str] | tuple[str, ...] | str) -> list[str]:
    """Split comma-separated lists, expand suites (``six``), drop empties; keeps order."""
    if isinstance(items, str):
        items = [items]
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part:
                out.extend(SUITES.get(part, (part,)))
    if not out:
        raise DataError(f"no benchmarks given; {_usage_hint()}")
    return out


def check_spec(spec: str) -> None:
    """Raise :class:`DataError` for a spec that cannot name a benchmark (no data is loaded)."""
    _, body = split_label(spec)
    if body in BENCHMARKS or body in SUITES:
        return
    if body.startswith(PROCEDURAL):
        parse_procedural(body)
        return
    if is_file_source(body):
        path = file_path(body)
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl or .parquet")
        if not path.is_file():
            raise DataError(f"benchmark file {str(path)!r} does not exist")
        return
    raise DataError(f"unknown benchmark {body!r}; {_usage_hint()}")


def _benchmark_name(spec: str) -> str:
    label, body = split_label(spec)
    if label:
        return label
    return body if body in BENCHMARKS or body.startswith(PROCEDURAL) else file_path(body).stem


def load_benchmark(spec: str, *, question_key: str | None = None, answer_key: str | None = None,
                   limit: int | None = None) -> Benchmark:
    """Resolve and load one benchmark spec (``[LABEL=]`` a name, file or procedural task; see the module
    docstring). ``limit`` keeps the first problems. ``question_key`` / ``answer_key`` name a local file's keys."""
    spec = spec.strip()
    _, body = split_label(spec)
    check_spec(body)
    name = _benchmark_name(spec)
    if body in BENCHMARKS:
        known = BENCHMARKS[body]
        records = read_hub(known.hub_id, known.configs, known.test_split, body)
        fix = "the registry entry in steering/problems.py needs updating"
        keys = record_keys(records)
        q_key = find_key(keys, None, (known.question_column,), "question", known.hub_id, fix)
        a_key = find_key(keys, None, (known.answer_column,), "answer", known.hub_id, fix)
        problems, _ = to_problems(records, q_key, a_key, known.answer_parser, known.hub_id, skip_bad=False)
        configs = "+".join(c for c in known.configs if c) or "default"
        bench = Benchmark(name, spec, f"hub:{known.hub_id}[{configs}]/{known.test_split}", problems,
                          known.default_samples, {"hub_id": known.hub_id, "configs": list(known.configs),
                                                  "split": known.test_split, "question_key": q_key,
                                                  "answer_key": a_key})
    elif body.startswith(PROCEDURAL):
        p = parse_procedural(body)
        n, seed, part = p.n or EVAL_PROCEDURAL_N, 0 if p.seed is None else p.seed, p.part or "heldout"
        options = {k: "".join(v) if k == "ops" else v for k, v in p.options.items()}
        bench = Benchmark(name, spec, body, make_procedural(p, n, seed, part), 1,
                          {"task": p.task, "n": n, "seed": seed, "part": part, "offset": p.offset, **options})
    else:
        path = file_path(body)
        records = read_file(path)
        keys = record_keys(records)
        q_key = find_key(keys, question_key, QUESTION_KEYS, "question", str(path), "pass --question-key")
        a_key = find_key(keys, answer_key, ANSWER_KEYS, "answer", str(path), "pass --answer-key")
        problems, _ = to_problems(records, q_key, a_key, "auto", str(path), skip_bad=False)
        bench = Benchmark(name, spec, f"file:{path.resolve()}", problems, 1, {"path": str(path.resolve())})
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        bench.problems = bench.problems[:limit]
        bench.info["limit"] = limit
    return bench


def load_benchmarks(items: list[str] | str, *, question_key: str | None = None, answer_key: str | None = None,
                    limit: int | None = None) -> list[Benchmark]:
    """Load every spec of ``items`` (comma lists and suites expanded). All specs are checked before any is loaded,
    and two benchmarks may not share a name."""
    specs = expand_specs(items)
    for spec in specs:
        check_spec(spec)
    names: dict[str, str] = {}
    for spec in specs:
        name = _benchmark_name(spec)
        if name in names:
            raise DataError(f"two benchmarks are named {name!r} ({names[name]!r} and {spec!r}); "
                            "label one with NAME=SPEC")
        names[name] = spec
    return [load_benchmark(s, question_key=question_key, answer_key=answer_key, limit=limit) for s in specs]
