"""Training and validation problems: Hub datasets, local files, or procedurally generated tasks.

Every source becomes a list of ``{"question": str, "answer": str}`` rows. Rows with an empty question or a missing /
unreadable answer are skipped and counted, never fatal. Missing columns are a configuration error, raised before any
model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# name -> (Hub id, config, question column, answer column, answer parser)
KNOWN_DATASETS: dict[str, tuple[str, str | None, str, str, str]] = {
    "deepscaler": ("agentica-org/DeepScaleR-Preview-Dataset", None, "problem", "answer", "plain"),
    "gsm8k": ("openai/gsm8k", "main", "question", "answer", "gsm8k"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", "problem", "solution", "boxed"),
}
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ANSWER_PARSERS = ("plain", "gsm8k", "boxed")


class DataError(ValueError):
    """Bad data configuration (missing file or column): the message says what to fix."""


@dataclass
class Problems:
    rows: list[dict[str, str]]
    skipped: int
    source: str


def parse_answer(raw: Any, parser: str) -> str | None:
    """The ground-truth string of a row, or None if it can't be read."""
    if raw is None:
        return None
    text = str(raw).strip()
    if parser == "plain":
        return text or None
    if parser == "gsm8k":
        if "####" not in text:
            return None
        return text.rsplit("####", 1)[1].strip().replace(",", "") or None
    if parser == "boxed":
        from steering.rewards import extract_answer

        return extract_answer(text, "boxed")
    raise DataError(f"answer_parser: {parser!r} is not one of {list(ANSWER_PARSERS)}")


def _resolve(source: str, question_column: str | None, answer_column: str | None, answer_parser: str | None,
             config: str | None):
    if source in KNOWN_DATASETS:
        hub_id, cfg, q, a, p = KNOWN_DATASETS[source]
        return hub_id, config or cfg, question_column or q, answer_column or a, answer_parser or p
    return source, config, question_column or "question", answer_column or "answer", answer_parser or "plain"


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
    """Load problems from ``procedural:<task>``, a local .json/.jsonl/.parquet file, a known name or a Hub id."""
    if source.startswith("procedural:"):
        from steering.tasks import TASKS, make_tasks

        task = source.split(":", 1)[1]
        if task not in TASKS:
            raise DataError(f"dataset: procedural task {task!r} is unknown; known: {sorted(TASKS)}")
        rows = make_tasks(task, procedural_size if limit is None else min(limit, procedural_size), seed)
        return Problems([{"question": r["question"], "answer": str(r["answer"])} for r in rows], 0, source)

    name, cfg, q_col, a_col, parser = _resolve(source, question_column, answer_column, answer_parser, config)
    if parser not in ANSWER_PARSERS:
        raise DataError(f"answer_parser: {parser!r} is not one of {list(ANSWER_PARSERS)}")
    path = Path(name)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"dataset: file {name!r} does not exist")
        records = _read_local(path)
    else:
        records = _read_hub(name, cfg, split)
    if records:
        missing = [c for c in (q_col, a_col) if c not in records[0]]
        if missing:
            raise DataError(
                f"dataset {source!r}: column(s) {missing} not found (columns: {sorted(records[0])}); set "
                "question_column / answer_column")
    rows, skipped = [], 0
    for rec in records:
        question = rec.get(q_col)
        answer = parse_answer(rec.get(a_col), parser)
        if not isinstance(question, str) or not question.strip() or not answer:
            skipped += 1
            continue
        rows.append({"question": question.strip(), "answer": answer})
        if limit is not None and len(rows) >= limit:
            break
    if skipped:
        logger.warning("dataset %s: skipped %d bad rows (empty question, or missing/unreadable answer)", source, skipped)
    if not rows:
        raise DataError(f"dataset {source!r}: no usable rows (skipped {skipped})")
    return Problems(rows, skipped, source)


def _read_local(path: Path) -> list[dict[str, Any]]:
    import json

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"dataset: {path}:{i} is not valid JSON") from None
            out.append(rec if isinstance(rec, dict) else {})
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"dataset: {path} is not valid JSON ({e})") from None
    if isinstance(data, dict):  # {"data": [...]} or column-oriented
        for key in ("data", "rows", "train"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataError(f"dataset: {path} must hold a list of records (or a 'data' list)")
    return [r if isinstance(r, dict) else {} for r in data]


def _read_hub(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown id, bad split: say which and how to fix
        raise DataError(f"dataset {name!r} (config {config!r}, split {split!r}) could not be loaded: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return list(ds)


def split_off_validation(problems: Problems, val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
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


def to_prompt_dataset(rows: list[dict[str, str]], template, tokenizer):
    """A ``datasets.Dataset`` with the columns GRPOTrainer reads: ``prompt`` (rendered text) and ``answer``."""
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": template.render(r["question"], tokenizer), "answer": r["answer"], "question": r["question"]}
         for r in rows])
