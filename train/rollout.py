"""Fast rollouts for TRL's GRPOTrainer: a mixin that swaps the generation step for the static-cache backend.

Usage (the trainer module does this)::

    class SteeringGRPOTrainer(FastRolloutMixin, GRPOTrainer): ...

    # and the config (SteeringArguments, or the GRPOConfig subclass; the mixin reads either) gets
    rollout_backend: str = "hf"      # "hf" = TRL's own model.generate; "static" = steering.generation's static path
    rollout_compile: bool | None = None   # static path: torch.compile + CUDA graphs (None = on CUDA only)
    vllm_sync: str = "vectors"       # with use_vllm: "vectors" (ours) or "trl" (TRL's full merge-and-push sync)

What it changes, and what it does not:

* ``_generate_single_turn`` (TRL 1.16 contract: ``(completion_ids, logprobs_or_None)``, completions cut after the
  first EOS with the EOS kept): with ``rollout_backend == "static"`` and plain-text prompts, the rollout goes
  through ``model.generate(..., generation_config=self.generation_config, custom_generate=static_decode)``. It is
  TRL's own generation config (temperature, top-p, top-k, min-p, repetition penalty, EOS list, pad), so the
  logits processors, the EOS handling and the sampling are transformers' own; only the forward pass is the static
  KV-cache one. vLLM, continuous batching, multimodal prompts and ``rollout_backend == "hf"`` go to TRL unchanged.
* Log-probabilities: TRL >= 1.16 already scores completions through a fused, chunked LM head
  (``trl.trainer.utils.add_fused_lm_head``: tiles of the vocabulary projection, no ``(batch, seq, vocab)`` logits and
  no full-vocab log-softmax), so ``_get_per_token_logps_and_entropies`` is left alone. :func:`check_fused_logprobs`
  checks this at construction (a warning if not).
* vLLM: when ``use_vllm`` is on, the env var that makes the vLLM plugin (``steering.vllm_plugin``) serve bias-enabled
  Qwen2/Llama classes is set before the engine starts, and TRL's full-model weight sync (which cannot merge a BEFT
  bias into a bias-less ``down_proj``) is replaced by a vectors-only sync. Set ``vllm_sync = "trl"`` on the config to
  keep TRL's own.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from typing import Any

import torch

from steering.generation import check_backend, cut_at_eos, generate_ids, left_pad

__all__ = ["FastRolloutMixin", "check_fused_logprobs"]
logger = logging.getLogger(__name__)


class FastRolloutMixin:
    """Mix into a ``trl.GRPOTrainer`` subclass (before it in the bases)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        use_vllm = bool(getattr(training_args, "use_vllm", False))
        if use_vllm and self._rollout_option("rollout_backend", "hf", training_args) == "static":
            raise ValueError("rollout_backend='static' and use_vllm=True are exclusive: pick one generation path")
        if use_vllm and self._rollout_option("vllm_sync", "vectors", training_args) == "vectors":
            # Colocate mode builds the engine in this process (and its workers inherit the environment): the plugin
            # then registers the bias-enabled model classes under the Qwen2/Llama architecture names.
            from steering.vllm_plugin import PLUGIN_ENV, register

            os.environ.setdefault(PLUGIN_ENV, "1")
            if getattr(training_args, "vllm_mode", "colocate") == "colocate":
                # The entry point registers the classes in every vLLM process; registering here too covers an
                # install without the entry point (colocate builds the model in this process).
                try:
                    register()
                except ImportError:  # no vLLM: TRL raises its own clear error below
                    pass
        super().__init__(*args, **kwargs)
        check_backend(self._rollout_backend())
        if not check_fused_logprobs(self):
            logger.warning("TRL's fused LM head is not active on this model: per-token log-probs may materialise "
                           "full-vocabulary logits (TRL >= 1.16 adds it in GRPOTrainer.__init__)")
        self.rollout_stats: dict[str, float] = {"seconds": 0.0, "completion_tokens": 0, "calls": 0}
        if use_vllm and self._rollout_option("vllm_sync", "vectors") == "vectors":
            from steering.vllm_plugin import install_vectors_only_sync
            from steering.vectors import vector_parameters

            if vector_parameters(self.model):
                install_vectors_only_sync(self.vllm_generation, self.model, accelerator=self.accelerator)

    def _rollout_option(self, name: str, default: Any, training_args: Any = None) -> Any:
        """A rollout setting from the trainer's ``steering_args`` if it has the field, else from the TRL config."""
        for source in (getattr(self, "steering_args", None), training_args, getattr(self, "args", None)):
            if source is not None and hasattr(source, name):
                value = getattr(source, name)
                return default if value is None and default is not None else value
        return default

    def _rollout_backend(self) -> str:
        return self._rollout_option("rollout_backend", "hf") or "hf"

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        backend = self._rollout_backend()
        if (
            backend != "static"
            or getattr(self, "use_vllm", False)
            or getattr(self, "use_transformers_continuous_batching", False)
            or images is not None
            or multimodal_fields
        ):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        from trl.extras.profiling import profiling_context
        from trl.models import unwrap_model_for_generation

        device = self.accelerator.device
        input_ids, attention_mask = left_pad(prompt_ids, self._tokenizer.pad_token_id, device)
        dist = getattr(self, "_dist", None)
        summon = dist.summon_full_params(self.model_wrapped, recurse=False) if dist is not None else nullcontext()
        start = time.perf_counter()
        with (
            profiling_context(self, "static.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=getattr(self, "generation_kwargs", None),
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            summon,
        ):
            sequences = generate_ids(
                unwrapped_model,
                input_ids,
                attention_mask,
                self.generation_config,
                backend="static",
                compile=self._rollout_option("rollout_compile", None),
            )
        completion_ids, _ = cut_at_eos(sequences[:, input_ids.shape[1]:], self.eos_token_ids)
        self.rollout_stats["seconds"] += time.perf_counter() - start
        self.rollout_stats["completion_tokens"] += sum(len(c) for c in completion_ids)
        self.rollout_stats["calls"] += 1
        return completion_ids, None


def check_fused_logprobs(trainer: Any) -> bool:
    """True when the trainer's policy scores tokens through TRL's fused, chunked LM head (no full-vocab logits)."""
    try:
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:  # a TRL without the fused head
        return False
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    func = getattr(getattr(base, "forward", None), "__func__", None)
    # functools.wraps copies the name of the original forward; the code object keeps the patch's own name.
    return getattr(getattr(func, "__code__", None), "co_name", "") == "_fused_forward"
