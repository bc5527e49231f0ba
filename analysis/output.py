"""Where an analysis command's output goes: its ``--out`` directory, staged and swapped into place only when the
command is done (:func:`prepare_out`, :func:`complete`, :func:`discard_unfinished`), result files written atomically
(:func:`write_json`), ``result.json`` with the one line a command prints when it is done (:func:`finish`), and
progress bars on stderr (:func:`progress`).

Nothing a failed command does changes an existing output: :func:`prepare_out` returns a staging directory next to
``OUT`` (``.OUT.partial-PID``), the command writes everything there, and :func:`complete` (``finish`` calls it) puts
it in the place of ``OUT`` (``steering.files.replace_dir``). A command that raises (an error, a bug, Ctrl-C) leaves
``OUT`` as it was: ``python -m analysis`` removes the staging directory (:func:`discard_unfinished`). A process
killed outright (SIGKILL, a power cut) cannot clean up; the next :func:`prepare_out` of the same ``OUT`` removes what
it left, and puts back an ``OUT`` it had moved aside in the middle of the swap. Since the swap replaces ``OUT`` as a
whole, a complete ``OUT`` records what the command wrote (:data:`ENTRIES_FILE`), and a rerun into an ``OUT`` that
holds anything else (a nested command's output, a user's file) is refused.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.cli import UsageError

RESULT_FILES = ("result.json", "results.json")  # what makes a directory an analysis result (results.json: evaluate)
# In a complete OUT: the sorted top-level names the command wrote. A rerun into OUT replaces it as a whole, so it is
# refused when OUT holds anything else (a nested command's output, a user's file), which the swap would delete.
ENTRIES_FILE = ".out-entries.json"


@dataclass
class _Staging:
    final: Path  # OUT as the user named it: what is printed and recorded in the result files
    target: Path  # OUT's real location (symlinks resolved), where the swap happens
    names: tuple[str, ...] | None  # prepare_entries: the entries of OUT the command owns; None: the whole of OUT
    made: list[Path] = field(default_factory=list)  # missing parents made for the staging dir, deepest last
    done: bool = False
    kept: bool = False


_STAGING: dict[Path, _Staging] = {}  # this process's staging directories


def prepare_out(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The staging directory of the ``--out`` directory ``path``; :func:`complete` (or :func:`finish`) puts it in
    ``path``'s place. A usage error if ``path`` is a file, a non-empty directory that holds no analysis result (the
    swap would replace a user's own files), holds the working directory, holds one of the command's ``inputs``
    (which the new output would replace), or holds what the earlier result did not write (:func:`_check_entries`)."""
    final = Path(path)
    target = Path(os.path.realpath(final))
    # First what a killed process left (an OUT it had moved aside goes back), so the checks see the real OUT.
    _recover(target.parent, [target.name], target.name)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    if target.is_dir() and not any((target / name).is_file() for name in RESULT_FILES) and any(target.iterdir()):
        raise UsageError(f"--out {path}: holds files that are not an analysis result; choose a new or empty "
                         "directory")
    cwd = Path(os.path.realpath(os.getcwd()))
    if cwd == target or target in cwd.parents:
        raise UsageError(f"--out {path}: holds the working directory, which the new output would replace; choose "
                         "another directory")
    _check_inputs(path, [target], inputs)
    if target.is_dir() and any(target.iterdir()):
        _check_entries(path, target)
    return _stage(_Staging(final, target, None), target.parent, target.name)


