"""Held-out validation accuracy during training, through the evaluation core (``steering.evaluation``): the same
generation path and the same reward check as ``python -m analysis evaluate``.

Problems are sharded across processes and the counts summed, so every rank returns the same accuracy."""

from __future__ import annotations

from typing import Any

import torch

from steering.evaluation import EvalSettings, as_problems, sample_and_score


class Validator:
    """The accuracy of one completion per held-out problem, evaluated with ``settings`` (its first seed; the
    training config's ``eval_settings()``)."""

    def __init__(self, rows: list[dict[str, str]], template: Any, tokenizer: Any, settings: EvalSettings, *,
                 stops: Any = None):
        self.rows = rows
        self.template = template
        self.tokenizer = tokenizer
        self.params = settings.sampling_params()
        self.batch_size = settings.batch_size
        self.seed = settings.seeds[0]
        self.timeout_s = settings.timeout_s
        self.options = settings.grading
        self.stops = stops if stops is not None else template.stops(tokenizer)  # where completions end
        self.problems = as_problems(rows)
        self.prompts = [template.render(p["question"], tokenizer) for p in self.problems]

    def correct(self, model: Any, indices: list[int]) -> list[bool]:
        """The verdict of one completion (seeded with ``seed``) of each problem in ``indices``."""
        if not indices:
            return []
        result = sample_and_score(model, self.tokenizer, [self.problems[i] for i in indices],
                                  [self.prompts[i] for i in indices], params=self.params,
                                  answer_format=self.template.answer_format, seed=self.seed,
                                  generation_seed=self.seed, batch_size=self.batch_size, timeout_s=self.timeout_s,
                                  options=self.options, stops=self.stops)
        return [row[0] for row in result.correct]

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
