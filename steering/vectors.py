"""The steering vector, and how it attaches to a frozen base model.

One trainable vector ``s_l`` (size ``hidden_size``) per decoder layer ``l``, added to that layer's output at every
position. Adding ``s_l`` to the output of ``model.layers.{l}.mlp.down_proj`` is the same thing, because the MLP
output is added straight into the residual stream; so the vector *is* a bias on ``down_proj``. PEFT calls that
adapter BEFT, and we use it as is: a checkpoint of this project is a valid PEFT BEFT adapter, and
``peft.PeftModel.from_pretrained(base, ckpt)`` gives the same model as :func:`load_steered_model`.

The vectors stay fp32 whatever the base dtype (Adam updates on a bf16 vector lose precision); BEFT adds them to the
bf16 output in fp32 and casts the sum back.

Checkpoint directory layout::

    adapter_config.json         PEFT BEFT config (target_modules = the steered down_proj modules)
    adapter_model.safetensors   one (1, hidden_size) fp32 tensor per steered layer
    steering.json               base model id, layers, hidden size, layer count, step, training config

Nothing is ever unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steering.files import publish_dir, sha256_file, write_json_atomic

# model_type -> what we call the family in errors. Matched exactly on ``config.model_type``; both families put the
# MLP at ``model.layers.{l}.mlp.down_proj`` and add its output straight into the residual stream.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "qwen2": "Qwen2 family (Qwen2, Qwen2.5, Qwen2.5-Math)",
    "llama": "Llama family (Llama-2, Llama-3, Llama-3.1)",
}

ADAPTER_NAME = "default"
META_FILE = "steering.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1

_DOWN_PROJ = "model.layers.{}.mlp.down_proj"
_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj\.beft_bias$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class SteeringError(ValueError):
    """Bad input to the steering machinery: the message says what to fix."""


class CheckpointError(SteeringError):
    """A checkpoint directory that is missing, incomplete, corrupt or does not fit the model."""


# --------------------------------------------------------------------------------------------------------------------
# Base model


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SteeringError(f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[dtype]


def check_supported(config: Any) -> None:
    """Raise a clear error unless the model config belongs to a supported family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = "; ".join(f"{k!r}: {v}" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise SteeringError(
            f"model_type {model_type!r} is not supported for steering; supported model types are {supported}"
        )


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_base_model(
    name_or_path: str,
    dtype: str | torch.dtype = "bfloat16",
    *,
    revision: str | None = None,
    attn_implementation: str | None = None,
    device_map: Any = None,
) -> nn.Module:
    """Load a causal LM from a Hub id or a local directory, check its family, and freeze every parameter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    check_supported(config)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return freeze(model)


def load_tokenizer(name_or_path: str, *, revision: str | None = None):
    """The tokenizer of a base model, left-padded, with a pad token.

    A local tokenizer saved as a plain ``tokenizers`` backend (``tokenizer_class`` TokenizersBackend or
    PreTrainedTokenizerFast, like the demo's character tokenizer) is loaded as exactly that class. AutoTokenizer would
    swap in the model family's own class for Qwen2 models, which rebuilds the pre-tokenizer and silently changes the
    token ids. Everything else goes through AutoTokenizer.

    A tokenizer that cannot be loaded, or that has no vocabulary, is a :class:`SteeringError` (one line): loading reads
    no weights, so the commands check it before any weights load."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(name_or_path) / "tokenizer_config.json"
    declared = None
    if config_file.is_file():
        try:
            declared = json.loads(config_file.read_text()).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError):
            declared = None
    try:
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except Exception as e:  # noqa: BLE001 (OSError: missing / offline, JSONDecodeError, ValueError, tokenizers' own)
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise SteeringError(f"cannot load the tokenizer of {str(name_or_path)!r} ({type(e).__name__}: {msg})") from None
    if not tokenizer("1 + 1", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer (no vocabulary) for a model directory without tokenizer files; it
        # would turn every prompt into nothing.
        raise SteeringError(f"the tokenizer of {str(name_or_path)!r} has no vocabulary (its tokenizer files, e.g. "
                            "tokenizer.json, are missing)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_shape(model: Any) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) of a base model, a PeftModel around one, or a model config (so shapes can be
    checked before any weights load)."""
    cfg = model.config if isinstance(model, nn.Module) else model
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's (first) parameters: where its inputs go."""
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------------------------
# Attaching


def validate_layers(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    out = sorted({int(layer) for layer in layers})
    if not out:
        raise SteeringError("layers is empty; give at least one layer index, or null for all layers")
    bad = [layer for layer in out if not 0 <= layer < num_layers]
    if bad:
        raise SteeringError(
            f"layers {bad} out of range: the model has {num_layers} decoder layers, so valid indices are "
            f"0..{num_layers - 1}"
        )
    return out


def add_to_hidden(hidden: torch.Tensor, vector: torch.Tensor, per_position: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden + vector`` with the numerics of the BEFT bias, the one way a vector is added to a hidden state here
    (hooks, path patching, attribution, token-scaling gates): the vector in fp32 (as its parameter is), the sum in fp32
    (or wider, if the hidden state is), then cast back to the hidden state's dtype. PEFT's BEFT computes
    ``(down_proj(x) + bias).to(dtype)`` with an fp32 bias, so this equals the steered model bit for bit in fp32 *and*
    bf16; casting the vector to bf16 first would round it once more and differ. ``per_position``: a (batch, seq)
    boolean mask of the positions that get the vector (the others come back unchanged: bf16 -> fp32 -> bf16 is
    exact), or a per-position multiplier of it (a token-scaling gate). Differentiable in all three inputs."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    v = vector.to(device=hidden.device, dtype=torch.float32).to(compute)
    if per_position is not None:
        v = per_position.to(hidden.device).unsqueeze(-1).to(compute) * v
    return (hidden.to(compute) + v).to(hidden.dtype)


def target_regex(layers: Iterable[int]) -> str:
    """PEFT ``target_modules`` regex (full match) selecting ``down_proj`` of exactly these layers."""
    return r"model\.layers\.(" + "|".join(str(layer) for layer in layers) + r")\.mlp\.down_proj"


def attach_steering(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    init: Mapping[int, torch.Tensor] | str | os.PathLike | None = None,
    *,
    base_model_id: str | None = None,
):
    """Freeze ``model`` and give each layer in ``layers`` (default: all) one trainable fp32 steering vector.

    ``init`` is None (zeros), a ``{layer: tensor}`` mapping, or a checkpoint directory / safetensors file. Returns a
    ``peft.PeftModel``; the vectors are its only trainable parameters.
    """
    from peft import BeftConfig, get_peft_model

    check_supported(model.config)
    num_layers, _ = model_shape(model)
    layers = validate_layers(layers, num_layers)
    freeze(model)
    config = BeftConfig(target_modules=target_regex(layers))
    if base_model_id is None:
        base_model_id = model.config.name_or_path or None
    with warnings.catch_warnings():
        # BEFT warns that the base down_proj has no bias to merge into; we never merge.
        warnings.filterwarnings("ignore", message=".*no bias term.*")
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_model_id
    for p in vector_parameters(peft_model).values():
        p.data = p.data.float()  # fp32 whatever the base dtype (PEFT's autocast does this too; we make it certain)
    if init is not None:
        vectors = load_vectors(init) if isinstance(init, (str, os.PathLike)) else dict(init)
        unknown = sorted(set(vectors) - set(layers))
        if unknown:
            raise SteeringError(f"init has vectors for layers {unknown} that are not steered (steered: {layers})")
        set_vectors(peft_model, vectors)
    return peft_model


def vector_parameters(model: nn.Module) -> dict[int, nn.Parameter]:
    """``{layer: parameter}`` of the steering vectors; each parameter has shape (1, hidden_size)."""
    out: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        bias = getattr(module, "beft_bias", None)
        if isinstance(bias, nn.ParameterDict) and ADAPTER_NAME in bias:
            m = re.search(r"layers\.(\d+)\.mlp\.down_proj$", name)
            if m is None:
                raise SteeringError(f"BEFT adapter on {name!r}: only model.layers.{{l}}.mlp.down_proj is supported")
            out[int(m.group(1))] = bias[ADAPTER_NAME]
    return dict(sorted(out.items()))


def steered_layers(model: nn.Module) -> list[int]:
    return list(vector_parameters(model))


def get_vectors(model: nn.Module) -> dict[int, torch.Tensor]:
    """Detached fp32 copies ``{layer: (hidden_size,)}``."""
    return {layer: p.detach().float().reshape(-1).clone().cpu() for layer, p in vector_parameters(model).items()}


@torch.no_grad()
def set_vectors(model: nn.Module, vectors: Mapping[int, torch.Tensor]) -> None:
    params = vector_parameters(model)
    vectors = {layer: torch.as_tensor(value) for layer, value in vectors.items()}
    unsteered = sorted(set(vectors) - set(params))
    if unsteered:
        raise SteeringError(f"layers {unsteered} are not steered in this model (steered: {sorted(params)})")
    check_fits(vectors, model, source="the vectors given")
    for layer, value in vectors.items():
        params[layer].copy_(value.reshape(params[layer].shape).to(params[layer].dtype))


def vector_norms(model: nn.Module) -> dict[int, float]:
    return {layer: float(p.detach().float().norm()) for layer, p in vector_parameters(model).items()}


def param_groups(
    model: nn.Module, lr: float, layer_lr: Mapping[int, float] | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one group per layer that has its own learning rate, one for the rest."""
    layer_lr = dict(layer_lr or {})
    params = vector_parameters(model)
    unknown = sorted(set(layer_lr) - set(params))
    if unknown:
        raise SteeringError(f"layer_lr names layers {unknown} that are not steered (steered: {sorted(params)})")
    groups = [{"params": [params[layer]], "lr": float(rate), "weight_decay": weight_decay, "layer": layer}
              for layer, rate in sorted(layer_lr.items())]
    rest = [p for layer, p in params.items() if layer not in layer_lr]
    if rest:
        groups.insert(0, {"params": rest, "lr": float(lr), "weight_decay": weight_decay})
    return groups


# --------------------------------------------------------------------------------------------------------------------
# Inference controls


@contextmanager
def steering_scale(model: nn.Module, scale: float) -> Iterator[None]:
    """Multiply every vector by ``scale`` inside the block, and restore the exact values on exit (inference only)."""
    params = vector_parameters(model)
    saved = {layer: p.detach().clone() for layer, p in params.items()}
    try:
        with torch.no_grad():
            for p in params.values():
                p.mul_(scale)
        yield
    finally:
        with torch.no_grad():
            for layer, p in params.items():
                p.copy_(saved[layer])


@contextmanager
def use_vectors(model: nn.Module, vectors: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block, the steered layers carry exactly ``vectors`` (every other layer zero); restored on exit."""
    saved = get_vectors(model)  # exact fp32 copies: restoring them gives back the same values in any dtype
    zeros = {layer: torch.zeros_like(v) for layer, v in saved.items()}
    set_vectors(model, {**zeros, **vectors})  # a layer the model does not steer is set_vectors' error
    try:
        yield
    finally:
        set_vectors(model, saved)


@contextmanager
def steering_disabled(model: nn.Module) -> Iterator[None]:
    """Run the unsteered base inside the block, without reloading anything."""
    with model.disable_adapter():
        yield


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing that still gives the first steered layer a gradient.

    Reentrant checkpointing drops gradients when no *input* of a checkpointed block requires grad, which is the case
    for every layer up to the first steered one when the base is frozen. Non-reentrant checkpointing has no such
    restriction, so we always use it.
    """
    from steering import compat

    compat.enable_activation_checkpointing(model, {"use_reentrant": False})


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    step: int | None = None,
    training_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a steering checkpoint atomically (``steering.files.publish_dir``): a crash never leaves a directory that
    looks complete. ``steering.json`` is written last."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_checkpoint(out_dir):
        # Only ever replace an older checkpoint, never a directory holding other things (e.g. a run directory).
        raise CheckpointError(f"{str(out_dir)!r} exists and is not a steering checkpoint; refusing to replace it")
    if base_model is None:
        base_model = model.peft_config[ADAPTER_NAME].base_model_name_or_path
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_model
    with publish_dir(out_dir) as tmp:
        # save_embedding_layers=False: the embeddings are frozen, and "auto" would look the base up on the Hub.
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        write_meta(tmp, model, base_model=base_model, step=step, training_config=training_config, extra=extra)
    return out_dir


def write_meta(
    out_dir: str | os.PathLike,
    model: nn.Module,
    *,
    base_model: str | None,
    step: int | None = None,
    training_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``steering.json`` next to an ``adapter_model.safetensors`` already in ``out_dir``. What it records about
    the vectors is read back from that file (so it is right under DeepSpeed ZeRO-3 too, where the live parameters are
    shards); the model only gives its shape."""
    out_dir = Path(out_dir)
    weights = out_dir / ADAPTER_WEIGHTS_FILE
    if (out_dir / META_FILE).exists():
        raise CheckpointError(f"{out_dir / META_FILE} exists: remove it before rewriting the checkpoint")
    vectors = load_vectors(weights)
    num_layers, hidden = model_shape(model)
    meta = {
        "format_version": FORMAT_VERSION,
        # Checked on load: a tampered or corrupted weights file fails loudly instead of steering with garbage.
        "adapter_sha256": sha256_file(weights),
        "base_model": base_model,
        "model_type": model.config.model_type,
        "layers": sorted(vectors),
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "step": step,
        "vector_norms": {str(k): float(v.norm()) for k, v in vectors.items()},
        "training_config": dict(training_config) if training_config is not None else None,
    }
    if extra:
        meta.update(extra)
    write_json_atomic(out_dir / META_FILE, meta, indent=2, default=str)


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file() and (p / ADAPTER_WEIGHTS_FILE).is_file()


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {str(ckpt_dir)!r} does not exist")
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{str(ckpt_dir)!r} is not a complete steering checkpoint: {META_FILE} is missing (it is written last, so "
            "the save was interrupted or this is not a checkpoint)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} must hold a JSON object, not {json.dumps(meta)[:40]}")
    for key in ("layers", "hidden_size", "num_hidden_layers"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks the key {key!r}")
    _check_meta_shape(meta, meta_path)
    return meta


def _check_meta_shape(meta: Mapping[str, Any], meta_path: Path) -> None:
    """The shape ``steering.json`` declares: positive integer sizes, and layers a list of distinct in-range indices."""
    for key in ("hidden_size", "num_hidden_layers"):
        if not (type(meta[key]) is int and meta[key] > 0):
            raise CheckpointError(f"{meta_path}: {key} is {meta[key]!r}, not a positive integer")
    layers = meta["layers"]
    if not (isinstance(layers, list) and layers and all(type(layer) is int for layer in layers)):
        raise CheckpointError(f"{meta_path}: layers is {layers!r}, not a non-empty list of layer indices")
    if len(set(layers)) != len(layers) or not all(0 <= layer < meta["num_hidden_layers"] for layer in layers):
        raise CheckpointError(f"{meta_path}: layers {layers} are not distinct indices in 0..{meta['num_hidden_layers'] - 1} "
                              f"(num_hidden_layers {meta['num_hidden_layers']})")


def load_vectors(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """``{layer: (hidden_size,) fp32}`` from a checkpoint directory, an ``adapter_model.safetensors`` file, or a
    llama.cpp control-vector ``.gguf`` file (repeng, EasySteer, ``analysis export --to gguf``; its ``direction.N`` is
    layer ``N``: ``steering.gguf_vectors``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from steering import gguf_vectors

    path = Path(path)
    if gguf_vectors.is_control_vector_path(path) and not path.is_dir():
        try:
            return gguf_vectors.read_control_vector(path).vectors
        except gguf_vectors.ControlVectorError as e:
            raise CheckpointError(str(e)) from None
    file = path / ADAPTER_WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no steering vectors at {str(file)!r}")
    meta_path = file.parent / META_FILE
    meta = read_meta(file.parent) if meta_path.is_file() else None
    if meta is not None:
        expected = meta.get("adapter_sha256")
        if expected and sha256_file(file) != expected:
            raise CheckpointError(f"{str(file)!r} does not match the checksum in {META_FILE}: the file was tampered "
                                  "with or corrupted (truncated or tampered?)")
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{str(file)!r}: steering vectors load from .safetensors files only (never pickle)")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file (truncated or tampered?): {e}") from None
    out: dict[int, torch.Tensor] = {}
    for key, value in tensors.items():
        m = _KEY_RE.search(key)
        if m is None:
            raise CheckpointError(f"{str(file)!r} holds an unexpected tensor {key!r}; expected only BEFT down_proj biases")
        if value.dim() not in (1, 2) or (value.dim() == 2 and value.shape[0] != 1):
            raise CheckpointError(f"{key} in {str(file)!r} has shape {tuple(value.shape)}, expected (1, hidden_size)")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{key} in {str(file)!r} holds NaN or Inf")
        out[int(m.group(1))] = value.float().reshape(-1)
    if not out:
        raise CheckpointError(f"{str(file)!r} holds no steering vectors")
    if meta is not None and sorted(out) != sorted(meta["layers"]):
        raise CheckpointError(f"{str(file.parent)!r}: {META_FILE} lists layers {meta['layers']} but the safetensors "
                              f"file has {sorted(out)}")
    widths = sorted({v.numel() for v in out.values()})
    if meta is not None and widths != [meta["hidden_size"]]:
        raise CheckpointError(f"{str(file.parent)!r}: {META_FILE} says hidden_size {meta['hidden_size']} but the "
                              f"safetensors file holds vectors of width {widths}")
    return dict(sorted(out.items()))


def read_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """``(steering.json, vectors)`` of a checkpoint directory (:func:`load_vectors` checks that they agree)."""
    return read_meta(ckpt_dir), load_vectors(ckpt_dir)


def check_fits(vectors: Mapping[int, torch.Tensor], model: Any, source: str = "checkpoint", *,
               target: str = "the model", fix: str = "give vectors made for this model") -> None:
    """The one answer to "do these vectors fit this model?" (a model, a PeftModel, or a config, so it runs before any
    weights load): every layer index in range and every vector of the model's hidden size. Otherwise a one-line
    :class:`CheckpointError` naming both shapes and ending in ``fix``; ``source`` and ``target`` name the vectors and
    the model the way the caller's user knows them (``--checkpoint DIR``, ``init_from: PATH``, ``--model ID``)."""
    num_layers, hidden = model_shape(model)
    sizes = sorted({int(v.numel()) for v in vectors.values()})
    outside = [layer for layer in vectors if not 0 <= layer < num_layers]
    if sizes != [hidden] or outside:
        top = max(vectors) + 1 if vectors else 0
        raise CheckpointError(
            f"{source} does not fit {target}: it has vectors of hidden size {sizes} for layers {sorted(vectors)} "
            f"(needs >= {top} layers), but {target} has {num_layers} layers x hidden size {hidden}; {fix}"
        )


def load_steered_model(
    ckpt_dir: str | os.PathLike,
    base: nn.Module | str | None = None,
    *,
    dtype: str | torch.dtype = "bfloat16",
):
    """Load a checkpoint onto ``base`` (a model, a Hub id / directory, or None for the id recorded in the checkpoint).

    Checks the checkpoint's shapes against the model before touching it."""
    meta, vectors = read_checkpoint(ckpt_dir)
    if base is None:
        base = meta.get("base_model")
        if not base:
            raise CheckpointError(f"{str(ckpt_dir)!r} records no base model; pass the base model explicitly")
    base_id = base if isinstance(base, str) else base.config.name_or_path
    if isinstance(base, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base)
        check_supported(config)
        check_fits(vectors, config, source=f"checkpoint {str(ckpt_dir)!r}")  # before the weights load
        base = load_base_model(base, dtype=dtype)
    else:
        check_fits(vectors, base, source=f"checkpoint {str(ckpt_dir)!r}")
    model = attach_steering(base, layers=sorted(vectors), base_model_id=meta.get("base_model") or base_id)
    set_vectors(model, vectors)
    model.eval()
    return model
