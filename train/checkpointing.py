"""Training state in safetensors + JSON (never pickle), written atomically, and the ``latest`` marker.

A run directory looks like::

    output_dir/
      checkpoint-40/            complete checkpoints only (each was renamed into place after it was fully written)
        adapter_config.json, adapter_model.safetensors, steering.json     the core steering format
        optimizer.safetensors + optimizer.json    optimizer tensors + hyper-parameters
        scheduler.json, rng_state.safetensors, rng_state.json, trainer_state.json
      latest                    the name of the newest complete checkpoint, written (atomically) last
      .checkpoint-60.tmp-1234/  a save in progress or interrupted: never picked, cleaned up on the next save
                                (so is .checkpoint-<step>.old-<pid>/, a replaced copy of a redone step)

``--resume_from_checkpoint latest`` reads the marker; a crash can lose at most the steps since that checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from steering.vectors import fsync_dir, sha256_file

LATEST = "latest"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
RNG_TENSORS = "rng_state.safetensors"
RNG_JSON = "rng_state.json"
TRAINER_STATE = "trainer_state.json"
REQUIRED = ("steering.json", "adapter_model.safetensors", OPTIMIZER_JSON, TRAINER_STATE)


def _checkpoint_error(message: str) -> Exception:
    from steering.vectors import CheckpointError

    return CheckpointError(message)


def _load_tensors(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """A safetensors file, checked against the checksum recorded next to it (if any): never unpickles, and a
    truncated or tampered file is a CheckpointError naming it, not garbage state."""
    from safetensors import SafetensorError

    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise _checkpoint_error(f"{path} does not match its recorded sha256: the file was tampered with or corrupted "
                                "(truncated or tampered?); resume from an earlier checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _checkpoint_error(f"{path} is not a readable safetensors file (truncated or tampered?): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _checkpoint_error(f"{path} is not valid JSON (truncated or tampered?): {e}") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------- optim


def save_optimizer(optimizer: torch.optim.Optimizer, out: Path) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(out / OPTIMIZER_TENSORS))
    _write_json(out / OPTIMIZER_JSON, {"param_groups": sd["param_groups"], "scalars": scalars,
                                       "type": type(optimizer).__name__,
                                       "sha256": sha256_file(out / OPTIMIZER_TENSORS)})


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    meta = _read_json(ckpt / OPTIMIZER_JSON)
    tensors = (_load_tensors(ckpt / OPTIMIZER_TENSORS, meta.get("sha256"))
               if (ckpt / OPTIMIZER_TENSORS).exists() else {})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    state = {i: {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in s.items()} for i, s in state.items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_scheduler(scheduler: Any, out: Path) -> None:
    sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    _write_json(out / SCHEDULER_JSON, sd)


def load_scheduler(scheduler: Any, ckpt: Path) -> None:
    sd = json.loads((ckpt / SCHEDULER_JSON).read_text())
    current = scheduler.state_dict()
    if "lr_lambdas" in current:
        sd["lr_lambdas"] = current["lr_lambdas"]
    scheduler.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------------------------ rng


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) of this process's random number generators."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.random.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.random.get_rng_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(tensors["torch_cuda"])


def save_rng(out: Path, per_rank: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> None:
    tensors = {f"rank{r}.{k}": v.contiguous() for r, (ts, _) in enumerate(per_rank) for k, v in ts.items()}
    save_file(tensors, str(out / RNG_TENSORS))
    _write_json(out / RNG_JSON, {**{str(r): meta for r, (_, meta) in enumerate(per_rank)},
                                 "sha256": sha256_file(out / RNG_TENSORS)})


def load_rng(ckpt: Path, rank: int) -> bool:
    if not (ckpt / RNG_TENSORS).exists():
        return False
    metas = _read_json(ckpt / RNG_JSON)
    if str(rank) not in metas:
        return False
    prefix = f"rank{rank}."
    tensors = {k[len(prefix):]: v for k, v in _load_tensors(ckpt / RNG_TENSORS, metas.get("sha256")).items()
               if k.startswith(prefix)}
    set_rng_state(tensors, metas[str(rank)])
    return True


# --------------------------------------------------------------------------------------------------------- directories


def temp_dir_for(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Move a fully written checkpoint into place, then point ``latest`` at it (the marker is written last)."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # a step redone after a resume: swap atomically, so `checkpoint-<step>` is never partial
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    _write_json(final.parent / LATEST, {"checkpoint": final.name})
    fsync_dir(final.parent)
    for stale in final.parent.glob("*.checkpoint-*"):  # interrupted saves (and their inner temp dirs), old copies
        if ".tmp-" in stale.name or ".old-" in stale.name:
            shutil.rmtree(stale, ignore_errors=True)


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and all((ckpt / name).is_file() for name in REQUIRED)


def verify_checkpoint(ckpt: Path) -> None:
    """Read back everything a resume reads (vectors, optimizer, RNG, trainer state) and check the recorded sha256
    checksums, without touching a model: a truncated or tampered file is a CheckpointError naming it."""
    from steering.vectors import load_vectors

    load_vectors(ckpt)  # checks its own checksum (steering.json) and that the vectors are finite
    optimizer_meta = _read_json(ckpt / OPTIMIZER_JSON)
    if (ckpt / OPTIMIZER_TENSORS).exists():
        for name, value in _load_tensors(ckpt / OPTIMIZER_TENSORS, optimizer_meta.get("sha256")).items():
            if not torch.isfinite(value).all():
                raise _checkpoint_error(f"{ckpt / OPTIMIZER_TENSORS}: {name} holds NaN or Inf")
    if (ckpt / RNG_TENSORS).exists():
        _load_tensors(ckpt / RNG_TENSORS, _read_json(ckpt / RNG_JSON).get("sha256"))
    _read_json(ckpt / TRAINER_STATE)
    if (ckpt / SCHEDULER_JSON).exists():
        _read_json(ckpt / SCHEDULER_JSON)


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """``latest`` → the checkpoint the marker names (None if the run has none yet); a path → that path, checked.

    Either way the checkpoint is read back and verified (:func:`verify_checkpoint`) before any model loads."""
    if value is None:
        return None
    if value == LATEST:
        marker = Path(output_dir) / LATEST
        if not marker.is_file():
            return None
        name = _read_json(marker).get("checkpoint")
        ckpt = Path(output_dir) / str(name)
        if not name or not is_complete(ckpt):
            raise FileNotFoundError(f"resume_from_checkpoint: {marker} names {name}, which is incomplete or missing")
    else:
        ckpt = Path(value)
        if not is_complete(ckpt):
            raise FileNotFoundError(f"resume_from_checkpoint: {value} is not a complete checkpoint "
                                    f"(needs {list(REQUIRED)})")
    from steering.vectors import CheckpointError

    try:
        verify_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"resume_from_checkpoint: {e}") from None
    return str(ckpt)
