"""The RL loop: TRL's ``GRPOTrainer``, changed only where steering vectors need it.

What the ``paper`` preset computes, plainly: for each prompt, G completions are sampled at T=1 and scored ±1 by
math-verify. Each completion's advantage is its reward minus the mean reward of the *other* G−1 completions (RLOO),
with no std scaling. The loss is −Σ_i A_i Σ_t log π(y_it), divided by the number of completion tokens in the whole
global batch (TRL's "dapo" normalisation), and one AdamW step is taken per batch, so the PPO ratio is 1 and its clip
never binds. β=0: no reference model, no KL.

How, with TRL's public arguments only:
- RLOO: ``r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_j r_j)``, and with ``scale_rewards: none`` TRL's advantage is
  ``r_i − mean_j r_j`` of the *weighted* rewards, so ``reward_weights: [G/(G−1)]`` (set by the config) is exactly RLOO.
  The logged ``reward`` is the unweighted one (:class:`_UnweightedRewardLog`).
- Static-KV-cache rollouts: TRL's ``rollout_func`` (``train/rollout.py``).
- Per-layer learning rates: optimizer parameter groups (``create_optimizer``).
- Checkpoints: transformers writes them as for any PEFT model (``save_model`` adds ``steering.json`` and the model
  card, ``train/model_card.py``, which ``create_model_card`` also writes into the run directory), and
  :class:`train.checkpointing.CheckpointCallback` marks them complete (checksums, then the ``latest`` marker). The
  same lifecycle serves steering, LoRA and full fine-tuning, single process, DDP, DeepSpeed and FSDP.
- A NaN/Inf guard on the loss, the gradients and the vectors; per-layer vector norms and a DDP rank-sync metric in
  every log line, which also goes to ``output_dir/metrics.jsonl``; held-out validation accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from trl import GRPOTrainer

from steering import token_scaling as ts
from steering.rewards import accuracy_from_reward
from steering import vectors as sv
from train.checkpointing import CheckpointCallback, remove_manifest
from train.model_card import CardFacts, write_card

logger = logging.getLogger(__name__)
# TRL's measure of how far vLLM's sampling log-probabilities are from the trainer's (per sampled token, |difference|).
VLLM_GAP_MEAN, VLLM_GAP_MAX = "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"


class TrainingDiverged(RuntimeError):
    """NaN/Inf in the loss, the gradients or the vectors."""


class VLLMMismatch(RuntimeError):
    """The vLLM engine's log-probabilities of the sampled tokens are too far from the trainer's: it is not serving the
    model being trained (a sync that did not land)."""


class RunAlreadyFinished(Exception):
    """Raised at the start of training when a resumed run has already reached ``max_steps``."""


class _UnweightedRewardLog(Trainer):
    """Sees every train log line after TRL merged its metrics into it: reports ``reward`` / ``reward_std`` as the
    reward function's own mean and std under RLOO, ``completions/clipped_ratio`` as the length-limit share, and stops
    a run whose vLLM engine is not serving the trained model (:class:`VLLMMismatch`).

    TRL logs the *weighted* reward, and RLOO's weight G/(G−1) is what makes TRL's advantage RLOO's; with it, a batch
    of all −1 rewards would log −1.14 and an "accuracy" below zero. TRL adds its metrics to ``logs`` inside
    ``GRPOTrainer.log`` and then calls ``Trainer.log``, which writes them (callbacks, W&B, ``log_history``). Listed
    after ``GRPOTrainer`` among :class:`SteeringGRPOTrainer`'s bases, this class sits between the two in the MRO
    (``GRPOTrainer``, ``_BaseTrainer``, this, ``Trainer``), so its ``log`` sees TRL's metrics before anything is
    written."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_train = not any(k.startswith("eval_") for k in logs)
        if self.args.advantage_estimator == "rloo" and is_train:
            name = self.reward_func_names[0]
            for key, per_func in (("reward", f"rewards/{name}/mean"), ("reward_std", f"rewards/{name}/std")):
                if per_func in logs:
                    logs[key] = logs[per_func]
        if is_train and "completions/ended_by_length" in logs:
            # TRL counts a completion as clipped unless its last token is an end token, so one that ended at the
            # template's stop string (r1's </answer>) would count as clipped: report the length-limit share.
            logs["completions/clipped_ratio"] = logs["completions/ended_by_length"]
        if is_train:
            self._check_vllm_gap(logs)
        super().log(logs, start_time)

    def _check_vllm_gap(self, logs: dict[str, float]) -> None:
        """Stop the run when vLLM's log-probabilities of the sampled tokens are far from the trainer's (TRL measures
        the gap when ``vllm_importance_sampling_correction`` is on): the engine is then not serving the trained
        vectors, and every further step would train on another model's samples."""
        gap = logs.get(VLLM_GAP_MEAN)
        limit = self.args.vllm_max_logprob_gap
        if gap is not None and limit is not None and gap > limit:
            raise VLLMMismatch(f"at step {self.state.global_step} the mean |log p(trainer) - log p(vLLM)| of the "
                               f"sampled tokens is {gap:.3f} (max {logs.get(VLLM_GAP_MAX, float('nan')):.3f}), above "
                               f"vllm_max_logprob_gap={limit}")


