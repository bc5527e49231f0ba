"""Adaptive token-wise scaling: each steering vector's magnitude varies per token, set by a small learned gate.

Plain steering adds the same ``s_l`` at every position. With token scaling, layer ``l`` adds ``α_l(t) · s_l`` at
token ``t``, where

    u_l(t) = x_l(t) / ‖x_l(t)‖                 x_l(t): the MLP input of layer l at token t (post_attention_layernorm
                                                output, i.e. what the steered MLP reads), normalised to unit L2 norm
    z_l(t) = w_l · u_l(t) + b_l                 w_l ∈ R^hidden, b_l ∈ R: the gate of layer l (fp32, trainable)
    α_l(t) = softplus(z_l(t)) / softplus(0)     > 0; exactly 1 when z = 0

``w_l`` and ``b_l`` start at zero, so ``α ≡ 1`` and a fresh gate is *exactly* plain steering (bit for bit), and the
gradient of ``α`` w.r.t. ``w_l`` at the start is ``0.72 · u_l(t)``, not zero, so the gate learns from step one.
``softplus`` keeps ``α`` positive and unbounded above, so magnitude can concentrate on a few tokens (tanh would cap it
at 2x). The unit-norm input makes the gate independent of the residual stream's scale, which differs across
models and layers. The vector and the gate share the magnitude (``α · s`` is invariant under ``s → c s``,
``α → α / c``); the analysis therefore reports ``α_l(t) · ‖s_l‖``.

Mechanics. The vector is still PEFT BEFT's bias on ``down_proj`` (so ``steering.vectors`` works unchanged and the
checkpoint stays a valid BEFT adapter). The gate is a real ``nn.Module`` registered as ``model.layers.{l}.mlp.
steering_gate`` (parameters ``...mlp.steering_gate.weight`` (hidden,) and ``.bias`` (1,)), and a forward hook on that
MLP adds the correction ``(α_l(t) − 1) · s_l``, so the MLP output carries ``α_l(t) · s_l`` in total. Gates are
saved to ``token_gates.safetensors`` in the checkpoint directory (safetensors only), and ``steering.json`` records
``"token_scaling": {...}`` (see :func:`checkpoint_extra`).

Limits: the gate is a hook, invisible to vLLM (train and sample with HF generation), and it needs the vectors to be
attached (:func:`steering.vectors.attach_steering`) first.

Training wiring (what ``train`` calls when ``token_scaling: true``)::

    model = sv.attach_steering(base, layers=..., init=...)
    gates = ts.attach_token_scaling(model)                   # after attach_steering, before the optimizer is built
    groups = sv.param_groups(model, lr, layer_lr) + ts.param_groups(model, lr)
    ...
    # SteeringGRPOTrainer.save_model, into the checkpoint directory transformers is writing:
    ts.save_token_gates(model, ckpt)                         # then steering.json, last:
    sv.write_meta(ckpt, model, ..., extra=ts.checkpoint_extra(model))
    ...
    ts.attach_token_scaling(model, init=ckpt)                # on resume (the gates live outside the PEFT adapter)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steering import vectors as sv
from steering.files import write_file_atomic

GATE_FILE = "token_gates.safetensors"
GATE_MODULE = "steering_gate"
FORMULA = "alpha_l(t) = softplus(w_l . x_l(t)/|x_l(t)| + b_l) / softplus(0); x_l(t) = MLP input of layer l"
_EPS = 1e-12


class TokenScalingError(sv.SteeringError):
    """Bad use of token scaling (no vectors attached, gates missing from a checkpoint, shape mismatch)."""


def _softplus0() -> torch.Tensor:
    return F.softplus(torch.zeros((), dtype=torch.float32))


class TokenGate(nn.Module):
    """The gate of one layer: ``α(t) = softplus(w · x(t)/‖x(t)‖ + b) / softplus(0)``, zero-initialised (α ≡ 1)."""

    def __init__(self, hidden_size: int, layer: int):
        super().__init__()
        self.layer = int(layer)
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.fixed: float | None = None  # set (e.g. by fixed_alpha) to force α ≡ fixed
        self._record: list[torch.Tensor] | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        u = x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        return u @ self.weight + self.bias

    def alpha_minus_one(self, x: torch.Tensor) -> torch.Tensor:
        """``α(t) − 1`` with shape ``x.shape[:-1]``, computed so that it is exactly 0 when ``z = 0``."""
        if self.fixed is not None:
            return torch.full(x.shape[:-1], float(self.fixed) - 1.0, dtype=torch.float32, device=x.device)
        c = _softplus0().to(x.device)
        return (F.softplus(self.logits(x)) - c) / c

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha_minus_one(x) + 1.0

    def extra_repr(self) -> str:
        return f"layer={self.layer}, hidden_size={self.weight.numel()}"


def _mlp(model: nn.Module, layer: int) -> nn.Module:
    from steering.hooks import causal_lm

    return causal_lm(model).model.layers[layer].mlp


def gates(model: nn.Module) -> dict[int, TokenGate]:
    """``{layer: gate}`` of a model with token scaling attached (empty if none)."""
    from steering.hooks import causal_lm

    out = {}
    for layer, block in enumerate(causal_lm(model).model.layers):
        gate = getattr(block.mlp, GATE_MODULE, None)
        if isinstance(gate, TokenGate):
            out[layer] = gate
    return out


def has_token_scaling(model: nn.Module) -> bool:
    return bool(gates(model))


def _make_hook(gate: TokenGate, vector: nn.Parameter, down_proj: nn.Module):
    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if getattr(down_proj, "disable_adapters", False):  # steering_disabled(): no vector, so no scaling either
            return None
        x = args[0] if args else None
        if x is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        am1 = gate.alpha_minus_one(x)
        if gate._record is not None:
            gate._record.append((am1 + 1.0).detach())
        new = sv.add_to_hidden(out, vector.reshape(-1), am1)  # (alpha - 1) * s_l on top of BEFT's + s_l
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def attach_token_scaling(model: nn.Module, layers: Iterable[int] | None = None,
                         init: str | os.PathLike | None = None) -> dict[int, TokenGate]:
    """Give every steered layer (or ``layers``, a subset of them) a zero-initialised gate; returns ``{layer: gate}``.

    ``model`` must already have steering vectors (:func:`steering.vectors.attach_steering`). The gate parameters are
    trainable fp32 parameters of the model. ``init``: a checkpoint directory whose gates to load."""
    params = sv.vector_parameters(model)
    if not params:
        raise TokenScalingError("token scaling needs steering vectors: call steering.vectors.attach_steering first")
    if has_token_scaling(model):
        raise RuntimeError("token scaling is already attached to this model")  # a caller's bug, not bad input
    layers = sorted(params) if layers is None else sorted(set(int(layer) for layer in layers))
    missing = [layer for layer in layers if layer not in params]
    if missing:
        raise TokenScalingError(f"layers {missing} have no steering vector (steered: {sorted(params)})")
    _, hidden = sv.model_shape(model)
    out: dict[int, TokenGate] = {}
    for layer in layers:
        mlp = _mlp(model, layer)
        vector = params[layer]
        gate = TokenGate(hidden, layer).to(vector.device)
        mlp.add_module(GATE_MODULE, gate)
        gate._handle = mlp.register_forward_hook(_make_hook(gate, vector, mlp.down_proj))
        out[layer] = gate
    if init is not None:
        load_token_gates(model, init)
    return out


def detach_token_scaling(model: nn.Module) -> None:
    """Remove every gate and its hook (the model is plain steering again)."""
    for layer, gate in gates(model).items():
        handle = getattr(gate, "_handle", None)
        if handle is not None:
            handle.remove()
        delattr(_mlp(model, layer), GATE_MODULE)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for g in gates(model).values() for p in (g.weight, g.bias)]


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """One optimizer parameter group holding every gate parameter (append it to the vectors' groups)."""
    params = gate_parameters(model)
    return [{"params": params, "lr": float(lr), "weight_decay": weight_decay, "name": "token_gates"}] if params else []


def gate_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"layers.{layer}.{GATE_MODULE}.{name}": getattr(g, name).detach().float().cpu().contiguous()
            for layer, g in gates(model).items() for name in ("weight", "bias")}


