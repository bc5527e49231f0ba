"""Evaluation benchmarks: the papers' Hub sets by name, local files, and the procedural tasks.

A benchmark spec (the items of ``--benchmarks``) is one of:

- a registry name (:data:`HUB_BENCHMARKS`): ``aime24``, ``aime25``, ``amc23``, ``math500``, ``minerva``,
  ``olympiadbench``, ``gsm8k``, ``math``; or ``six`` for the papers' six benchmarks. Loaded with
  ``datasets.load_dataset`` (needs the Hub or a warm cache);
- a local file: ``file:PATH`` or just ``PATH`` ending in ``.json``, ``.jsonl`` or ``.parquet``. The question and
  answer keys are found automatically (``question``/``problem``/``prompt`` and ``answer``/``final_answer``/
  ``solution``) or given with ``question_key`` / ``answer_key``. An answer holding ``\\boxed{}`` is reduced to the
  last boxed content, and a GSM8K-style answer to the part after ``####``;
- a procedural task: ``procedural:TASK[:N][:key=value...]`` with ``TASK`` in :data:`steering.tasks.TASKS` and ``N``
  problems (default 100). Keys: ``seed`` (default 0), ``part`` (``heldout`` by default, so the questions are new
  to the RL run and the demo base; or ``train`` / ``all``), ``offset`` (skip the first rows: the test split of
  ``split_tasks(name, n_train, n_val, n_test, seed)`` is ``procedural:NAME:n_test:seed=S:offset=n_val``, its
  validation split ``procedural:NAME:n_val:seed=S``), ``digits``, ``ops`` (e.g. ``ops=+-*``); any other key is
  passed to the task as a string (``dataset=...`` for ``reasoning_gym``).

Any spec may be prefixed with ``LABEL=`` to name it in the results (``val=file:data/val.jsonl``).

Every problem is ``{"id": int, "question": str, "answer": str}``, where ``answer`` is the ground truth as
math-verify should read it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Problem = dict[str, Any]


class BenchmarkError(ValueError):
    """A benchmark spec that is unknown, malformed, or whose data cannot be read: the message says what to fix."""


@dataclass(frozen=True)
class HubSpec:
    """Where a Hub benchmark lives and how its rows map to ``question`` / ``answer``."""

    name: str
    hub_id: str
    configs: tuple[str | None, ...]
    split: str
    question_key: str
    answer_key: str
    answer_transform: str  # "plain" | "last_boxed" | "gsm8k"
    default_samples: int
    description: str
    # How the column names were checked (no Hub access where this was written): see docs/evaluation.md.
    verified: str


_REF = "the Sinii et al. reference evaluation loader (get_ds), seen in public code search"
HUB_BENCHMARKS: dict[str, HubSpec] = {
    "aime24": HubSpec("aime24", "Maxwell-Jia/AIME_2024", (None,), "train", "Problem", "Answer", "plain", 32,
                      "AIME 2024 I+II, 30 problems", _REF),
    "aime25": HubSpec("aime25", "opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "test", "question", "answer",
                      "plain", 32, "AIME 2025 I+II, 30 problems (two configs concatenated)", _REF),
    "amc23": HubSpec("amc23", "knoveleng/AMC-23", (None,), "train", "problem", "answer", "plain", 32,
                     "AMC 2023, 40 problems", _REF),
    "math500": HubSpec("math500", "HuggingFaceH4/MATH-500", (None,), "test", "problem", "answer", "plain", 1,
                       "MATH-500, 500 problems", _REF),
    "minerva": HubSpec("minerva", "knoveleng/Minerva-Math", (None,), "train", "problem", "solution", "last_boxed", 1,
                       "Minerva-Math, 272 problems (answer = last \\boxed of the solution)", _REF),
    "olympiadbench": HubSpec("olympiadbench", "knoveleng/OlympiadBench", (None,), "train", "question", "answer",
                             "plain", 1, "OlympiadBench (English, text-only, 675 problems)", _REF),
    "gsm8k": HubSpec("gsm8k", "openai/gsm8k", ("main",), "test", "question", "answer", "gsm8k", 1,
                     "GSM8K test, 1319 problems (answer after '#### ')", "several public loaders (code search)"),
    "math": HubSpec("math", "DigitalLearningGmbH/MATH-lighteval", ("default",), "test", "problem", "solution",
                    "last_boxed", 1, "MATH test set, 5000 problems (answer = last \\boxed of the solution)",
                    "several public loaders (code search)"),
}

SUITES: dict[str, tuple[str, ...]] = {
    "six": ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"),
}

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
QUESTION_KEYS = ("question", "problem", "Question", "Problem", "prompt", "query")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "ground_truth", "expected_answer", "solution")
PROCEDURAL_DEFAULT_N = 100

_LABEL_RE = re.compile(r"^([A-Za-z][\w.\-]*)=(.+)$")


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
    return ", ".join([*HUB_BENCHMARKS, *SUITES])


def _usage_hint() -> str:
    return (f"valid benchmarks: {valid_names()}; or file:PATH (.json/.jsonl/.parquet); "
            "or procedural:TASK[:N][:key=value...]")


# --------------------------------------------------------------------------------------------------------------------
# Answers


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        # unbalanced: try an earlier one
    return None


def gsm8k_answer(text: str) -> str:
    """The GSM8K final answer: what follows the last ``####``, without thousands separators."""
    tail = text.rsplit("####", 1)[-1].strip()
    return tail.replace(",", "").strip()