class SteeringGRPOTrainer(GRPOTrainer, _UnweightedRewardLog):
    """``GRPOTrainer`` for a :class:`train.config.SteeringGRPOConfig` (``args``). It owns the run's callbacks:
    ``metrics.jsonl``, held-out validation (``validator``, a :class:`train.validation.Validator`), the checkpoint
    manifest and ``latest`` marker, the stop for a finished run, and a one-line-per-step console."""

    def __init__(self, *args: Any, validator: Any = None, **kwargs: Any):
        config = kwargs["args"]
        vectors_sync = config.use_vllm and config.vllm_sync == "vectors"
        if vectors_sync:
            from steering.vllm_plugin import prepare_engine_processes

            prepare_engine_processes(config.vllm_mode)
        super().__init__(*args, **kwargs)
        if vectors_sync and sv.vector_parameters(self.model):
            from steering.vllm_plugin import engine_serves, install_vectors_only_sync

            # The engine loaded the base itself: when it is the trainer's base, the vectors are all that differ, and
            # only they are pushed (vLLM-CPU could not take a full push: it repacks weights after loading).
            same_base = config.vllm_mode == "colocate" and engine_serves(
                self.vllm_generation, config.model_name_or_path, config.model_revision)
            install_vectors_only_sync(self.vllm_generation, self.model, accelerator=self.accelerator,
                                      full_first=not same_base)
        self.reward_fn = self.reward_funcs[0]
        self.metrics_path = Path(config.output_dir) / config.metrics_file
        self.add_callback(MetricsFileCallback(self.metrics_path, config.reward_style))
        self.add_callback(CheckpointCallback())
        self.add_callback(StopIfFinished())
        self.validation = ValidationCallback(self, validator, config.val_steps) if validator is not None else None
        if self.validation is not None:
            self.add_callback(self.validation)
        for verbose in (ProgressCallback, PrinterCallback):  # whichever transformers added: they print the whole dict
            self.remove_callback(verbose)
        self.add_callback(ConsoleLog(progress_bar=not config.disable_tqdm))

    # ------------------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        s = self.args
        if s.adapter != "steering" or not (s.layer_lr or s.token_scaling) or self.optimizer is not None:
            return super().create_optimizer()
        a = self.args
        groups = sv.param_groups(self.model, a.learning_rate, s.layer_lr, weight_decay=a.weight_decay)
        if s.token_scaling:
            groups += ts.param_groups(self.model, a.learning_rate, weight_decay=a.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                           eps=a.adam_epsilon, weight_decay=a.weight_decay)
        return self.optimizer

    # ------------------------------------------------------------------------------------------------ NaN guard
    def _check_vectors(self, when: str) -> None:
        if self.args.adapter != "steering":
            return
        for layer, p in sv.vector_parameters(self.model).items():
            if not torch.isfinite(p.detach()).all():
                raise TrainingDiverged(f"non-finite values in the layer-{layer} vector at step {when}")

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Before the rollouts: sampling from NaN logits would fail with an obscure error instead.
        self._check_vectors(f"{self.state.global_step + 1} (before its rollouts)")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}")
        if self.args.adapter == "steering":
            for layer, p in sv.vector_parameters(self.model).items():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise TrainingDiverged(f"non-finite gradient of the layer-{layer} vector at step "
                                           f"{self.state.global_step + 1}")
        return loss

    # ------------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_train = not any(k.startswith("eval_") for k in logs)
        if is_train and hasattr(self.reward_fn, "pop_stats"):
            logs.update(self.reward_fn.pop_stats())
        if is_train and self.args.adapter == "steering":
            self._check_vectors(str(self.state.global_step))
            vectors = sv.vector_parameters(self.model)
            for layer, p in vectors.items():
                logs[f"vector_norm/{layer}"] = float(p.detach().float().norm())
            if self.accelerator.num_processes > 1:
                # DDP must keep every rank's vectors bit-identical; measure it on every log line.
                flat = torch.cat([p.detach().float().reshape(-1) for p in vectors.values()]).unsqueeze(0)
                gathered = self.accelerator.gather(flat.to(self.accelerator.device))
                logs["vector_rank_max_abs_diff"] = float((gathered - gathered[0:1]).abs().max())
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers' save (the PEFT adapter, gathered under DeepSpeed/FSDP), plus, for steering runs, the token
        gates and ``steering.json`` (written last; removed first, so a half-rewritten directory never looks like a
        steering checkpoint)."""
        out = Path(output_dir or self.args.output_dir)
        steering = self.args.adapter == "steering"
        if steering:
            # Never save a poisoned checkpoint (it would become `latest`), whatever logging_steps is.
            self._check_vectors(f"{self.state.global_step}; not saving {out.name}")
        if _internal_call:
            # The first write of every checkpoint save (every rank calls this): a directory written again (a step
            # redone after a resume) is incomplete before any process writes into it.
            if self.args.should_save:
                remove_manifest(out)
            self.accelerator.wait_for_everyone()
        if steering and self.args.should_save and (out / sv.META_FILE).exists():
            (out / sv.META_FILE).unlink()
        super().save_model(str(out), _internal_call)
        if self.args.should_save:  # over PEFT's empty template; before steering.json, which stays the last file
            write_card(out, self.card_facts(), run_dir=False)
        if steering and self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            gated = ts.has_token_scaling(model)
            if gated:
                ts.save_token_gates(model, out)
            sv.write_meta(out, model, base_model=self.args.model_name_or_path, step=self.state.global_step,
                          training_config=self.args.to_jsonable(), extra=ts.checkpoint_extra(model) if gated else None)

    # ------------------------------------------------------------------------------------------------ model card
    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """The run directory's ``README.md``, which TRL writes at every checkpoint and on ``push_to_hub``: this run's
        own card (``train/model_card.py``) instead of TRL's generic one. The card's title is the base model and its
        settings come from the config, so TRL's name, dataset and tags are not used."""
        if self.is_world_process_zero():
            write_card(self.args.output_dir, self.card_facts(), run_dir=True)

    def card_facts(self) -> CardFacts:
        """What the model card says, now: the base, the adapter and its layers, the config, the last validation."""
        model = self.accelerator.unwrap_model(self.model)
        steering = self.args.adapter == "steering"
        validation = self.validation
        return CardFacts(
            base_model=self.args.model_name_or_path, adapter=self.args.adapter,
            layers=sv.steered_layers(model) if steering else None,
            token_scaling=steering and ts.has_token_scaling(model), settings=self.args.to_jsonable(),
            validation=validation.history[-1] if validation is not None and validation.history else None,
            base_accuracy=validation.base_accuracy if validation is not None else None,
            val_problems=len(validation.validator.rows) if validation is not None else 0)


