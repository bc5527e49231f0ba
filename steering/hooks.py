"""One vocabulary of hook points for reading and patching the residual stream (TransformerLens names).

Every analysis reads and patches the model through these names, so they all read alike::

    hook_embed                    output of the token embedding               (batch, seq, d_model)
    blocks.{l}.hook_resid_pre     input of decoder layer l                    (batch, seq, d_model)
    blocks.{l}.ln1.hook_normalized  input_layernorm output = what attention reads
    blocks.{l}.attn.hook_q        q_proj output, before RoPE                  (batch, seq, n_heads * d_head)
    blocks.{l}.attn.hook_k        k_proj output, before RoPE                  (batch, seq, n_kv_heads * d_head)
    blocks.{l}.attn.hook_v        v_proj output                               (batch, seq, n_kv_heads * d_head)
    blocks.{l}.attn.hook_z        per-head attention output, input of o_proj  (batch, seq, n_heads * d_head)
    blocks.{l}.hook_attn_out      self_attn output (after o_proj)
    blocks.{l}.hook_resid_mid     hook_resid_pre + hook_attn_out = input of post_attention_layernorm (replacing it
                                  changes what the MLP reads, not the residual carried past the MLP)
    blocks.{l}.ln2.hook_normalized  post_attention_layernorm output = what the MLP reads
    blocks.{l}.hook_mlp_out       MLP output, *including* the steering vector s_l (it is down_proj's bias)
    blocks.{l}.hook_resid_post    output of decoder layer l = hidden_states[l + 1]
    ln_final.hook_normalized      final norm output
    hook_logits                   lm_head output

A hook function takes ``(tensor, name)`` and returns a replacement tensor or None (keep). Works on a plain
Qwen2/Llama ``*ForCausalLM`` and on a PeftModel around one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from steering.vectors import add_to_hidden

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

# name pattern -> (path of the module under the decoder model, hook on its input ("pre") or output ("fwd"))
_LAYER_POINTS: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("", "pre"),
    "ln1.hook_normalized": ("input_layernorm", "fwd"),
    "attn.hook_q": ("self_attn.q_proj", "fwd"),
    "attn.hook_k": ("self_attn.k_proj", "fwd"),
    "attn.hook_v": ("self_attn.v_proj", "fwd"),
    "attn.hook_z": ("self_attn.o_proj", "pre"),
    "hook_attn_out": ("self_attn", "fwd"),
    "hook_resid_mid": ("post_attention_layernorm", "pre"),
    "ln2.hook_normalized": ("post_attention_layernorm", "fwd"),
    "hook_mlp_out": ("mlp", "fwd"),
    "hook_resid_post": ("", "fwd"),
}
_GLOBAL_POINTS: dict[str, tuple[str, str]] = {
    "hook_embed": ("model.embed_tokens", "fwd"),
    "ln_final.hook_normalized": ("model.norm", "fwd"),
    "hook_logits": ("lm_head", "fwd"),
}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PeftModel and/or a DDP wrapper (or the model itself)."""
    m = model
    for _ in range(4):
        if hasattr(m, "get_base_model") and callable(m.get_base_model):
            m = m.get_base_model()
        elif isinstance(getattr(m, "module", None), nn.Module):  # DistributedDataParallel
            m = m.module
        else:
            break
    return m


def num_layers(model: nn.Module) -> int:
    return int(causal_lm(model).config.num_hidden_layers)