def prepare_entries(path: str | os.PathLike, names: Sequence[str], *,
                    inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Like :func:`prepare_out` for a command that owns only the entries ``names`` of the directory ``path`` (select,
    whose output goes into a training run's directory): the staging directory is ``path/.NAMES[0].partial-PID``,
    and :func:`complete` swaps each of ``names`` into ``path`` (removing those this run did not write: an earlier
    run's, which the new result no longer describes); nothing else in ``path`` is touched."""
    final = Path(path)
    target = Path(os.path.realpath(final))
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    _check_inputs(path, [target / name for name in names], inputs)
    if target.is_dir():
        _recover(target, names, names[0])
    return _stage(_Staging(final, target, tuple(names)), target, names[0])


def complete(out: Path) -> Path:
    """Put the finished staging directory ``out`` in its place; returns ``OUT`` as the user named it."""
    from steering.files import fsync_file, replace_dir, write_json_atomic

    st = _STAGING[out]
    if st.names is None:
        write_json_atomic(out / ENTRIES_FILE, sorted(os.listdir(out)))
        replace_dir(out, st.target)
    else:
        for name in sorted(st.names, key=lambda n: not (out / n).is_dir()):  # the directories before the files
            new, dest = out / name, st.target / name
            if new.is_dir():
                replace_dir(new, dest)
            elif new.exists():
                fsync_file(new)
                os.replace(new, dest)
            elif dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif os.path.lexists(dest):
                dest.unlink()
        out.rmdir()  # an entry the command wrote but does not own is a bug: this fails on it
    st.done = True
    return st.final


def final(path: str | os.PathLike) -> Path:
    """Where ``path``, under a staging directory of this process, will be once the output is complete (any other
    path: itself). Printed paths and paths recorded in result files name this, never the staging directory."""
    p = Path(path)
    for staging, st in _STAGING.items():
        if p == staging or staging in p.parents:
            return st.final / p.relative_to(staging)
    return p


def keep(out: Path) -> Path:
    """Leave the unfinished staging directory ``out`` in place when the command fails (what it holds helps to see
    why); the next run into the same ``OUT`` removes it. Returns it."""
    _STAGING[out].kept = True
    return out


def discard_unfinished() -> None:
    """Remove this process's staging directories that were not completed (the command failed), and the parents made
    for them; forget the completed ones. ``python -m analysis`` calls it when a command ends, however it ends."""
    for staging, st in list(_STAGING.items()):
        if not st.done and not st.kept:
            shutil.rmtree(staging, ignore_errors=True)
            for made in reversed(st.made):
                try:
                    made.rmdir()
                except OSError:  # something else was put there meanwhile: not ours to remove
                    break
    _STAGING.clear()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write a result file atomically (``steering.files``); numpy / torch scalars become floats."""
    from steering.files import write_json_atomic

    return write_json_atomic(path, data, indent=2, default=float)


def finish(out: Path, result: Mapping[str, Any], summary: str | None = None) -> int:
    """Write ``result.json`` into the staging directory ``out``, :func:`complete` it; print ``summary; wrote PATH``
    (or just the path). Paths under ``out`` in ``result`` and ``summary`` name the final ``OUT``. Exit code 0."""
    write_json(out / "result.json", _final_paths(result, out))
    path = complete(out) / "result.json"
    print(f"{_final_paths(summary, out)}; wrote {path}" if summary else path)
    return 0


def progress(iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
             quiet: bool = False, unit: str = "it"):
    """A tqdm bar on stderr; ``quiet`` (``--no-progress``): none."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------------------------------------


def _check_inputs(path: str | os.PathLike, replaced: list[Path], inputs: Iterable[str | os.PathLike | None]) -> None:
    """A usage error if an input lies in what the new output replaces: it would be gone once the command is done."""
    for item in inputs:
        if item is None:
            continue
        real = Path(os.path.realpath(item))
        if any(real == r or r in real.parents for r in replaced):
            raise UsageError(f"--out {path}: holds {item}, which this command reads or refers to and the new output "
                             "would replace; choose another directory")


def _check_entries(path: str | os.PathLike, target: Path) -> None:
    """A usage error if the earlier result ``target`` holds what it did not write (its :data:`ENTRIES_FILE`), or,
    written before that file existed, holds another command's output or a run anywhere below it."""
    entries = target / ENTRIES_FILE
    if entries.is_file():
        try:
            written = json.loads(entries.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            written = None
        if not isinstance(written, list) or not all(isinstance(n, str) for n in written):
            raise UsageError(f"--out {path}: {ENTRIES_FILE} is not a list of names; move {path} aside or choose "
                             "another directory")
        foreign = sorted(set(os.listdir(target)) - set(written) - {ENTRIES_FILE})
        if foreign:
            raise UsageError(f"--out {path}: holds {', '.join(foreign)}, which the earlier result there did not "
                             "write (another command's output, or your files); move them or choose another directory")
        return
    from steering.vectors import META_FILE
    from train.checkpointing import CHECKPOINT_PREFIX, LATEST, RUN_RECORD

    # What marks a directory nested in an OUT written before ENTRIES_FILE existed as another command's output or a run.
    nested_markers = (*RESULT_FILES, META_FILE, RUN_RECORD, LATEST)
    for dirpath, dirnames, filenames in os.walk(target):
        here = Path(dirpath)
        found = [here / d for d in dirnames if d.startswith(CHECKPOINT_PREFIX)]
        if here != target:
            found += [here / f for f in filenames if f in nested_markers]
        if found:
            raise UsageError(f"--out {path}: holds {found[0]}, another command's output or a run, which the new "
                             "output would replace; move the nested output or choose another directory")


def _stage(st: _Staging, parent: Path, stem: str) -> Path:
    missing = [p for p in [parent, *parent.parents] if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    st.made = sorted(missing, key=lambda p: len(p.parts))
    staging = parent / f".{stem}.partial-{os.getpid()}"
    staging.mkdir()
    _STAGING[staging] = st
    return staging


def _recover(parent: Path, names: Sequence[str], stem: str) -> None:
    """Clean up after a process that was killed while writing into ``parent`` (no ``finally`` ran): an entry it had
    renamed aside for the swap (``.NAME.old-PID``) goes back if its place is empty, else it is removed (the swap had
    finished); then its staging directory (``.STEM.partial-PID``) is removed."""
    for name in names:
        for old in _leftovers(parent, name, "old"):
            if os.path.lexists(parent / name):
                _remove(old)
            else:
                os.replace(old, parent / name)
    for staging in _leftovers(parent, stem, "partial"):
        _remove(staging)


def _leftovers(parent: Path, name: str, kind: str) -> list[Path]:
    """``parent/.NAME.KIND-PID`` entries whose process is gone (or is this one, and the entry is not in use)."""
    found = []
    for p in parent.glob(f".{glob.escape(name)}.{kind}-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if p not in _STAGING and not (pid != os.getpid() and _alive(pid)):
            found.append(p)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _final_paths(value: Any, out: Path) -> Any:
    """``value`` with the staging directory ``out`` in every string replaced by the final ``OUT``."""
    if isinstance(value, str):
        return value.replace(str(out), str(_STAGING[out].final))
    if isinstance(value, Mapping):
        return {k: _final_paths(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_final_paths(v, out) for v in value]
    return value
