"""Atomic, durable writes: what every file and directory the project publishes goes through (and the one JSONL
reader, :func:`read_jsonl`).

A reader (a resume, an analysis command, another process) sees the old version or the new one, never a torn one:
files are written to a temporary name in the same directory, flushed and ``fsync``ed, then renamed over the target;
directories are filled under a hidden temporary name, then renamed into place (an existing one is first moved aside:
between the two renames the name is briefly absent, but it never points at a half-written directory); the parent
directory is ``fsync``ed after each rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (checkpoints record it; loading checks it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Make a file's content durable."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike, error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSONL file; a line that is not JSON raises ``error``
    naming ``path:line``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON: {e}") from None


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp_path)`` writes the content to a temporary file next to ``path``; it is fsynced and renamed over
    ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 1, default: Any = None) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, default=default, ensure_ascii=False) + "\n")


@contextmanager
def publish_dir(final: str | os.PathLike) -> Iterator[Path]:
    """``with publish_dir(out) as tmp:`` fill ``tmp``; on a clean exit it is fsynced and renamed to ``out`` (an existing
    directory is moved aside first, then removed: ``out`` is never half-written). On an exception the temporary directory is removed and ``out`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by a killed process with the same pid (containers reuse pids across restarts)
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the filled directory ``tmp`` in the place of ``final`` (same filesystem): its files are fsynced, an
    existing ``final`` is renamed aside to ``.NAME.old-PID``, ``tmp`` is renamed to ``final``, then the old one is
    removed. Two renames, not one: rename(2) cannot replace a non-empty directory, and the exchange that could
    (renameat2 RENAME_EXCHANGE) is Linux-only and not in Python's os. A crash between them leaves ``final`` absent and
    both complete versions under their hidden names, never a half-written ``final``."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final
