"""vLLM support: the steering vectors as real ``down_proj`` biases inside vLLM, and a vectors-only weight sync.

Why: TRL's vLLM weight sync pushes parameters by name, and for a PeftModel it first merges the adapters. A BEFT
vector cannot merge into Qwen2/Llama's bias-less ``down_proj`` (PEFT raises), and a hook-based vector would be
invisible to vLLM (rollouts would silently come from the unsteered model). So vLLM must serve a model whose
``model.layers.{l}.mlp.down_proj`` *has* a bias, and the trainer must push the vectors into it.

Two pieces:

1. A vLLM general plugin (entry point group ``vllm.general_plugins``, function :func:`register`). It registers
   ``SteeringQwen2ForCausalLM`` and ``SteeringLlamaForCausalLM``: vLLM's own Qwen2/Llama classes with a zero bias
   added to every ``down_proj`` (a ``RowParallelLinear``; vLLM adds the bias once, after the tensor-parallel reduce).
   The bias is named ``model.layers.{l}.mlp.down_proj.bias`` and is loadable by name like any vLLM weight.
   With ``STEERING_VLLM=1`` in the environment the plugin also registers them under the stock names
   ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``, so an unmodified checkpoint (and TRL's ``LLM(model=...)``) picks
   them up; without it, select them with ``hf_overrides={"architectures": ["SteeringQwen2ForCausalLM"]}``.
   A checkpoint has no such bias, so the classes report the biases as loaded (zero) on the first load.
2. :class:`VectorsOnlySync`: a replacement for ``trl``'s ``VLLMGeneration.sync_weights`` (installed on the
   instance by :func:`install_vectors_only_sync`; nothing installed is patched). The first sync pushes the frozen base
   (names mapped exactly as TRL maps them) plus the vectors; after that only the vectors, ``num_layers`` tensors of
   ``hidden_size`` floats. If vLLM's sleep mode (level 2) dropped the weights, the next sync is full again.

This module imports without vLLM: everything but the vLLM model classes is plain torch, and is tested on CPU against
the HF model (``tests/test_vllm_plugin.py``). The model classes are built on first attribute access.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from steering import compat

PLUGIN_ENV = "STEERING_VLLM"
# Our class name -> (stock vLLM architecture name, module of vLLM's implementation).
STEERING_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "SteeringQwen2ForCausalLM": ("Qwen2ForCausalLM", "vllm.model_executor.models.qwen2"),
    "SteeringLlamaForCausalLM": ("LlamaForCausalLM", "vllm.model_executor.models.llama"),
}
# HF model_type -> our class name.
ARCHITECTURE_OF_MODEL_TYPE = {"qwen2": "SteeringQwen2ForCausalLM", "llama": "SteeringLlamaForCausalLM"}

_DOWN_PROJ_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")
_BEFT_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj\.beft_bias\.[^.]+$")
_PEFT_MARKER = "beft_"


# --------------------------------------------------------------------------------------------------------------------
# Names


def architecture_for(model_type: str | None) -> str:
    """The plugin's class name for an HF ``model_type`` (ValueError naming the supported families otherwise)."""
    if model_type not in ARCHITECTURE_OF_MODEL_TYPE:
        raise ValueError(f"vLLM steering serves model types {sorted(ARCHITECTURE_OF_MODEL_TYPE)}; this model is "
                         f"{model_type!r}")
    return ARCHITECTURE_OF_MODEL_TYPE[model_type]


def configured_vector_weights(hf_config: Any) -> list[tuple[str, torch.Tensor]]:
    """The vectors that ``hf_overrides`` asked an engine to serve (``steering.vllm_engine.steering_overrides``), as
    ``(vLLM name, tensor x scale)``; none asked: ``[]``."""
    from steering.vllm_engine import SCALE_KEY, VECTORS_KEY
    from steering.vectors import load_vectors

    settings = hf_config.to_dict()
    path = settings.get(VECTORS_KEY)
    if path is None:
        return []
    scale = float(settings.get(SCALE_KEY, 1.0))
    return [(vllm_bias_name(layer), v.reshape(-1).float() * scale) for layer, v in load_vectors(path).items()]


def vllm_bias_name(layer: int) -> str:
    """vLLM (and HF) name of layer ``layer``'s steering bias."""
    return f"model.layers.{int(layer)}.mlp.down_proj.bias"


def vllm_name(name: str) -> str | None:
    """vLLM parameter name for a trainer-side parameter name, or None if vLLM has no such parameter.

    * a BEFT vector ``...layers.{l}.mlp.down_proj.beft_bias.<adapter>`` -> ``model.layers.{l}.mlp.down_proj.bias``;
    * another PEFT adapter parameter -> None;
    * a base parameter -> its name with the PeftModel/FSDP/checkpoint wrappers removed, the rules of TRL's
      ``VLLMGeneration._iter_named_params`` (``base_model.model.`` prefix, ``.base_layer``, ``modules_to_save``).
    """
    m = _BEFT_RE.search(name)
    if m is not None:
        return vllm_bias_name(int(m.group(1)))
    for prefix in ("module.", "_orig_mod."):
        name = name.removeprefix(prefix)
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if _PEFT_MARKER in name or "original_module" in name:
        return None
    for wrapper in ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "modules_to_save.default."):
        name = name.replace(wrapper, "")
    return name


