"""Static-KV-cache rollouts for TRL's ``GRPOTrainer``, through its public ``rollout_func`` argument.

``rollout_backend: static`` passes ``rollout_func=StaticRollouts(...)`` to the trainer. TRL then hands it each
process's prompts (already repeated ``num_generations`` times by TRL's sampler) and the trainer, and takes back the
prompt and completion token ids. The rollout is ``model.generate(..., generation_config=trainer.generation_config,
custom_generate=static_decode)``: TRL's own generation config (temperature, top-p, top-k, min-p, repetition penalty,
EOS list, pad), so the logits processors, the EOS handling and the sampling are transformers' own, and only the
forward pass is the static KV-cache one (``steering.generation``). Prompts are tokenised exactly as TRL tokenises text
prompts, and completions are cut after the first EOS (kept), as TRL cuts its own. TRL computes the log-probabilities
itself (``logprobs: None``).

Supported: text prompts, one process, DDP and DeepSpeed (ZeRO-3 parameters are gathered for generation by TRL's
``unwrap_model_for_generation``). Not supported (clear error): FSDP, vLLM (``use_vllm`` is its own rollout path).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from steering import compat
from steering.generation import cut_at_eos, generate_ids, left_pad

__all__ = ["StaticRollouts"]


class StaticRollouts:
    """A TRL ``rollout_func``: ``(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs"}``.

    ``stats`` accumulates wall time, completion tokens and calls (the benchmark reads them)."""

    def __init__(self, compile: bool | None = None):
        self.compile = compile
        self.stats: dict[str, float] = {"seconds": 0.0, "completion_tokens": 0, "calls": 0}

    def __call__(self, prompts: list, trainer: Any) -> dict[str, Any]:
        from trl.models import unwrap_model_for_generation

        if trainer.is_fsdp_enabled:
            raise ValueError("rollout_backend: static does not support FSDP; use rollout_backend: hf (or DeepSpeed)")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("rollout_backend: static needs text prompts (the templates render them); conversational "
                             "prompts go through rollout_backend: hf")
        tokenizer = trainer.processing_class
        prompt_ids = tokenizer(text=prompts)["input_ids"]  # exactly how TRL tokenises text prompts
        input_ids, attention_mask = left_pad(prompt_ids, tokenizer.pad_token_id, trainer.accelerator.device)
        args = trainer.args
        start = time.perf_counter()
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                generation_kwargs=trainer.generation_kwargs,
                gradient_checkpointing_kwargs=getattr(args, compat.training_arg_name("gradient_checkpointing_kwargs")),
            ) as model,
            torch.no_grad(),
        ):
            sequences = generate_ids(model, input_ids, attention_mask, trainer.generation_config, backend="static",
                                     compile=self.compile)
        completion_ids, _ = cut_at_eos(sequences[:, input_ids.shape[1]:], trainer.eos_token_ids)
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["completion_tokens"] += sum(len(c) for c in completion_ids)
        self.stats["calls"] += 1
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}