def _to_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _to_str(value[0])
    return str(value).strip()


def normalize_answer(value: Any, transform: str = "auto") -> str:
    """Ground truth as a string: ``plain``, ``last_boxed`` (of a solution), ``gsm8k`` (after ``####``) or ``auto``."""
    text = _to_str(value)
    if transform == "auto":
        transform = "gsm8k" if "####" in text else "last_boxed" if re.search(r"\\(?:boxed|fbox)", text) else "plain"
    if transform == "gsm8k":
        return gsm8k_answer(text)
    if transform == "last_boxed":
        from steering.rewards import extract_answer  # the reward's own extraction, as train.data uses

        boxed = extract_answer(text, "boxed") or last_boxed(text)
        return boxed if boxed is not None else text
    if transform == "plain":
        return text
    raise ValueError(f"unknown answer transform {transform!r}")


# --------------------------------------------------------------------------------------------------------------------
# Parsing specs


def split_label(spec: str) -> tuple[str | None, str]:
    """``"val=file:x.jsonl"`` -> ``("val", "file:x.jsonl")``; a spec without a label -> ``(None, spec)``."""
    m = _LABEL_RE.match(spec)
    if m and not Path(spec).exists():
        return m.group(1), m.group(2)
    return None, spec


def expand_specs(items: list[str] | tuple[str, ...] | str) -> list[str]:
    """Split comma-separated lists, expand suites (``six``), drop empties; keeps order, refuses duplicates."""
    if isinstance(items, str):
        items = [items]
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if part in SUITES:
                out.extend(SUITES[part])
            else:
                out.append(part)
    if not out:
        raise BenchmarkError(f"no benchmarks given; {_usage_hint()}")
    return out