class ConsoleLog(ProgressCallback):
    """transformers' progress bar, with one short line per logged step under it instead of TRL's ~40-key dict
    (``metrics.jsonl`` and W&B keep every key): step, reward, accuracy, completion length, time per step and the mean
    vector norm; validation lines show the held-out accuracy. Without a bar (``disable_tqdm``) the lines are printed."""

    def __init__(self, progress_bar: bool = True):
        super().__init__()
        self.progress_bar = progress_bar
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.progress_bar:
            super().on_train_begin(args, state, control, **kwargs)
        self._last = (time.perf_counter(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress_bar:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress_bar:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = self.format(args, state, logs)
        if line is None:
            return
        if self.progress_bar and self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def format(self, args, state, logs: dict[str, Any]) -> str | None:
        step = f"step {state.global_step}" + (f"/{state.max_steps}" if state.max_steps > 0 else "")
        if "eval_accuracy" in logs or "base_eval_accuracy" in logs:
            key = "eval_accuracy" if "eval_accuracy" in logs else "base_eval_accuracy"
            what = "held-out accuracy" if key == "eval_accuracy" else "held-out accuracy of the base"
            return f"{step} | {what} {100 * logs[key]:.1f}%"
        if "train_runtime" in logs:
            return f"{step} | done in {logs['train_runtime']:.0f} s"
        if "reward" not in logs:
            return None
        parts = [step, f"reward {logs['reward']:+.3f}",
                 f"accuracy {100 * accuracy_from_reward(logs['reward'], args.reward_style):.1f}%"]
        if "completions/mean_length" in logs:
            parts.append(f"length {logs['completions/mean_length']:.1f}")
        now = time.perf_counter()
        if self._last is not None and state.global_step > self._last[1]:
            parts.append(f"{(now - self._last[0]) / (state.global_step - self._last[1]):.2f} s/step")
        self._last = (now, state.global_step)
        norms = [v for k, v in logs.items() if k.startswith("vector_norm/")]
        if norms:
            parts.append(f"|s| {sum(norms) / len(norms):.3f}")
        if VLLM_GAP_MEAN in logs:
            parts.append(f"vLLM logp gap {logs[VLLM_GAP_MEAN]:.4f} (max {logs.get(VLLM_GAP_MAX, float('nan')):.3f})")
        return " | ".join(parts)


class StopIfFinished(TrainerCallback):
    """A resumed run that has already reached ``max_steps`` (a requeued job that had in fact finished) must not train:
    transformers would take one more optimizer step before it looks at ``max_steps``."""

    def on_train_begin(self, args, state, control, **kwargs):
        if 0 < state.max_steps <= state.global_step:
            raise RunAlreadyFinished(f"the run already reached max_steps={state.max_steps} (step {state.global_step})")


class MetricsFileCallback(TrainerCallback):
    """Appends every log line (train and validation) to ``output_dir/metrics.jsonl``, on the main process only.

    Each train line has at least ``step``, ``reward``, ``accuracy``, ``completion_length`` and ``vector_norm/<layer>``;
    validation lines have ``eval_accuracy``."""

    def __init__(self, path: str | Path, reward_style: str):
        self.path = Path(path)
        self.reward_style = reward_style

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
            row["accuracy"] = accuracy_from_reward(row["reward"], self.reward_style)
        if "completions/mean_length" in row:
            row["completion_length"] = row["completions/mean_length"]
        write_metrics_line(self.path, row)


def write_metrics_line(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


class ValidationCallback(TrainerCallback):
    """Held-out accuracy every ``val_steps`` optimizer steps, at the start and at the end.

    It generates with the trainer's current model through ``steering.generation`` and scores with the reward module;
    the result is logged as ``eval_accuracy``, and ``base_eval_accuracy`` once at step 0 (the base with the adapter
    disabled, validated separately only when the step-0 model differs from it)."""

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
        acc = self.validate(state)
        if acc is not None and state.global_step == 0:
            # The step-0 model is the base itself unless the vectors start from init_from (zero vectors, LoRA's zero
            # B matrices and full fine-tuning all start as the base): only then is the base validated on its own.
            starts_as_base = not (args.adapter == "steering" and args.init_from)
            self.base_accuracy = acc if starts_as_base else self._run(state, base=True)
            self._log(state, "base_eval_accuracy", self.base_accuracy)

    def validate(self, state) -> float | None:
        """Validate the current model (once per step), log ``eval_accuracy`` and return it."""
        if self.last_step == state.global_step or not self.validator.rows:
            return None
        acc = self._run(state)
        self.last_step = state.global_step
        self.history.append((state.global_step, acc))
        self._log(state, "eval_accuracy", acc)
        return acc

    def on_step_end(self, args, state, control, **kwargs):
        if self.validator.rows and self.every and state.global_step % self.every == 0:
            self.validate(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.validate(state)
