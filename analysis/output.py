"""Where an analysis command's output goes: its ``--out`` directory (:func:`prepare_out`), result files written
atomically (:func:`write_json`), ``result.json`` with the one line a command prints when it is done (:func:`finish`),
and progress bars on stderr (:func:`progress`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from analysis.cli import UsageError


def prepare_out(path: str | os.PathLike) -> Path:
    """The ``--out`` directory, made if missing (a usage error if it is a file)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write a result file atomically (``steering.files``); numpy / torch scalars become floats."""
    from steering.files import write_json_atomic

    return write_json_atomic(path, data, indent=2, default=float)


def finish(out: Path, result: Mapping[str, Any], summary: str | None = None) -> int:
    """Write ``OUT/result.json``; print ``summary; wrote PATH`` (or just the path). The command's exit code, 0."""
    path = write_json(out / "result.json", result)
    print(f"{summary}; wrote {path}" if summary else path)
    return 0


def progress(iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
             quiet: bool = False, unit: str = "it"):
    """A tqdm bar on stderr; ``quiet`` (``--no-progress``): none."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet, file=sys.stderr, leave=False)
