"""Rollouts for TRL's ``GRPOTrainer`` through its public ``rollout_func`` argument: the static KV-cache path, and the
transformers path whenever the template has stop strings.

``rollout_backend: static`` (or a template with stop strings, e.g. ``r1``'s ``</answer>``) passes
``rollout_func=Rollouts(...)`` to the trainer. TRL then hands it each process's prompts (already repeated
``num_generations`` times by TRL's sampler) and the trainer, and takes back the prompt and completion token ids. The
rollout is ``model.generate(..., generation_config=trainer.generation_config)`` (with transformers' static KV cache for
the static backend): TRL's own generation config (temperature, top-p, top-k, min-p, repetition penalty, EOS list,
pad), so the logits processors, the EOS handling and the sampling are transformers' own. The template's stop strings
are added as transformers' ``StopStringCriteria``, which needs the tokenizer that TRL's own ``generate`` call does not
pass: the reason the transformers path goes through here when there are stop strings. Completions are
cut by ``steering.generation.end_completions`` (after the first EOS or the first token completing a stop string, kept),
so nothing after the template's end is scored or trained on. Prompts are tokenised exactly as TRL tokenises text
prompts. TRL computes the log-probabilities itself (``logprobs: None``).

Supported: text prompts, one process, DDP and DeepSpeed (ZeRO-3 parameters are gathered for generation by TRL's
``unwrap_model_for_generation``). Not supported (clear error): FSDP, vLLM (``use_vllm`` is its own rollout path; the
template's stops reach vLLM through ``generation_kwargs``, see ``train/__main__.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from steering import compat
from steering.generation import check_backend, end_completions, generate_ids, left_pad

__all__ = ["Rollouts"]


class Rollouts:
    """A TRL ``rollout_func``: ``(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs"}``.

    ``backend``: ``"static"`` or ``"hf"`` (``steering.generation``); ``stop_strings``: the template's.
    ``stats`` accumulates wall time, completion tokens and calls (the benchmark reads them)."""

    def __init__(self, backend: str = "static", stop_strings: Sequence[str] = (), compile: bool | None = None):
        self.backend = check_backend(backend)
        self.stop_strings = list(stop_strings)
        self.compile = compile
        self.stats: dict[str, float] = {"seconds": 0.0, "completion_tokens": 0, "calls": 0}

    def __call__(self, prompts: list, trainer: Any) -> dict[str, Any]:
        from trl.models import unwrap_model_for_generation

        if trainer.is_fsdp_enabled:
            raise ValueError(f"rollouts through steering.generation ({self.backend!r}) do not support FSDP; use "
                             "DeepSpeed or DDP")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("rollouts through steering.generation need text prompts (the templates render them)")
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
            sequences = generate_ids(model, input_ids, attention_mask, trainer.generation_config, backend=self.backend,
                                     compile=self.compile, stop_strings=self.stop_strings, tokenizer=tokenizer)
        completion_ids, _ = end_completions(sequences[:, input_ids.shape[1]:], trainer.eos_token_ids,
                                            self.stop_strings, tokenizer)
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["completion_tokens"] += sum(len(c) for c in completion_ids)
        self.stats["calls"] += 1
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}
