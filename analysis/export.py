"""``python -m analysis export``: a checkpoint's vectors in the formats other tools load.

    python -m analysis export --checkpoint DIR --to gguf   --out vectors.gguf [--scale S] [--drop-layer-0]
    python -m analysis export --checkpoint DIR --to merged --out DIR [--scale S] [--model BASE] [--dtype D]
    python -m analysis export --checkpoint DIR --to peft   --out DIR

- ``gguf``: a llama.cpp control-vector file (``general.architecture = controlvector``, one F32 ``direction.N``
  tensor per layer, ``controlvector.model_hint``), the format llama.cpp's ``--control-vector``, repeng and EasySteer
  read. ``direction.N`` holds layer ``N`` (0-based) times ``--scale``: llama.cpp adds it to the output of layer ``N``,
  as this project does. llama.cpp cannot steer layer 0: a nonzero layer-0 vector is an error unless
  ``--drop-layer-0`` (a zero one is left out). No model is loaded.
- ``merged`` (Llama family): a full Hugging Face model directory, config ``mlp_bias: true``, each ``down_proj.bias``
  = the layer's vector times ``--scale`` (unsteered layers and the gate/up biases zero), safetensors, the base's
  tokenizer copied; plain ``AutoModelForCausalLM.from_pretrained`` gives the steered model's logits, and engines
  whose Llama reads ``mlp_bias`` (vLLM's does) serve it without a plugin. Qwen2 has no ``mlp_bias`` option: an error
  says what to use instead.
  ``--dtype``: default the base's own; fp32 reproduces the steered logits to float rounding, bf16/fp16 round the
  vectors to that dtype (the steered model adds them in fp32).
- ``peft``: the checkpoint already is a PEFT BEFT adapter (this project's native format); its adapter files are
  copied to ``--out`` (without the optimizer state a training checkpoint also holds). The vectors must fit the base
  the checkpoint records where its config is readable here; where it is not (a path on another machine, a Hub id
  offline), one warning line says so and the copy goes on.

Every bad argument (paths, the format, the scale, shapes against ``--model``'s config, layer 0, the family) is one
line on stderr and exit code 2, before any model loads. Formats, numbering and how to use each file:
docs/export.md.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from analysis import cli
from analysis.cli import UsageError
from steering import gguf_vectors as gv
from steering import vectors as sv

FORMATS = ("gguf", "merged", "peft")
# What the merged directory records about its origin (JSON, next to config.json; transformers ignores it).
EXPORT_META_FILE = "steering_export.json"
# The tokenizer files a Hugging Face model directory may hold, copied byte for byte from a local base.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MERGED_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = cli.add_command(subparsers, "export", main, __doc__, help="write a checkpoint's vectors as a llama.cpp "
                        "control vector (gguf), a merged Llama model directory, or a PEFT adapter")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="steering checkpoint directory (adapter_model.safetensors + steering.json)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format: gguf (llama.cpp control vector), "
                   "merged (full Llama model with down_proj biases), peft (the native PEFT BEFT adapter)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .gguf file (gguf) or directory (merged, peft)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every vector by S before writing (gguf, merged; default 1)")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="base model (Hub id or local dir); merged: default the base recorded in the checkpoint; "
                        "gguf: optional, its config is checked against the vectors and names the model hint")
    p.add_argument("--dtype", default=None, choices=MERGED_DTYPES,
                   help="merged: dtype of the written model (default: the base's own, float32 if it records none)")
    p.add_argument("--drop-layer-0", action="store_true",
                   help="gguf: leave out a nonzero layer-0 vector (llama.cpp cannot apply one) instead of failing")


# --------------------------------------------------------------------------------------------------------------------
# Checks (no model)


def _check_common(args: argparse.Namespace) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """The checkpoint, its vectors and the flags every format shares; returns (steering.json, vectors)."""
    from steering import token_scaling as ts

    cli.check_checkpoint_arg(args.checkpoint)
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale {args.scale}: not a finite number")
    if args.dtype is not None and args.to != "merged":
        raise UsageError(f"--dtype applies to --to merged only (a {args.to} export keeps the vectors in fp32)")
    if args.drop_layer_0 and args.to != "gguf":
        raise UsageError("--drop-layer-0 applies to --to gguf only (the other formats can steer layer 0)")
    try:
        meta, vectors = sv.read_checkpoint(args.checkpoint)
    except sv.CheckpointError as e:
        raise UsageError(f"--checkpoint: {e}") from None
    if ts.checkpoint_has_gates(args.checkpoint) or meta.get("token_scaling"):
        # s_l * alpha_l(t) depends on the token; none of the formats can hold a per-token gate.
        raise UsageError(f"--checkpoint {args.checkpoint} is a token-scaling checkpoint: its per-token gates "
                         "alpha_l(t) cannot be written as fixed vectors; export a plain steering checkpoint")
    for layer, v in vectors.items():
        if not torch.isfinite(v.float() * float(args.scale)).all():
            raise UsageError(f"--scale {args.scale}: layer {layer}'s vector times the scale overflows float32")
    return meta, vectors


def _check_out_dir(out: str) -> None:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if p.is_dir() and any(p.iterdir()):
        raise UsageError(f"--out {out}: exists and is not empty; remove it or choose another directory")


def _base_config(model: str, checkpoint: str, vectors: dict[int, torch.Tensor]):
    """The base model's config (no weights), checked to be supported and to fit the vectors."""
    cli.check_model_id(model)
    config = cli.model_config(model)
    try:
        sv.check_fits(vectors, config, source=f"--checkpoint {checkpoint}")
    except sv.CheckpointError as e:
        raise UsageError(f"{e} (--model {model})") from None
    return config


