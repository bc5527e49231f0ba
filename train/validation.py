"""Held-out validation accuracy during training: generate with the current model, score with the reward module.

Problems are sharded across processes and the counts summed, so every rank returns the same accuracy."""

from __future__ import annotations

from typing import Any

import torch


class Validator:
    def __init__(self, rows: list[dict[str, str]], template: Any, tokenizer: Any, *, max_new_tokens: int,
                 temperature: float = 0.0, batch_size: int = 64, seed: int = 0, timeout_s: float = 2.0,
                 options: Any = None):
        self.rows = rows
        self.template = template
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.seed = seed
        self.timeout_s = timeout_s
        self.options = options  # steering.rewards.GradingOptions; None: math-verify's defaults
        self.prompts = [template.render(r["question"], tokenizer) for r in rows]

    def correct(self, model: Any, indices: list[int]) -> list[bool]:
        from steering.generation import SamplingParams, generate
        from steering.rewards import score

        if not indices:
            return []
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                do_sample=self.temperature > 0)
        result = generate(model, self.tokenizer, [self.prompts[i] for i in indices], params,
                          batch_size=self.batch_size, seed=self.seed)
        texts = result.completions  # one row per prompt (num_return_sequences=1)
        return [score(t, self.rows[i]["answer"], self.template.answer_format, timeout_s=self.timeout_s,
                      options=self.options).correct for t, i in zip(texts, indices)]

    def accuracy(self, model: Any, accelerator: Any = None) -> float:
        rank = accelerator.process_index if accelerator is not None else 0
        world = accelerator.num_processes if accelerator is not None else 1
        mine = list(range(rank, len(self.rows), world))
        with torch.no_grad():
            hits = self.correct(model, mine)
        counts = torch.tensor([sum(hits), len(hits)], dtype=torch.float64,
                              device=accelerator.device if accelerator is not None else "cpu")
        if accelerator is not None and world > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")