def _vector_params(model: nn.Module) -> dict[int, nn.Parameter]:
    from steering.vectors import vector_parameters

    return vector_parameters(model)


def vector_weights(model: nn.Module, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """``[(vllm name, (hidden_size,) tensor)]`` for every steering vector: what a vectors-only sync sends."""
    out = []
    for layer, p in _vector_params(model).items():
        t = p.detach().reshape(-1)
        out.append((vllm_bias_name(layer), t if dtype is None else t.to(dtype)))
    return out


def full_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base parameter under its vLLM name, then the vectors as biases: what the first sync sends."""
    seen: set[str] = set()
    for name, p in model.named_parameters():
        if _BEFT_RE.search(name):
            continue
        mapped = vllm_name(name)
        if mapped is None or mapped in seen:
            continue
        seen.add(mapped)
        yield mapped, p.detach()
    yield from vector_weights(model)


# --------------------------------------------------------------------------------------------------------------------
# Bias-enabled down_proj (vLLM model classes, and the same surgery on an HF model for tests)


def add_down_proj_bias(
    model: nn.Module, set_attrs: Callable[[nn.Parameter, nn.Module], None] | None = None
) -> list[str]:
    """Give every ``layers.{l}.mlp.down_proj`` without a bias a zero bias parameter; return the new parameter names.

    Works on vLLM's ``RowParallelLinear`` (``output_size``/``params_dtype``) and on ``nn.Linear``. ``set_attrs``
    attaches loader attributes (vLLM: ``output_dim`` and the layer's ``weight_loader``)."""
    names = []
    for name, module in model.named_modules():
        if not _DOWN_PROJ_RE.search(name):
            continue
        if getattr(module, "bias", None) is not None:
            continue
        weight = getattr(module, "weight", None)
        size = getattr(module, "output_size", None) or getattr(module, "out_features", None)
        if size is None:
            if weight is None:
                raise TypeError(f"{name}: cannot tell the output size of {type(module).__name__}")
            size = weight.shape[0]
        dtype = getattr(module, "params_dtype", None) or (weight.dtype if weight is not None else torch.float32)
        device = weight.device if weight is not None else None
        bias = nn.Parameter(torch.zeros(int(size), dtype=dtype, device=device), requires_grad=False)
        module.bias = bias
        if set_attrs is not None:
            set_attrs(bias, module)
        names.append(f"{name}.bias")
    return names


def _build_vllm_class(our_name: str) -> type:
    arch, module_name = STEERING_ARCHITECTURES[our_name]
    base_cls = getattr(importlib.import_module(module_name), arch)
    from vllm.model_executor.utils import set_weight_attrs

    def set_attrs(param: nn.Parameter, layer: nn.Module) -> None:
        # Exactly what RowParallelLinear(bias=True) does for its own bias.
        set_weight_attrs(param, {"output_dim": 0, "weight_loader": layer.weight_loader})

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        base_cls.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.steering_bias_names = set(add_down_proj_bias(self, set_attrs))
        self.steering_vectors = configured_vector_weights(vllm_config.model_config.hf_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The checkpoint's vectors (if the engine was asked for any) load after the base, like any named weight.
        vectors, self.steering_vectors = self.steering_vectors, []
        loaded = base_cls.load_weights(self, itertools.chain(weights, vectors))
        if loaded is None:
            return loaded
        # The checkpoint has no down_proj bias: the zeros we created are its value, so report them as loaded
        # (vLLM's loader otherwise refuses parameters a checkpoint did not initialise).
        return set(loaded) | self.steering_bias_names

    return type(our_name, (base_cls,), {"__init__": __init__, "load_weights": load_weights,
                                         "__module__": __name__, "__qualname__": our_name})


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:  # PEP 562: the vLLM classes exist only where vLLM does
    if name in STEERING_ARCHITECTURES:
        if name not in _CLASSES:
            _CLASSES[name] = _build_vllm_class(name)
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def override_enabled() -> bool:
    return os.environ.get(PLUGIN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def prepare_engine_processes(vllm_mode: str) -> None:
    """Before TRL builds its vLLM engine (``LLM(model=...)``, no way to pass ``hf_overrides``): make it build the
    bias-enabled classes under the stock architecture names. Colocate mode builds the engine in this process, so
    registering here is enough; server mode's engine is another process, started with ``STEERING_VLLM=1``
    (docs/vllm.md)."""
    if vllm_mode == "colocate":
        register(override_stock=True)


def register(override_stock: bool | None = None) -> None:
    """vLLM general-plugin entry point: register the bias-enabled classes (lazily, by import path); also under the
    stock names when ``override_stock`` (default: ``STEERING_VLLM=1`` in the environment, for ``trl vllm-serve``)."""
    from vllm import ModelRegistry

    if override_stock is None:
        override_stock = override_enabled()
    for our_name, (arch, _) in STEERING_ARCHITECTURES.items():
        ModelRegistry.register_model(our_name, f"{__name__}:{our_name}")
        if override_stock:
            ModelRegistry.register_model(arch, f"{__name__}:{our_name}")


def engine_serves(vllm_generation: Any, model_id: str, revision: str | None) -> bool:
    """Whether TRL's colocated engine loaded ``model_id`` at ``revision`` (the trainer's base): then its weights
    equal the trainer's frozen base and only the vectors need pushing."""
    engine_model = vllm_generation.llm.llm_engine.model_config

    def default_branch(rev: str | None) -> str:
        return rev or "main"

    return engine_model.model == str(model_id) and default_branch(engine_model.revision) == default_branch(revision)


class SteeringWorkerExtension:
    """Methods vLLM mixes into its workers (``LLM(worker_extension_cls=...)``), called by name through
    ``llm.collective_rpc`` (no function is pickled, so this works with vLLM's engine in another process).

    ``self`` is vLLM's worker; ``self.model_runner.model`` is the model it serves (vLLM's own public worker
    extension pattern, as TRL's ``vllm-serve`` uses)."""

    def steering_vectors(self) -> dict[int, list[float]]:
        """``{layer: bias}`` of every steered ``down_proj``, as fp32 lists (read back what the engine adds)."""
        out = {}
        for name, param in self.model_runner.model.named_parameters():
            m = _DOWN_PROJ_RE.search(name.removesuffix(".bias"))
            if m is not None and name.endswith(".bias"):
                out[int(m.group(1))] = param.detach().float().cpu().reshape(-1).tolist()
        return out

    def load_steering_vectors(self, vectors: dict[int, list[float]]) -> None:
        """Set the ``down_proj`` biases to ``vectors`` (``{layer: values}``) through the model's ``load_weights``."""
        weights = [(vllm_bias_name(layer), torch.tensor(v, dtype=torch.float32)) for layer, v in vectors.items()]
        self.model_runner.model.load_weights(weights)


WORKER_EXTENSION = f"{__name__}.SteeringWorkerExtension"


# --------------------------------------------------------------------------------------------------------------------
# Vectors-only sync for TRL's VLLMGeneration


class VectorsOnlySync:
    """Callable that replaces ``VLLMGeneration.sync_weights``: full first push, then the vectors only.

    Works in TRL's ``colocate`` mode (``llm...model_runner.model.load_weights``) and ``server`` mode
    (``vllm_client.update_named_params``, on the main process). ``history`` records ``(full, names)`` per sync.
    """

    def __init__(self, vllm_generation: Any, model: nn.Module, *, full_first: bool = True, accelerator: Any = None):
        if not _vector_params(model):
            raise ValueError("VectorsOnlySync needs a model with steering vectors (BEFT biases on down_proj)")
        self.vg = vllm_generation
        self.model = model
        self.accelerator = accelerator if accelerator is not None else vllm_generation.accelerator
        self.full_pending = bool(full_first)
        self.history: list[tuple[bool, list[str]]] = []

    def entries(self, full: bool) -> list[tuple[str, torch.Tensor]]:
        return list(full_weights(self.model)) if full else vector_weights(self.model)

    def _gather(self, full: bool):
        if self.accelerator is None:
            return nullcontext()
        params = list(self.model.parameters()) if full else list(_vector_params(self.model).values())
        return compat.gather_params(self.accelerator, params)

    def __call__(self) -> None:
        vg = self.vg
        mode = vg.mode
        full = self.full_pending
        if mode == "colocate" and vg.enable_sleep_mode:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            vg.llm.wake_up(tags=["weights"])
            # Sleep level 2 discards the weights: waking up maps empty memory, so everything must be pushed.
            full = full or compat.vllm_weights_sleeping(vg)
            compat.mark_vllm_weights_awake(vg)
        is_main = self.accelerator is None or self.accelerator.is_main_process
        with self._gather(full):
            entries = self.entries(full)
            if mode == "server":
                if is_main:
                    metadata = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in entries]
                    vg.vllm_client.update_named_params(metadata, iter(entries))
            elif mode == "colocate":
                compat.colocated_vllm_model(vg).load_weights(entries)
            else:
                raise ValueError(f"unknown vLLM mode {mode!r}")
        if mode == "server" and is_main:
            vg.vllm_client.reset_prefix_cache()
        elif mode == "colocate":
            vg.llm.reset_prefix_cache()
        self.history.append((full, [n for n, _ in entries]))
        self.full_pending = False


def install_vectors_only_sync(vllm_generation: Any, model: nn.Module, **kwargs: Any) -> VectorsOnlySync:
    """Replace ``vllm_generation.sync_weights`` (an instance attribute; the class is untouched) by a vectors-only sync."""
    sync = VectorsOnlySync(vllm_generation, model, **kwargs)
    vllm_generation.sync_weights = sync
    return sync
