"""A training run's directory: the names in it, its metrics file, and its checkpoints (transformers' ``Trainer`` writes
them, this module makes them safe to resume from).

A run directory looks like::

    output_dir/
      checkpoint-40/        written by transformers' Trainer, the same for every adapter and launcher: the model
                            (steering: PEFT BEFT adapter + steering.json; LoRA: the adapter; full: the weights),
                            optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json (DeepSpeed: its own
                            global_step*/ shards), the tokenizer and training_args.bin; then, last of all,
        checksums.json      the sha256 and size of every file above, written once every process has finished its part
      latest                {"checkpoint": "checkpoint-40"}: written after checksums.json
      final/                the last model, written when training ends (a checkpoint's model files, no training state)
      run.json              {"metrics_file": ...}: written when training starts, so that readers find the metrics
      metrics.jsonl         one JSON object per logged step (the name is the config's ``metrics_file``)
      README.md             the model card (``train/model_card.py``), in the run directory and in each model directory
      stopped.json          {"exit_code": 3, "error": ..., "step": N, "last_good_checkpoint": ...}: written by
                            the rank that saw it when the run stopped with exit code 3 (diverged, or vLLM not serving
                            the trained model).
                            A resume would replay the same steps, so while it is there a resume or a new run in this
                            directory is refused (exit 2); ``--overwrite_output_dir true`` removes it with the run

This module owns these names: code elsewhere asks it for a run's paths (:func:`final_dir`, :func:`checkpoint_dir`,
:func:`metrics_path`) and reads the metrics through :func:`read_metrics`.

A checkpoint without ``checksums.json`` is incomplete (a save was interrupted, or is in progress): nothing resumes from
it, and no analysis command picks it. ``--resume_from_checkpoint latest`` reads the marker, checks every checksum of the
checkpoint it names (before any model loads), or stops with an error; it never starts a run from scratch. A reader of
the model alone (an analysis command's row) checks every file but the training state (:data:`TRAINING_STATE`), which
may be deleted to save disk once a run is done. Resuming reads the optimizer, scheduler and RNG state with
transformers' own loader, which uses ``torch.load(weights_only=True)`` (the restricted unpickler: tensors, numbers,
strings and containers, no code); ``training_args.bin`` is never read.
"""

from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from steering.files import fsync_dir, fsync_file, sha256_file, write_json_atomic
from steering.vectors import CheckpointError

LATEST = "latest"
FINAL = "final"
RUN_RECORD = "run.json"
STOPPED = "stopped.json"
CARD = "README.md"
MANIFEST = "checksums.json"
TRAINER_STATE = "trainer_state.json"
# transformers' Trainer names the checkpoint directories f"{PREFIX_CHECKPOINT_DIR}-{step}".
CHECKPOINT_PREFIX = f"{PREFIX_CHECKPOINT_DIR}-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# A checkpoint's training state: the names (glob patterns of an entry at its top level) that transformers' Trainer and
# DeepSpeed write beside the model and that only a resume reads. Users delete it to save disk once a run is done, so
# the readers of the model alone (the analysis commands' rows) verify every listed file but these; a resume verifies
# them all.
TRAINING_STATE = (
    "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", TRAINER_STATE, "training_args.bin",
    "global_step*",  # DeepSpeed's optimizer and model-state shards (a directory)
    "latest", "zero_to_fp32.py",  # DeepSpeed's name of its newest global_step* and its tool to consolidate them
)


# ------------------------------------------------------------------------------------------------------------- files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or tampered?): {e}") from None


