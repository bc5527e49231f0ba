"""The checkpoints of a training run: transformers' ``Trainer`` writes them, this module makes them safe to resume from.

A run directory looks like::

    output_dir/
      checkpoint-40/        written by transformers' Trainer, the same for every adapter and launcher: the model
                            (steering: PEFT BEFT adapter + steering.json; LoRA: the adapter; full: the weights),
                            optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json (DeepSpeed: its own
                            global_step*/ shards), the tokenizer and training_args.bin; then, last of all,
        checksums.json      the sha256 and size of every file above, written once every process has finished its part
      latest                {"checkpoint": "checkpoint-40"}: written after checksums.json

A checkpoint without ``checksums.json`` is incomplete (a save was interrupted, or is in progress): nothing resumes from
it, and no analysis command picks it. ``--resume_from_checkpoint latest`` reads the marker, checks every checksum of the
checkpoint it names (before any model loads), or stops with an error; it never starts a run from scratch. Resuming
reads the optimizer, scheduler and RNG state with transformers' own loader, which uses ``torch.load(weights_only=True)``
(the restricted unpickler: tensors, numbers, strings and containers, no code); ``training_args.bin`` is never read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from steering.files import fsync_dir, fsync_file, sha256_file, write_json_atomic
from steering.vectors import CheckpointError

LATEST = "latest"
MANIFEST = "checksums.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    from steering.vectors import META_FILE, load_vectors

    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} does not exist")
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: it has no {MANIFEST} (written last, so its save "
                              "was interrupted or is still running)")
    manifest = _read_json(ckpt / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                              and isinstance(e.get("sha256"), str) for e in files.values()):
        raise CheckpointError(f"{ckpt / MANIFEST} is not a checksum manifest (tampered with?); resume from an earlier "
                              "checkpoint")
    for rel, entry in files.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (listed in {MANIFEST})")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum in {MANIFEST}: the file was truncated or "
                                  "tampered with; resume from an earlier checkpoint")
    _read_json(ckpt / TRAINER_STATE)
    if (ckpt / META_FILE).is_file():
        load_vectors(ckpt)  # and its own checks: shapes, finite values


# -------------------------------------------------------------------------------------------------------- run dirs


def write_latest(run_dir: Path, ckpt: Path) -> None:
    write_json_atomic(run_dir / LATEST, {"checkpoint": ckpt.name})


def read_latest(run_dir: Path) -> Path | None:
    """The checkpoint the ``latest`` marker names (None if the run has no marker yet)."""
    marker = Path(run_dir) / LATEST
    if not marker.is_file():
        return None
    name = _read_json(marker).get("checkpoint")
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
    checkpoints, its ``latest`` marker, ``final/`` and its metrics file."""
    import shutil

    run_dir = Path(run_dir)
    for d in checkpoint_dirs(run_dir):
        if overwrite or not is_complete(d):
            shutil.rmtree(d)
    if overwrite:
        for name in (LATEST, metrics_file):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    fsync_dir(run_dir)


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


# -------------------------------------------------------------------------------------------------------- callback


class CheckpointCallback(TrainerCallback):
    """Completes each checkpoint transformers writes: after every process has saved its part, rank 0 writes the
    manifest, then the ``latest`` marker. (A directory written again — a step redone after a resume — loses its old
    manifest first, in ``SteeringGRPOTrainer.save_model``, so a save interrupted halfway never looks complete.)"""

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank's shards (DeepSpeed, per-rank RNG) are on disk
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_manifest(ckpt)
            write_latest(Path(args.output_dir), ckpt)
        PartialState().wait_for_everyone()