def checkpoint_extra(model: nn.Module) -> dict[str, Any]:
    """What to pass as ``extra=`` to :func:`steering.vectors.save_checkpoint` so ``steering.json`` records the gates."""
    return {"token_scaling": {"file": GATE_FILE, "layers": sorted(gates(model)), "formula": FORMULA}}


def save_token_gates(model: nn.Module, ckpt_dir: str | os.PathLike) -> Path:
    """Write the gates to ``ckpt_dir/token_gates.safetensors`` (atomically: temporary file, then rename)."""
    from safetensors.torch import save_file

    state = gate_state(model)
    if not state:
        raise TokenScalingError("this model has no token-scaling gates to save")
    return write_file_atomic(Path(ckpt_dir) / GATE_FILE,
                             lambda tmp: save_file(state, str(tmp), metadata={"formula": FORMULA, "format_version": "1"}))


def checkpoint_has_gates(ckpt_dir: str | os.PathLike) -> bool:
    return (Path(ckpt_dir) / GATE_FILE).is_file()


def load_gate_tensors(ckpt_dir: str | os.PathLike) -> dict[int, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / GATE_FILE if Path(ckpt_dir).is_dir() else Path(ckpt_dir)
    if not path.is_file():
        raise TokenScalingError(f"{str(ckpt_dir)!r} has no {GATE_FILE}: it is not a token-scaling checkpoint")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TokenScalingError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or parts[2] != GATE_MODULE or parts[3] not in ("weight", "bias"):
            raise TokenScalingError(f"{str(path)!r} holds an unexpected tensor {key!r}")
        if not torch.isfinite(value).all():
            raise TokenScalingError(f"{key} in {str(path)!r} holds NaN or Inf")
        out.setdefault(int(parts[1]), {})[parts[3]] = value.float()
    return dict(sorted(out.items()))


def check_gates_fit(tensors: dict[int, dict[str, torch.Tensor]], hidden_size: int, layers: Iterable[int],
                    ckpt_dir: str | os.PathLike, what: str) -> None:
    """Gate tensors (:func:`load_gate_tensors`) that fit a model of ``hidden_size`` whose gateable ``layers`` are
    given: a weight ``(hidden_size,)`` and a bias ``(1,)`` per layer, on those layers only. Shared by the load and by
    the checks made against a base's config.json before any weights load."""
    layers = sorted(layers)
    unknown = sorted(set(tensors) - set(layers))
    if unknown:
        raise TokenScalingError(f"{str(ckpt_dir)!r} has gates for layers {unknown}, not among {what} {layers}")
    for layer, state in tensors.items():
        if set(state) != {"weight", "bias"} or state["weight"].numel() != hidden_size or state["bias"].numel() != 1:
            raise TokenScalingError(f"{str(ckpt_dir)!r}: gate of layer {layer} has shapes "
                                    f"{ {k: tuple(v.shape) for k, v in state.items()} }, expected weight "
                                    f"({hidden_size},) and bias (1,)")


@torch.no_grad()
def load_token_gates(model: nn.Module, ckpt_dir: str | os.PathLike) -> None:
    """Copy the gates of a checkpoint into a model (attaching gates for its layers first if the model has none)."""
    tensors = load_gate_tensors(ckpt_dir)
    if not has_token_scaling(model):
        attach_token_scaling(model, layers=sorted(tensors))
    live = gates(model)
    check_gates_fit(tensors, sv.model_shape(model)[1], live, ckpt_dir, "the model's gated layers")
    for layer, state in tensors.items():
        live[layer].weight.copy_(state["weight"].reshape(-1))
        live[layer].bias.copy_(state["bias"].reshape(-1))


def load_token_scaled_model(ckpt_dir: str | os.PathLike, base: nn.Module | str | None = None, *,
                            dtype: str | torch.dtype = "bfloat16"):
    """:func:`steering.vectors.load_steered_model` plus the checkpoint's gates."""
    model = sv.load_steered_model(ckpt_dir, base, dtype=dtype)
    load_token_gates(model, ckpt_dir)
    model.eval()
    return model


@contextmanager
def fixed_alpha(model: nn.Module, value: float = 1.0) -> Iterator[None]:
    """Force ``α ≡ value`` in every gate inside the block (``value=1`` is exactly plain steering)."""
    live = gates(model)
    saved = {layer: g.fixed for layer, g in live.items()}
    try:
        for g in live.values():
            g.fixed = float(value)
        yield
    finally:
        for layer, g in live.items():
            g.fixed = saved[layer]


@contextmanager
def record_alphas(model: nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record ``α_l(t)`` of every forward pass inside the block: ``{layer: [tensor (batch, seq), ...]}``."""
    live = gates(model)
    records: dict[int, list[torch.Tensor]] = {layer: [] for layer in live}
    try:
        for layer, g in live.items():
            g._record = records[layer]
        yield records
    finally:
        for g in live.values():
            g._record = None