def write_manifest(ckpt: Path) -> None:
    """Record the sha256 and size of every file of a checkpoint in ``checksums.json``: what marks it complete."""
    files = {}
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_file(f)  # durable before the manifest says it is there
        files[f.relative_to(ckpt).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    write_json_atomic(ckpt / MANIFEST, {"files": files})


def remove_manifest(ckpt: Path) -> None:
    """Mark a checkpoint incomplete before its directory is written again (a step redone after a resume)."""
    manifest = ckpt / MANIFEST
    if manifest.exists():
        manifest.unlink()
        fsync_dir(ckpt)


def is_complete(ckpt: Path) -> bool:
    """A checkpoint directory whose save finished (cheap: the manifest is there; :func:`verify_checkpoint` checks it)."""
    return ckpt.is_dir() and (ckpt / MANIFEST).is_file()


def verify_checkpoint(ckpt: Path) -> None:
    """Every file the manifest lists is there with its recorded size and sha256, and the trainer state and (for a
    steering checkpoint) the vectors read back; a missing manifest, a missing, truncated or changed file is a
    ``CheckpointError`` naming it. Nothing is unpickled and no model is touched."""
    from steering.vectors import ADAPTER_WEIGHTS_FILE, META_FILE, load_vectors

    files = verify_manifest(ckpt, "resume from an earlier checkpoint")
    required = [TRAINER_STATE] + [name for name in (META_FILE, ADAPTER_WEIGHTS_FILE) if (ckpt / name).is_file()]
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise CheckpointError(f"{ckpt / MANIFEST} does not list {unlisted[0]} (tampered with?); resume from an "
                              "earlier checkpoint")
    _read_json(ckpt / TRAINER_STATE)
    if (ckpt / META_FILE).is_file():
        load_vectors(ckpt)  # and its own checks: shapes, finite values


def is_training_state(rel: str) -> bool:
    """Whether a path in a checkpoint (relative, POSIX, as the manifest lists it) is training state
    (:data:`TRAINING_STATE`): read by a resume, never by a model load."""
    parts = PurePosixPath(rel).parts  # none for "" or "." (a tampered manifest): not training state, so it is checked
    return bool(parts) and any(fnmatchcase(parts[0], pattern) for pattern in TRAINING_STATE)


def verify_manifest(ckpt: Path, fix: str, *, training_state: bool = True) -> dict[str, Any]:
    """The files ``checksums.json`` lists (``{relative path: {sha256, bytes}}``), each checked to be there with its
    recorded size and sha256, otherwise a ``CheckpointError`` naming the file and ending in ``fix``. A resume checks
    them all; ``training_state=False`` (a reader of the model alone: the analysis commands' rows) skips the
    :data:`TRAINING_STATE` files, which may have been deleted or may differ without changing the model."""
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} does not exist")
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: it has no {MANIFEST} (written last, so its save "
                              "was interrupted or is still running)")
    manifest = _read_json(ckpt / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                              and isinstance(e.get("sha256"), str) for e in files.values()):
        raise CheckpointError(f"{ckpt / MANIFEST} is not a checksum manifest (tampered with?); {fix}")
    outside = [rel for rel in files if Path(rel).is_absolute() or ".." in Path(rel).parts]
    if outside:
        raise CheckpointError(f"{ckpt / MANIFEST} lists {outside[0]!r}, a path outside the checkpoint (tampered "
                              f"with?); {fix}")
    for rel, entry in files.items():
        if not training_state and is_training_state(rel):
            continue
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (listed in {MANIFEST})")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum in {MANIFEST}: the file was truncated or "
                                  f"tampered with; {fix}")
    return files


# -------------------------------------------------------------------------------------------------------- run dirs


def final_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run's last model goes when training ends (it may not exist yet)."""
    return Path(run_dir) / FINAL


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where transformers writes the checkpoint of ``step``."""
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The step of a ``checkpoint-<step>`` directory; a ``ValueError`` for any other name."""
    m = _CHECKPOINT_RE.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt} is not named {CHECKPOINT_PREFIX}<step>")
    return int(m.group(1))


def write_latest(run_dir: Path, ckpt: Path) -> None:
    write_json_atomic(run_dir / LATEST, {"checkpoint": ckpt.name})


def read_latest(run_dir: Path) -> Path | None:
    """The checkpoint the ``latest`` marker names (None if the run has no marker yet)."""
    marker = Path(run_dir) / LATEST
    if not marker.is_file():
        return None
    data = _read_json(marker)
    if not isinstance(data, dict):
        raise CheckpointError(f"{marker} must hold a JSON object naming a checkpoint, e.g. "
                              '{"checkpoint": "checkpoint-3"}; fix or delete it')
    name = data.get("checkpoint")
    if not isinstance(name, str) or not _CHECKPOINT_RE.match(name):
        raise CheckpointError(f"{marker} names {name!r}, which is not a checkpoint directory name")
    return Path(run_dir) / name


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<step>`` directory of a run directory, complete or not, by step."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), d) for d in run_dir.iterdir() if (m := _CHECKPOINT_RE.match(d.name)) and d.is_dir()] \
        if run_dir.is_dir() else []
    return [d for _, d in sorted(found)]


def holds_a_run(run_dir: str | os.PathLike) -> bool:
    """Whether a directory already holds a run's checkpoints (a `latest` marker or a complete checkpoint)."""
    return (Path(run_dir) / LATEST).is_file() or bool(run_checkpoints(run_dir))


def prepare_run_dir(run_dir: str | os.PathLike, *, overwrite: bool, metrics_file: str) -> None:
    """Before training (rank 0): remove the interrupted saves (``checkpoint-<step>`` without a manifest: never usable,
    and they would count towards transformers' ``save_total_limit`` rotation); with ``overwrite``, also another run's
    checkpoints, its ``latest`` marker, ``final/`` and its metrics file. Then records the metrics file's name in
    ``run.json`` (a resume records the name it appends to)."""
    import shutil

    run_dir = Path(run_dir)
    for d in checkpoint_dirs(run_dir):
        if overwrite or not is_complete(d):
            shutil.rmtree(d)
    if overwrite:
        for name in (LATEST, STOPPED, metrics_file):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(final_dir(run_dir), ignore_errors=True)
    write_run_record(run_dir, metrics_file=metrics_file)
    fsync_dir(run_dir)