def check_gguf(args: argparse.Namespace, meta: dict[str, Any], vectors: dict[int, torch.Tensor]) -> dict[str, Any]:
    out = Path(args.out)
    if out.suffix.lower() != ".gguf":
        raise UsageError(f"--out {args.out}: a control-vector file name must end in .gguf")
    if out.is_dir():
        raise UsageError(f"--out {args.out}: is a directory; give a .gguf file name")
    if out.exists():
        raise UsageError(f"--out {args.out}: exists; remove it or choose another file name (export never replaces "
                         "a file)")
    model_type = meta.get("model_type")
    if args.model:
        model_type = _base_config(args.model, args.checkpoint, vectors).model_type
    if not model_type:
        raise UsageError(f"--checkpoint {args.checkpoint} records no model_type for the file's model hint; pass "
                         "--model BASE")
    try:
        written = gv.exportable(vectors, drop_layer_0=args.drop_layer_0)
    except gv.ControlVectorError as e:
        raise UsageError(f"--checkpoint {args.checkpoint}: {e}") from None
    return {"model_hint": str(model_type), "layers": sorted(written),
            "dropped_layer_0": 0 in vectors and args.drop_layer_0 and bool(torch.any(vectors[0] != 0))}


def check_merged(args: argparse.Namespace, meta: dict[str, Any], vectors: dict[int, torch.Tensor]) -> dict[str, Any]:
    _check_out_dir(args.out)
    base_id = cli.base_model_id(args.model, args.checkpoint)
    config = _base_config(base_id, args.checkpoint, vectors)
    if config.model_type == "qwen2":
        raise UsageError(
            f"--to merged: {base_id} is a Qwen2 model, and transformers' Qwen2 has no mlp_bias option, so a plain "
            "checkpoint cannot give its down_proj a bias; serve the PEFT adapter instead (--to peft; "
            "PeftModel.from_pretrained, or vLLM with this project's plugin: docs/vllm.md), or --to gguf for llama.cpp")
    if config.model_type != "llama" or not hasattr(config, "mlp_bias"):
        raise UsageError(f"--to merged: {base_id} is a {config.model_type!r} model; merging needs a Llama-family "
                         "config with an mlp_bias option")
    base_dir = Path(base_id).expanduser()
    if base_dir.is_dir() and not any((base_dir / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"--model {base_id}: the directory holds no tokenizer files ({', '.join(TOKENIZER_FILES)}), "
                         "so the merged model could not be served; give the base with its tokenizer")
    dtype = args.dtype or _dtype_name(getattr(config, "dtype", None)) or "float32"
    if dtype not in MERGED_DTYPES:
        raise UsageError(f"--model {base_id} records dtype {dtype!r}; choose one of {list(MERGED_DTYPES)} with "
                         "--dtype")
    return {"base": base_id, "dtype": dtype, "had_mlp_bias": bool(config.mlp_bias)}


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def check_peft(args: argparse.Namespace, meta: dict[str, Any], vectors: dict[int, torch.Tensor]) -> dict[str, Any]:
    if args.scale != 1.0:
        raise UsageError("--scale applies to gguf and merged; a PEFT adapter is copied as it is (scale it when "
                         "loading: steering.vectors.steering_scale)")
    if args.model:
        raise UsageError("--model applies to gguf and merged; the PEFT adapter records its base in "
                         f"{sv.ADAPTER_CONFIG_FILE}")
    base = meta.get("base_model")
    # The adapter loads on its recorded base only: where that base's config is readable here, the vectors must fit it.
    # The export itself is a file copy that needs no base, so a base this machine cannot read (a path on the cluster
    # that trained it, a Hub id offline) is a warning, not a refusal.
    if base:
        unreadable = _unreadable_config(str(base))
        if unreadable is None:
            _base_config(str(base), args.checkpoint, vectors)
        else:
            print(f"export: cannot read the recorded base {base}'s config ({unreadable}); the vectors' fit to it was "
                  "not checked", file=sys.stderr)
    _check_out_dir(args.out)
    return {}


def _unreadable_config(model: str) -> str | None:
    """Why ``model``'s config.json cannot be read here (no such directory, no config.json, a Hub id not reachable), or
    None when it can: then :func:`_base_config` checks it."""
    from transformers import AutoConfig

    try:
        cli.check_model_id(model, flag="base")
    except UsageError as e:
        return str(e).removeprefix(f"base {model}: ")
    try:
        AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, HF errors: what model_config reports too)
        return cli.one_line(e)
    return None