def _parse_procedural(body: str) -> tuple[str, int, dict[str, Any]]:
    from steering import tasks as st

    parts = body.split(":")
    task = parts[0]
    if task not in st.TASKS:
        raise BenchmarkError(f"unknown procedural task {task!r}; known tasks: {', '.join(sorted(st.TASKS))}")
    n = PROCEDURAL_DEFAULT_N
    opts: dict[str, Any] = {"seed": 0, "part": "heldout", "offset": 0}
    for i, p in enumerate(parts[1:]):
        if "=" not in p:
            if i != 0:
                raise BenchmarkError(f"procedural:{body}: expected key=value after the count, got {p!r}")
            try:
                n = int(p)
            except ValueError:
                raise BenchmarkError(
                    f"procedural:{body}: the number of problems must be an integer, got {p!r}") from None
            continue
        key, value = p.split("=", 1)
        if key in ("seed", "offset", "digits"):
            try:
                opts[key] = int(value)
            except ValueError:
                raise BenchmarkError(f"procedural:{body}: {key} must be an integer, got {value!r}") from None
        elif key == "ops":
            opts[key] = tuple(value)
        else:
            opts[key] = value
    if n < 1:
        raise BenchmarkError(f"procedural:{body}: the number of problems must be >= 1, got {n}")
    if opts["offset"] < 0:
        raise BenchmarkError(f"procedural:{body}: offset must be >= 0")
    if opts["part"] not in ("heldout", "train", "all"):
        raise BenchmarkError(f"procedural:{body}: part must be heldout, train or all, got {opts['part']!r}")
    return task, n, opts


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise BenchmarkError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict):
                lists = [v for k, v in data.items() if isinstance(v, list) and k in ("data", "rows", "examples",
                                                                                    "problems", "test", "train")]
                if len(lists) != 1:
                    raise BenchmarkError(f"{path}: expected a JSON list of objects (or an object with one 'data' "
                                         "list)")
                data = lists[0]
            if not isinstance(data, list):
                raise BenchmarkError(f"{path}: expected a JSON list of objects")
            rows = data
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq

                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow raises several types on corrupt files
                raise BenchmarkError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
        else:
            raise BenchmarkError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet")
    except UnicodeDecodeError:
        raise BenchmarkError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise BenchmarkError(f"{path}: holds no rows")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise BenchmarkError(f"{path}: row {bad[0]} is not a JSON object")
    return rows


def _pick_key(rows: list[dict[str, Any]], given: str | None, candidates: tuple[str, ...], what: str,
              where: str) -> str:
    columns = list(rows[0])
    if given is not None:
        if given not in rows[0]:
            raise BenchmarkError(f"{where}: no {what} key {given!r}; the rows have keys {columns}")
        return given
    for key in candidates:
        if key in rows[0]:
            return key
    raise BenchmarkError(f"{where}: cannot find the {what} key (tried {list(candidates)}); the rows have keys "
                         f"{columns}; pass --{what}-key")


def rows_to_problems(rows: list[dict[str, Any]], question_key: str, answer_key: str, transform: str,
                     where: str) -> list[Problem]:
    problems = []
    for i, row in enumerate(rows):
        if question_key not in row or answer_key not in row:
            missing = question_key if question_key not in row else answer_key
            raise BenchmarkError(f"{where}: row {i} has no key {missing!r}")
        q, a = row[question_key], row[answer_key]
        if q is None or str(q).strip() == "":
            raise BenchmarkError(f"{where}: row {i} has an empty question")
        if a is None or _to_str(a) == "":
            raise BenchmarkError(f"{where}: row {i} has an empty answer")
        problems.append({"id": i, "question": str(q), "answer": normalize_answer(a, transform)})
    return problems


def load_file(path: str | Path, *, question_key: str | None = None, answer_key: str | None = None,
              answer_transform: str = "auto") -> list[Problem]:
    """Problems from a local JSON / JSONL / Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {str(path)!r} does not exist")
    rows = _read_rows(path)
    qk = _pick_key(rows, question_key, QUESTION_KEYS, "question", str(path))
    ak = _pick_key(rows, answer_key, ANSWER_KEYS, "answer", str(path))
    return rows_to_problems(rows, qk, ak, answer_transform, str(path))


def load_hub(spec: HubSpec) -> list[Problem]:
    """Problems of a registry benchmark, via ``datasets.load_dataset`` (fails offline unless cached)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise BenchmarkError("loading Hub benchmarks needs the 'datasets' package: pip install datasets") from None
    rows: list[dict[str, Any]] = []
    for config in spec.configs:
        where = spec.hub_id + (f" ({config})" if config else "")
        try:
            ds = load_dataset(spec.hub_id, config, split=spec.split)
        except Exception as e:  # offline, gated, renamed...: one clear line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BenchmarkError(
                f"could not load {spec.name} = {where} split {spec.split!r} from the Hugging Face Hub "
                f"({type(e).__name__}: {msg[:200]}). Offline? Load it once with network access (it is then cached), "
                "or export it to JSONL and pass file:PATH"
            ) from None
        missing = [k for k in (spec.question_key, spec.answer_key) if k not in ds.column_names]
        if missing:
            raise BenchmarkError(f"{where}: columns {missing} not found (it has {ds.column_names}); the registry "
                                 "entry in analysis/benchmarks.py needs updating")
        rows.extend(dict(r) for r in ds)
    return rows_to_problems(rows, spec.question_key, spec.answer_key, spec.answer_transform, spec.hub_id)