def write_stopped(run_dir: str | os.PathLike, *, error: str, step: int, last_good: Path | None) -> None:
    """``stopped.json`` (atomically, by any rank that saw the stop): the run stopped with exit code 3 after ``step`` steps, for ``error``;
    ``last_good`` is the checkpoint ``latest`` names (None: none was saved)."""
    write_json_atomic(Path(run_dir) / STOPPED, {"exit_code": 3, "error": error, "step": step,
                                                "last_good_checkpoint": str(last_good) if last_good else None})


def check_not_stopped(run_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse (``CheckpointError``, exit 2) to resume or start a run in a directory whose run stopped with exit code 3:
    a resume replays the same steps (same data, random numbers and learning rate) and would stop the same way, so a
    restart loop would go round forever. ``overwrite`` (a new run that deletes this one) is allowed."""
    marker = Path(run_dir) / STOPPED
    if overwrite or not marker.exists():
        return
    data = _read_json(marker)
    if not isinstance(data, dict):
        raise CheckpointError(f"{marker} must hold a JSON object; delete it, or start over with --overwrite_output_dir "
                              "true")
    last_good = data.get("last_good_checkpoint")
    lower = "with a lower learning_rate or max_grad_norm"
    restart = (f"start a new run in another output_dir from its last good vectors (--init_from {last_good}) {lower}"
               if last_good else f"start a new run {lower}")
    raise CheckpointError(f"output_dir: {run_dir} holds a run that stopped with exit code {data.get('exit_code')} "
                          f"({data.get('error')}), which a resume would repeat; {restart}, or start over here with "
                          f"--overwrite_output_dir true (or, once the cause is fixed, delete {marker} and resume)")


def write_run_record(run_dir: str | os.PathLike, *, metrics_file: str) -> None:
    """``run.json``: what a reader of the run directory needs and cannot derive (the metrics file's name)."""
    write_json_atomic(Path(run_dir) / RUN_RECORD, {"metrics_file": metrics_file})


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run directory (``checkpoint-<step>`` with a manifest), by step."""
    return [d for d in checkpoint_dirs(run_dir) if is_complete(d)]


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """``latest`` → the checkpoint the marker names; a path → that path. Either is verified
    (:func:`verify_checkpoint`) before any model loads; anything that does not resolve to a complete checkpoint is a
    one-line ``CheckpointError`` (the run stops; it never restarts from scratch)."""
    if value is None:
        return None
    if value == LATEST:
        ckpt = read_latest(Path(output_dir))
        if ckpt is None:
            raise CheckpointError(f"resume_from_checkpoint: latest: {output_dir} has no `{LATEST}` marker, so there is "
                                  "no checkpoint to resume from; to start a new run, drop --resume_from_checkpoint")
    else:
        ckpt = Path(value)
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"resume_from_checkpoint: {e}") from None
    return str(ckpt)


# --------------------------------------------------------------------------------------------------------- metrics


def metrics_path(run_dir: str | os.PathLike) -> Path:
    """The metrics file of a run, by the name the run recorded: ``run.json``, else (a run trained before ``run.json``
    existed) the training config in a steering checkpoint's ``steering.json``. A ``CheckpointError`` if the run
    records no name; the file itself may be missing (a run that has not logged yet)."""
    run_dir = Path(run_dir)
    record = run_dir / RUN_RECORD
    if record.is_file():
        recorded = _read_json(record)
        name = recorded.get("metrics_file") if isinstance(recorded, dict) else None
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{record} names no metrics_file (tampered with?)")
        return run_dir / name
    for model_dir in reversed([*run_checkpoints(run_dir), final_dir(run_dir)]):
        name = _recorded_metrics_file(model_dir)
        if name is not None:
            return run_dir / name
    raise CheckpointError(f"{run_dir} records no metrics file name: it has no {RUN_RECORD} and no checkpoint whose "
                          "steering.json holds the training config")


def _recorded_metrics_file(model_dir: Path) -> str | None:
    """The ``metrics_file`` of the training config a steering checkpoint records, if it records one."""
    from steering.vectors import META_FILE

    if not (model_dir / META_FILE).is_file():
        return None
    meta = _read_json(model_dir / META_FILE)
    config = meta.get("training_config") if isinstance(meta, dict) else None
    name = config.get("metrics_file") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """``(rows, bad_lines)`` of a metrics file: one JSON object per line, in file order. A line that is not a JSON
    object (the one a running or killed trainer was writing) is counted, not fatal: the rest of the file is good."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


# -------------------------------------------------------------------------------------------------------- callback


class CheckpointCallback(TrainerCallback):
    """Completes each checkpoint transformers writes: after every process has saved its part, rank 0 writes the
    manifest, then the ``latest`` marker. (A directory written again — a step redone after a resume — loses its old
    manifest first, in ``SteeringGRPOTrainer.save_model``, so a save interrupted halfway never looks complete.)"""

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank's shards (DeepSpeed, per-rank RNG) are on disk
        if state.is_world_process_zero:
            ckpt = checkpoint_dir(args.output_dir, state.global_step)
            write_manifest(ckpt)
            write_latest(Path(args.output_dir), ckpt)
        PartialState().wait_for_everyone()