def hook_point_names(model: nn.Module) -> list[str]:
    names = ["hook_embed"]
    for layer in range(num_layers(model)):
        names += [f"blocks.{layer}.{point}" for point in _LAYER_POINTS]
    return names + ["ln_final.hook_normalized", "hook_logits"]


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, "pre" | "fwd") for a hook point name; a clear error lists the valid names otherwise."""
    lm = causal_lm(model)
    if name in _GLOBAL_POINTS:
        path, kind = _GLOBAL_POINTS[name]
        return lm.get_submodule(path), kind
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_POINTS:
        layer = int(m.group(1))
        if not 0 <= layer < num_layers(model):
            raise ValueError(f"hook point {name!r}: layer {layer} out of range 0..{num_layers(model) - 1}")
        path, kind = _LAYER_POINTS[m.group(2)]
        block = lm.model.layers[layer]
        return (block.get_submodule(path) if path else block), kind
    raise ValueError(
        f"unknown hook point {name!r}; valid: hook_embed, blocks.{{l}}.({'|'.join(_LAYER_POINTS)}), "
        "ln_final.hook_normalized, hook_logits"
    )


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


@contextmanager
def hooks(model: nn.Module, fwd_hooks: Iterable[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach ``(name, fn)`` hooks for the duration of the block."""
    handles = []
    try:
        for name, fn in fwd_hooks:
            module, kind = resolve(model, name)
            if kind == "pre":
                def pre(mod, args, kwargs, _fn=fn, _name=name):
                    if args:
                        new = _fn(args[0], _name)
                        return None if new is None else ((new, *args[1:]), kwargs)
                    key = "hidden_states"
                    new = _fn(kwargs[key], _name)
                    return None if new is None else (args, {**kwargs, key: new})

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(mod, args, output, _fn=fn, _name=name):
                    new = _fn(_first(output), _name)
                    return None if new is None else _replace_first(output, new)

                handles.append(module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_hooks(model: nn.Module, *args: Any, fwd_hooks: Iterable[tuple[str, HookFn]], **kwargs: Any) -> Any:
    with hooks(model, fwd_hooks):
        return model(*args, **kwargs)


def run_with_cache(
    model: nn.Module,
    *args: Any,
    names: Iterable[str] | Callable[[str], bool],
    detach: bool = True,
    fwd_hooks: Iterable[tuple[str, HookFn]] = (),
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run the model and return ``(output, {name: activation})`` for the requested hook points.

    Activations are recorded after any patching hooks in ``fwd_hooks`` at the same point have run."""
    wanted = [n for n in hook_point_names(model) if names(n)] if callable(names) else list(names)
    cache: dict[str, torch.Tensor] = {}

    def save(t: torch.Tensor, name: str) -> None:
        cache[name] = t.detach() if detach else t

    with hooks(model, list(fwd_hooks) + [(n, save) for n in wanted]):
        out = model(*args, **kwargs)
    return out, cache


def add_at(vector: torch.Tensor, positions: torch.Tensor | None = None) -> HookFn:
    """Hook that adds ``vector`` (d_model) to a residual-shaped activation, at every position or where the boolean
    ``positions`` (batch, seq) mask is true, with the steering vector's numerics (``steering.vectors.add_to_hidden``:
    at ``blocks.{l}.hook_mlp_out`` it equals the checkpoint's vector bit for bit)."""

    def fn(t: torch.Tensor, name: str) -> torch.Tensor:
        return add_to_hidden(t, vector, positions)

    return fn


def replace_with(value: torch.Tensor) -> HookFn:
    """Hook that swaps the activation for a stored one of the same shape."""

    def fn(t: torch.Tensor, name: str) -> torch.Tensor:
        if value.shape != t.shape:
            raise ValueError(f"{name}: stored activation has shape {tuple(value.shape)}, live one {tuple(t.shape)}")
        return value.to(t.dtype).to(t.device)

    return fn


def patch_heads(value: torch.Tensor, heads: Iterable[int], head_dim: int) -> HookFn:
    """Hook that swaps the slices of the given heads (``[h * head_dim, (h + 1) * head_dim)`` on the last axis) for
    those of a stored activation; the other heads stay live. For q/z the heads are query heads, for k/v the grouped
    key/value heads (GQA)."""
    heads = sorted(set(heads))

    def fn(t: torch.Tensor, name: str) -> torch.Tensor:
        out = t.clone()
        for h in heads:
            sl = slice(h * head_dim, (h + 1) * head_dim)
            out[..., sl] = value[..., sl].to(t.dtype).to(t.device)
        return out

    return fn


def unembed(model: nn.Module, resid: torch.Tensor, *, apply_norm: bool = True) -> torch.Tensor:
    """Logit lens: final norm (optional) then lm_head, applied to a residual-stream vector or tensor."""
    lm = causal_lm(model)
    x = resid.to(lm.lm_head.weight.dtype)
    if apply_norm:
        x = lm.model.norm(x)
    return lm.lm_head(x)


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim)."""
    cfg = causal_lm(model).config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_heads, n_kv, head_dim
