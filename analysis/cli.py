"""What every analysis command shares: the model arguments, loading, the output directory, JSON writing."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from steering import vectors as sv


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2, before any model loads."""


def add_model_args(parser: argparse.ArgumentParser, *, checkpoint_required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=checkpoint_required, metavar="DIR",
                        help="steering checkpoint directory (adapter_model.safetensors + steering.json)")
    parser.add_argument("--model", default=None, metavar="BASE",
                        help="base model (Hub id or local dir); default: the base recorded in the checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the base model (vectors stay fp32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")


def check_checkpoint_arg(path: str | None) -> None:
    """Validate a --checkpoint before any model loads."""
    if path is None:
        return
    if not Path(path).is_dir():
        raise UsageError(f"--checkpoint {path}: no such directory")
    if not sv.is_checkpoint(path):
        raise UsageError(f"--checkpoint {path}: not a complete steering checkpoint "
                         f"(needs {sv.ADAPTER_WEIGHTS_FILE} and {sv.META_FILE})")


def base_model_id(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if args.checkpoint:
        base = sv.read_meta(args.checkpoint).get("base_model")
        if base:
            return base
    raise UsageError("no base model: pass --model BASE (the checkpoint records none)")


def default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(args: argparse.Namespace, *, steered: bool = True):
    """(model, tokenizer): the steered model from --checkpoint on --model (or the recorded base), or the plain base
    when there is no checkpoint or ``steered`` is False."""
    check_checkpoint_arg(getattr(args, "checkpoint", None))
    base_id = base_model_id(args)
    device = default_device(getattr(args, "device", None))
    base = sv.load_base_model(base_id, dtype=args.dtype)
    if steered and getattr(args, "checkpoint", None):
        model = sv.load_steered_model(args.checkpoint, base=base)
    else:
        model = base
    tokenizer = sv.load_tokenizer(base_id)
    return model.to(device).eval(), tokenizer


def prepare_out(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path