def load_procedural(task: str, n: int, opts: dict[str, Any]) -> list[Problem]:
    from steering import tasks as st

    kw = dict(opts)
    seed, offset, part = kw.pop("seed"), kw.pop("offset"), kw.pop("part")
    try:
        rows = st.make_tasks(task, n + offset, seed, part=part, **kw)[offset:]
    except (ValueError, TypeError, ImportError) as e:
        raise BenchmarkError(f"procedural:{task}: {e}") from None
    return [{"id": i, "question": r["question"], "answer": str(r["answer"])} for i, r in enumerate(rows)]


def check_spec(spec: str) -> None:
    """Raise :class:`BenchmarkError` for a spec that cannot name a benchmark (no data is loaded)."""
    _, body = split_label(spec)
    if body in HUB_BENCHMARKS or body in SUITES:
        return
    if body.startswith("procedural:"):
        _parse_procedural(body[len("procedural:"):])
        return
    if body.startswith("file:"):
        path = Path(body[len("file:"):])
        if not path.is_file():
            raise BenchmarkError(f"benchmark file {str(path)!r} does not exist")
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise BenchmarkError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl or .parquet")
        return
    if Path(body).suffix.lower() in FILE_SUFFIXES:
        if not Path(body).is_file():
            raise BenchmarkError(f"benchmark file {body!r} does not exist")
        return
    raise BenchmarkError(f"unknown benchmark {body!r}; {_usage_hint()}")


def load_benchmark(spec: str, *, question_key: str | None = None, answer_key: str | None = None,
                   limit: int | None = None) -> Benchmark:
    """Resolve and load one benchmark spec (see the module docstring). ``limit`` keeps the first problems."""
    label, body = split_label(spec.strip())
    check_spec(body)
    if body in HUB_BENCHMARKS:
        hub = HUB_BENCHMARKS[body]
        configs = "+".join(c for c in hub.configs if c) or "default"
        bench = Benchmark(label or body, spec, f"hub:{hub.hub_id}[{configs}]/{hub.split}", load_hub(hub),
                          hub.default_samples, {"hub_id": hub.hub_id, "configs": list(hub.configs),
                                                "split": hub.split, "question_key": hub.question_key,
                                                "answer_key": hub.answer_key})
    elif body.startswith("procedural:"):
        task, n, opts = _parse_procedural(body[len("procedural:"):])
        bench = Benchmark(label or body, spec, body, load_procedural(task, n, opts), 1,
                          {"task": task, "n": n, **{k: (("".join(v)) if k == "ops" else v) for k, v in opts.items()}})
    else:
        path = Path(body[len("file:"):] if body.startswith("file:") else body)
        bench = Benchmark(label or path.stem, spec, f"file:{path.resolve()}",
                          load_file(path, question_key=question_key, answer_key=answer_key), 1,
                          {"path": str(path.resolve())})
    if limit is not None:
        if limit < 1:
            raise BenchmarkError(f"limit must be >= 1, got {limit}")
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
        label, body = split_label(spec)
        name = label or (body if (body in HUB_BENCHMARKS or body.startswith("procedural:")) else
                         Path(body[5:] if body.startswith("file:") else body).stem)
        if name in names:
            raise BenchmarkError(f"two benchmarks are named {name!r} ({names[name]!r} and {spec!r}); "
                                 "label one with NAME=SPEC")
        names[name] = spec
    return [load_benchmark(s, question_key=question_key, answer_key=answer_key, limit=limit) for s in specs]
