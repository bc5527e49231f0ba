"""Probes: the papers' analyses, cheap enough to run inside the training loop (``probe_steps: N``).

Every N optimizer steps, with the vectors as they are at that step, :class:`ProbeCallback` measures

- per layer: the vector's norm, its cosine to its value at the previous probe and at the start of training (a layer
  that starts at zero: to its value at the first probe; a resumed run: at the step it resumed from, as the earlier
  vectors are not kept), and to the reference vectors of ``probe_vectors``;
- the logit lens of each vector: top / bottom tokens and their non-English share (``steering.readout.vector_lens``,
  what ``analysis logit-lens`` reports);
- on the probe batch (the first ``probe_size`` validation problems, drawn once): the tokens whose probability right
  after the prompt gains most with the vectors on over the base, and the KL between the two next-token distributions
  there (``steering.readout.first_token_gain``, what ``analysis first-token --layers all`` reports).

One ``{"event": "probe"}`` line per probe goes to ``metrics.jsonl`` (flat ``probe/...`` numbers plus the ``lens`` and
``first_token`` blocks, as the analysis commands write them), the numbers and a table of tokens to W&B when it is on,
and ``train.plots.plot_probes`` draws ``probes_*.png`` at the end. The probe problems are written to
``output_dir/probe_problems.jsonl``, so ``analysis first-token --benchmarks RUN/probe_problems.jsonl`` repeats a
probe on a checkpoint.

Probes never change training: they run under ``torch.no_grad`` in eval mode, inside ``torch.random.fork_rng`` (no
random number is drawn anyway: the batch is the first rows, the passes are deterministic forwards), and set back the
exact fp32 values of the vectors after the base pass (made once: the frozen base's logits on the probe batch are kept
for the later probes). They run on the main process only, on the unwrapped model, with
no collective operation: under DDP the other ranks go on to the next step and wait at its first collective (the
rollouts' gather) for rank 0 to finish, at no other cost.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from steering import vectors as sv
from steering.readout import cosine
from steering.files import write_text_atomic
from steering.readout import Vocab, first_token_gain, vector_lens
from train.trainer import write_metrics_line

logger = logging.getLogger(__name__)

PROBLEMS_FILE = "probe_problems.jsonl"


def vector_stats(vectors: Mapping[int, torch.Tensor], start: Mapping[int, torch.Tensor],
                 previous: Mapping[int, torch.Tensor] | None, references: Mapping[int, torch.Tensor] | None
                 ) -> dict[str, float | None]:
    """``probe/norm/<l>``, ``probe/cos_start/<l>`` and, when there is a previous probe / a reference for the layer,
    ``probe/cos_prev/<l>`` / ``probe/cos_ref/<l>``. An undefined cosine (a zero vector) is None."""
    out: dict[str, float | None] = {}
    for layer, v in vectors.items():
        out[f"probe/norm/{layer}"] = float(v.norm())
        out[f"probe/cos_start/{layer}"] = _finite(cosine(v, start[layer]))
        if previous is not None:
            out[f"probe/cos_prev/{layer}"] = _finite(cosine(v, previous[layer]))
        if references is not None and layer in references:
            out[f"probe/cos_ref/{layer}"] = _finite(cosine(v, references[layer]))
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@contextmanager
def _quiet(model: torch.nn.Module, device: torch.device):
    """Eval mode, no gradients, and the RNG state of training forked (restored exactly on exit)."""
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


class ProbeCallback(TrainerCallback):
    """Probes every ``every`` optimizer steps (see the module docstring), on the main process only."""

    def __init__(self, trainer: Any, rows: list[dict[str, str]], template: Any, *, every: int, size: int, k: int,
                 references: Mapping[int, torch.Tensor] | None = None):
        self.trainer = trainer
        self.every = every
        self.k = k
        self.rows = rows[:size]
        self.prompts = [template.render(r["question"], trainer.processing_class) for r in self.rows]
        self.references = dict(references) if references is not None else None
        self.start: dict[int, torch.Tensor] | None = None
        self.previous: dict[int, torch.Tensor] | None = None
        self.vocab: Vocab | None = None
        self.base_logits: list[torch.Tensor] = []  # the frozen base on the probe batch: computed once
        self.seconds = 0.0  # total time spent probing (logged with each probe)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.start = sv.get_vectors(self._model())
        text = "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in self.rows)
        write_text_atomic(Path(args.output_dir) / PROBLEMS_FILE, text)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step % self.every == 0:
            self.probe(state.global_step)

    def _model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def probe(self, step: int) -> dict[str, Any]:
        """Measure, write the metrics line (and W&B) and return it."""
        t0 = time.perf_counter()
        model = self._model()
        tokenizer = self.trainer.processing_class
        with _quiet(model, next(model.parameters()).device):
            vectors = sv.get_vectors(model)
            # A layer that starts at zero has no direction to compare with: its start is its first probed value.
            self.start = {l: (v if not self.start[l].any() else self.start[l]) for l, v in vectors.items()}
            if self.vocab is None:
                self.vocab = Vocab.of(model, tokenizer)
            lens = [vector_lens(model, layer, v, self.vocab, self.k) for layer, v in vectors.items()]
            first = first_token_gain(model, tokenizer, self.prompts, vectors, k=self.k,
                                     batch_size=self.trainer.args.val_batch_size, base_cache=self.base_logits)
        row: dict[str, Any] = {"step": step, "event": "probe", "time": round(time.time(), 3)}
        row.update(vector_stats(vectors, self.start, self.previous, self.references))
        for e in lens:
            for side in ("top", "bottom"):
                row[f"probe/lens_{side}_non_english/{e['layer']}"] = e[f"{side}_non_english_share"]
        row["probe/first_token_kl"] = first["kl"]
        row["probe/first_token_top_gain"] = first["top_gained"][0]["gain"]
        self.previous = vectors
        self.seconds += time.perf_counter() - t0
        row["probe/seconds_total"] = round(self.seconds, 3)
        row.update(lens=lens, first_token=first)
        write_metrics_line(self.trainer.metrics_path, row)
        if "wandb" in (self.trainer.args.report_to or []):
            _to_wandb(row)
        return row


def _to_wandb(row: dict[str, Any]) -> None:
    """The numbers as line plots and the probe's tokens as a table, on transformers' W&B run (its x axis
    ``train/global_step``); nothing when no run is open."""
    import wandb

    if wandb.run is None:
        return
    table = wandb.Table(columns=["step", "what", "layer", "tokens"])
    for e in row["lens"]:
        for side in ("top", "bottom"):
            table.add_data(row["step"], f"lens {side}", e["layer"], " | ".join(repr(t["token"]) for t in e[side]))
    table.add_data(row["step"], "first token gained", None,
                   " | ".join(f"{t['token']!r} {t['gain']:+.3f}" for t in row["first_token"]["top_gained"]))
    numbers = {k: v for k, v in row.items() if k.startswith("probe/") and v is not None}
    wandb.log({**numbers, "probe/tokens": table, "train/global_step": row["step"]})