CHECKS = {"gguf": check_gguf, "merged": check_merged, "peft": check_peft}


def check(args: argparse.Namespace) -> tuple[dict[str, Any], dict[int, torch.Tensor], dict[str, Any]]:
    """Every check of the command, none of which loads a model: (steering.json, vectors, the format's plan)."""
    meta, vectors = _check_common(args)
    return meta, vectors, CHECKS[args.to](args, meta, vectors)


# --------------------------------------------------------------------------------------------------------------------
# Writing


def export_gguf(args: argparse.Namespace, meta: dict[str, Any], vectors: dict[int, torch.Tensor],
                plan: dict[str, Any]) -> str:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = gv.write_control_vector(args.out, vectors, model_hint=plan["model_hint"], scale=args.scale,
                                   drop_layer_0=args.drop_layer_0, base_model=meta.get("base_model"))
    names = ", ".join(gv.tensor_name(layer) for layer in plan["layers"])
    dropped = "; layer 0's vector was dropped (--drop-layer-0)" if plan["dropped_layer_0"] else ""
    return (f"wrote {path}: llama.cpp control vector, {len(plan['layers'])} tensors ({names}), scale {args.scale:g}"
            f"{dropped}; use it with llama.cpp --control-vector {path}")


def merged_model(base_id: str, vectors: dict[int, torch.Tensor], *, scale: float, dtype: str):
    """The Llama base with real MLP biases: ``down_proj.bias`` = its own bias (zero without one) + vector x scale;
    gate/up biases zero (or the base's own). The sum is taken in fp32, then cast to ``dtype``."""
    from torch import nn

    model = sv.load_base_model(base_id, dtype=dtype)
    num_layers, _ = sv.model_shape(model)
    with torch.no_grad():
        for layer in range(num_layers):
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = model.get_submodule(f"model.layers.{layer}.mlp.{name}")
                if linear.bias is None:
                    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                           device=linear.weight.device), requires_grad=False)
            if layer in vectors:
                bias = model.get_submodule(f"model.layers.{layer}.mlp.down_proj").bias
                total = bias.detach().float() + vectors[layer].float().reshape(-1).to(bias.device) * float(scale)
                bias.copy_(total.to(bias.dtype))
    model.config.mlp_bias = True
    return model


def _copy_tokenizer(base_id: str, out: Path) -> list[str]:
    base_dir = Path(base_id).expanduser()
    if base_dir.is_dir():
        copied = []
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, out / name)
                copied.append(name)
        return copied
    from transformers import AutoTokenizer

    # A Hub base: the tokenizer from the local cache, written back unchanged (no padding side or pad token set).
    return [Path(f).name for f in AutoTokenizer.from_pretrained(base_id).save_pretrained(str(out))]


def export_merged(args: argparse.Namespace, meta: dict[str, Any], vectors: dict[int, torch.Tensor],
                  plan: dict[str, Any]) -> str:
    from steering.files import publish_dir, write_json_atomic

    out = Path(args.out)
    model = merged_model(plan["base"], vectors, scale=args.scale, dtype=plan["dtype"])
    with publish_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        if list(tmp.glob("*.bin")) or not list(tmp.glob("*.safetensors")):
            raise UsageError(f"transformers did not write the merged weights as safetensors in {tmp}")
        tokenizer = _copy_tokenizer(plan["base"], tmp)
        write_json_atomic(tmp / EXPORT_META_FILE, {
            "format": "merged", "checkpoint": str(args.checkpoint), "base_model": plan["base"],
            "adapter_sha256": meta.get("adapter_sha256"), "layers": sorted(vectors), "scale": args.scale,
            "dtype": plan["dtype"], "base_had_mlp_bias": plan["had_mlp_bias"], "tokenizer_files": tokenizer,
        }, indent=2)
    return (f"wrote {out}: {plan['base']} with the vectors of {sorted(vectors)} x {args.scale:g} as down_proj biases "
            f"(mlp_bias: true, {plan['dtype']}); load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")


def export_peft(args: argparse.Namespace, meta: dict[str, Any], vectors: dict[int, torch.Tensor],
                plan: dict[str, Any]) -> str:
    from steering.files import publish_dir

    out = Path(args.out)
    with publish_dir(out) as tmp:
        for name in (sv.ADAPTER_CONFIG_FILE, sv.ADAPTER_WEIGHTS_FILE, sv.META_FILE):
            shutil.copy2(Path(args.checkpoint) / name, tmp / name)
    return (f"{args.checkpoint} already is a PEFT BEFT adapter, this project's native format; copied its adapter "
            f"files to {out} (PeftModel.from_pretrained(base, {str(out)!r}); vLLM: docs/vllm.md)")


WRITERS = {"gguf": export_gguf, "merged": export_merged, "peft": export_peft}


def main(args: argparse.Namespace) -> int:
    meta, vectors, plan = check(args)
    print(WRITERS[args.to](args, meta, vectors, plan))
    return 0
