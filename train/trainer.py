"""The RL loop: TRL's ``GRPOTrainer``, changed only where steering vectors need it.

What the ``paper`` preset computes, plainly: for each prompt, G completions are sampled at T=1 and scored ±1 by
math-verify. Each completion's advantage is its reward minus the mean reward of the *other* G−1 completions (RLOO;
TRL's group-mean advantage times G/(G−1)), with no std scaling. The loss is −Σ_i A_i Σ_t log π(y_it), divided by the
number of completion tokens in the whole global batch (TRL's "dapo" normalisation), and one AdamW step is taken per
batch, so the PPO ratio is 1 and its clip never binds. β=0: no reference model, no KL.

Changes to ``GRPOTrainer`` and why:
- ``advantage_estimator="rloo"`` rescales the advantages TRL computed (see above).
- Per-layer learning rates become optimizer parameter groups.
- Steering checkpoints are written in the core format (a PEFT BEFT adapter + steering.json) with the optimizer,
  scheduler and RNG state in safetensors/JSON (never pickle), atomically, followed by a ``latest`` marker; resuming
  reads them back. LoRA / full fine-tuning baselines keep the stock Trainer checkpoints.
- Rollouts can take the static-KV-cache path (``rollout_backend: static``; CUDA graphs on GPU) and, with vLLM,
  only the vectors are synced after the first step (``train/rollout.py``).
- Validation accuracy on held-out problems and per-layer vector norms are logged, and every log line also goes to
  ``output_dir/metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from steering import token_scaling as ts
from steering import vectors as sv
from train import checkpointing as ckpt_io
from train.rollout import FastRolloutMixin

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """NaN/Inf in the loss, the gradients or the vectors."""


class SteeringGRPOTrainer(FastRolloutMixin, GRPOTrainer):
    def __init__(self, *args: Any, steering_args: Any, reward_fn: Any = None, validator: Any = None,
                 run_config: dict | None = None, **kwargs: Any):
        self.steering_args = steering_args
        self.reward_fn = reward_fn
        self.validator = validator
        self.run_config = run_config or {}
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ advantages
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.steering_args.advantage_estimator == "rloo" and self.model.training:
            g = self.num_generations
            # r_i - mean_{j!=i} r_j = G/(G-1) * (r_i - mean_j r_j)
            out["advantages"] = out["advantages"] * (g / (g - 1))
        return out

    # ------------------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        s = self.steering_args
        if s.adapter != "steering" or not (s.layer_lr or s.token_scaling) or self.optimizer is not None:
            return super().create_optimizer()
        a = self.args
        groups = sv.param_groups(self.model, a.learning_rate, s.layer_lr, weight_decay=a.weight_decay)
        if s.token_scaling:
            groups += ts.param_groups(self.model, a.learning_rate, weight_decay=a.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                           eps=a.adam_epsilon, weight_decay=a.weight_decay)
        return self.optimizer

    # ------------------------------------------------------------------------------------------------ resume
    def _run_epoch(self, *args, **kwargs):
        # transformers takes one optimizer step before it checks max_steps, so resuming a finished run (a requeued
        # job, a restart loop) would train past max_steps and change the result. Nothing is left to do: stop.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ NaN guard
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.steering_args.adapter == "steering":
            # Before the rollouts: sampling from NaN logits would fail with an obscure error instead.
            for layer, p in sv.vector_parameters(self.model).items():
                if not torch.isfinite(p.detach()).all():
                    raise TrainingDiverged(f"non-finite values in the layer-{layer} vector at step "
                                           f"{self.state.global_step + 1} (before its rollouts)")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}")
        if self.steering_args.adapter == "steering":
            for layer, p in sv.vector_parameters(self.model).items():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise TrainingDiverged(f"non-finite gradient of the layer-{layer} vector at step "
                                           f"{self.state.global_step + 1}")
        return loss

    # ------------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_train = not any(k.startswith("eval_") for k in logs)
        if is_train and self.reward_fn is not None and hasattr(self.reward_fn, "pop_stats"):
            logs.update(self.reward_fn.pop_stats())
        if is_train and self.steering_args.adapter == "steering":
            vectors = sv.vector_parameters(self.model)
            for layer, p in vectors.items():
                value = p.detach().float()
                if not torch.isfinite(value).all():
                    raise TrainingDiverged(f"non-finite values in the layer-{layer} vector at step "
                                           f"{self.state.global_step}")
                logs[f"vector_norm/{layer}"] = float(value.norm())
            if self.accelerator.num_processes > 1:
                # DDP must keep every rank's vectors bit-identical; measure it on every log line.
                flat = torch.cat([p.detach().float().reshape(-1) for p in vectors.values()]).unsqueeze(0)
                gathered = self.accelerator.gather(flat.to(self.accelerator.device))
                logs["vector_rank_max_abs_diff"] = float((gathered - gathered[0:1]).abs().max())
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _uses_core_checkpoints(self) -> bool:
        return (self.steering_args.adapter == "steering" and not self.is_deepspeed_enabled
                and not self.is_fsdp_enabled)

    def _save_checkpoint(self, model, trial):
        if not self._uses_core_checkpoints():
            return super()._save_checkpoint(model, trial)
        from accelerate.utils import gather_object
        from transformers.trainer_callback import ExportableState
        from transformers.trainer_utils import rotate_checkpoints

        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"checkpoint-{step}"
        for layer, p in sv.vector_parameters(self.model).items():
            # Never publish a poisoned checkpoint (it would become `latest`), whatever logging_steps is.
            if not torch.isfinite(p.detach()).all():
                raise TrainingDiverged(f"non-finite values in the layer-{layer} vector at step {step}; not saving "
                                       f"{final.name}")
        per_rank = gather_object([ckpt_io.rng_state()])  # every rank's RNG, written by rank 0 only
        if self.args.should_save:
            tmp = final.with_name(f".{final.name}.tmp-{__import__('os').getpid()}")
            if tmp.exists():  # left by a killed process with the same pid (containers reuse pids across restarts)
                __import__("shutil").rmtree(tmp)
            self._save_steering(tmp, step)
            ckpt_io.save_optimizer(self.optimizer, tmp)
            ckpt_io.save_scheduler(self.lr_scheduler, tmp)
            ckpt_io.save_rng(tmp, per_rank)
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(tmp / ckpt_io.TRAINER_STATE))
            ckpt_io.publish(tmp, final)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None):
        if self.steering_args.adapter != "steering":
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            self._save_steering(Path(output_dir or self.args.output_dir), self.state.global_step)

    def _save_steering(self, out: Path, step: int) -> None:
        """The core checkpoint (vectors + steering.json), plus the token gates when token_scaling is on."""
        model = self.accelerator.unwrap_model(self.model)
        gated = ts.has_token_scaling(model)
        sv.save_checkpoint(model, out, base_model=self.steering_args.model_name_or_path, step=step,
                           training_config=self.run_config, extra=ts.checkpoint_extra(model) if gated else None)
        if gated:
            ts.save_token_gates(model, out)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._uses_core_checkpoints():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = model if model is not None else self.model
        vectors = sv.load_vectors(resume_from_checkpoint)
        sv.check_fits(vectors, target, source=f"checkpoint {resume_from_checkpoint}")
        sv.set_vectors(target, vectors)
        if ts.has_token_scaling(target):
            ts.load_token_gates(target, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not self._uses_core_checkpoints():
            return super()._load_optimizer_and_scheduler(checkpoint)
        ckpt = Path(checkpoint)
        ckpt_io.load_optimizer(self.optimizer, ckpt)
        ckpt_io.load_scheduler(self.lr_scheduler, ckpt)

    def _load_rng_state(self, checkpoint):
        if checkpoint is None or not self._uses_core_checkpoints():
            return super()._load_rng_state(checkpoint)
        if not ckpt_io.load_rng(Path(checkpoint), self.args.process_index):
            logger.warning("no RNG state for process %d in %s; sampling after resume will differ",
                           self.args.process_index, checkpoint)


class MetricsFileCallback(TrainerCallback):
    """Appends every log line (train and validation) to ``output_dir/metrics.jsonl``, on the main process only.

    Each train line has at least ``step``, ``reward``, ``accuracy``, ``completion_length`` and ``vector_norm/<layer>``;
    validation lines have ``eval_accuracy``."""

    def __init__(self, path: str | Path, reward_style: str):
        self.path = Path(path)
        self.reward_style = reward_style

    def accuracy_from_reward(self, reward: float) -> float:
        return (reward + 1.0) / 2.0 if self.reward_style == "pm1" else reward

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "time": round(time.time(), 3)}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = float(value) if math.isfinite(value) else str(value)
            elif isinstance(value, (str, bool)) or value is None:
                row[key] = value
        if "reward" in row and isinstance(row["reward"], float):
            row["accuracy"] = self.accuracy_from_reward(row["reward"])
        if "completions/mean_length" in row:
            row["completion_length"] = row["completions/mean_length"]
        write_metrics_line(self.path, row)


def write_metrics_line(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


class ValidationCallback(TrainerCallback):
    """Held-out accuracy every ``val_steps`` optimizer steps, at the start (with and without steering) and at the end.

    It generates with the trainer's current model through ``steering.generation`` and scores with the reward module;
    the result is logged as ``eval_accuracy`` (and ``base_eval_accuracy`` once, with the adapter disabled)."""

    def __init__(self, trainer: SteeringGRPOTrainer, validator: Any, every: int):
        self.trainer = trainer
        self.validator = validator
        self.every = every
        self.last_step: int | None = None
        self.history: list[tuple[int, float]] = []
        self.base_accuracy: float | None = None

    def _run(self, state, *, base: bool = False) -> float:
        from trl.models import unwrap_model_for_generation

        t = self.trainer
        with unwrap_model_for_generation(t.model_wrapped, t.accelerator) as model:
            was_training = model.training
            model.eval()
            try:
                if base and hasattr(model, "disable_adapter"):
                    with model.disable_adapter():
                        acc = self.validator.accuracy(model, t.accelerator)
                else:
                    acc = self.validator.accuracy(model, t.accelerator)
            finally:
                model.train(was_training)
        return acc

    def _log(self, state, key: str, value: float) -> None:
        from transformers import Trainer

        # Trainer.log, not GRPOTrainer.log: TRL's log would fold (and clear) its pending train metrics into this line.
        # Trainer.log also clears control.should_log, which would drop this step's train line (called from
        # on_step_end, before the trainer logs the step): keep it.
        control = self.trainer.control
        should_log = control.should_log
        Trainer.log(self.trainer, {key: value, f"{key}_n": float(len(self.validator.rows))})
        control.should_log = self.trainer.control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.validator.rows:
            return
        if self.trainer.steering_args.adapter != "full" and state.global_step == 0:
            self.base_accuracy = self._run(state, base=True)
            self._log(state, "base_eval_accuracy", self.base_accuracy)
        self._validate(state)

    def _validate(self, state):
        if self.last_step == state.global_step:
            return
        acc = self._run(state)
        self.last_step = state.global_step
        self.history.append((state.global_step, acc))
        self._log(state, "eval_accuracy", acc)

    def on_step_end(self, args, state, control, **kwargs):
        if self.validator.rows and self.every and state.global_step % self.every == 0:
            self._validate(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.validator.rows:
            self._validate(state)
