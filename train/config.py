"""The configuration of a training run: one dataclass, :class:`SteeringGRPOConfig` = TRL's ``GRPOConfig`` (the RL
loop, unchanged) + the fields steering vectors need, read from a YAML file with ``--key value`` overrides, TRL-style.

Precedence, lowest to highest: dataclass defaults < ``preset`` values < YAML < command line. Unknown keys, in the
YAML or on the command line, are errors. Every value is checked in ``SteeringGRPOConfig.__post_init__``; a problem is
one line naming the key and the fix (exit code 2 from ``python -m train``), before any model loads. What needs the
base model's files or the data (layer indices in range, ``init_from`` and ``probe_vectors`` shapes, the tokenizer and
the template rendered with it, dataset columns, the checkpoint to resume from) is checked next, still before any
weights load and before ``output_dir`` is touched (``train/__main__.py``, ``prepare_inputs``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from trl import GRPOConfig

from steering import compat
from steering.rewards import REWARD_STYLES, check_timeout

# The recipe of Sinii et al. (docs/recipe.md). GRPOTrainer's "dapo" loss divides the summed token losses by the number
# of completion tokens in the whole global batch; with scale_rewards="none" its advantage is r_i - mean_j r_j, which
# the "rloo" estimator turns into the leave-one-out r_i - mean_{j!=i} r_j (reward weights G/(G-1)). num_iterations=1
# with steps_per_generation = gradient_accumulation_steps (TRL's default) is one on-policy step per batch, so the ratio
# clip never binds; beta=0 drops the reference model.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "advantage_estimator": "rloo",
        "reward_style": "pm1",
        "loss_type": "dapo",
        "scale_rewards": "none",
        "beta": 0.0,
        "num_iterations": 1,
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 0.03,  # a float < 1 is a fraction of the total steps
        "max_grad_norm": 2.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "num_train_epochs": 1.0,
        "mask_truncated_completions": False,
    },
}

ADAPTERS = ("steering", "lora", "full")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo")
ROLLOUT_BACKENDS = ("hf", "static")
VLLM_SYNCS = ("vectors", "trl")
DTYPES = ("bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A bad configuration value: the message names the key and the fix."""


@dataclass
class SteeringGRPOConfig(GRPOConfig):
    """Configuration of a steering-vector (or LoRA / full fine-tuning baseline) GRPO run.

    Every field of TRL's ``GRPOConfig`` (and transformers' ``TrainingArguments``) applies unchanged; this class adds
    the fields below, each settable in the YAML file or as ``--field value``. ``__post_init__`` checks all of them
    together with TRL's, and raises :class:`ConfigError` with a message that names the key and says the fix.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model: a Hub id (e.g. Qwen/Qwen2.5-Math-1.5B) or a local directory."})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the base model."})
    dtype: str = field(
        default="bfloat16",
        metadata={"help": "Dtype of the frozen base: bfloat16, float16 or float32. Steering vectors are always fp32."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers attention backend (sdpa, flash_attention_2, eager, …)."})
    preset: str | None = field(
        default=None,
        metadata={"help": f"Named recipe applied before the YAML and the command line: {sorted(PRESETS)}. 'paper' is "
                          "Sinii et al.: RLOO, ±1 rewards, no std scaling, global token-mean loss, β=0, constant LR "
                          "with 3%% warmup, max grad norm 2, T=1."})
    adapter: str = field(
        default="steering",
        metadata={"help": "What is trained: 'steering' (one vector per layer), 'lora' (PEFT LoRA baseline) or 'full' "
                          "(full fine-tuning baseline; use a DeepSpeed launch config)."})
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Decoder layers (0-based) that get a steering vector; default all. One layer = the "
                          "single-layer ablation.", "nargs": "+"})
    layer_lr: dict | str | None = field(
        default=None,
        metadata={"help": "Per-layer learning rates, e.g. '{\"27\": 0.1}' (JSON on the command line); other layers "
                          "use learning_rate."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Start the vectors from this steering checkpoint (e.g. DiffMean vectors) or llama.cpp "
                          "control-vector .gguf file (repeng, EasySteer; direction.N is layer N) instead of zero. "
                          "The vectors must fit the base (layers, hidden size); the base they record is not "
                          "compared, so vectors of another model of the same shape can start a run."})
    init_scale: Any = field(
        default=1.0,
        metadata={"help": "Multiplier for init_from vectors: a number, or a per-layer JSON mapping {layer: scale}."})
    token_scaling: bool = field(
        default=False,
        metadata={"help": "Train per-token magnitudes s_l·α_l(t) with a learned gate (see analysis token-scaling)."})
    lora_r: int = field(default=1, metadata={"help": "LoRA rank (adapter=lora). The papers' baseline is rank 1."})
    lora_alpha: int = field(default=2, metadata={"help": "LoRA alpha (adapter=lora)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["down_proj"],
        metadata={"help": "LoRA target modules (adapter=lora); the papers' baseline uses down_proj.", "nargs": "+"})
    advantage_estimator: str = field(
        default="grpo",
        metadata={"help": "'grpo': TRL's group-mean baseline (scaled per scale_rewards). 'rloo': leave-one-out "
                          "baseline r_i - mean_{j≠i} r_j (needs scale_rewards=none)."})
    reward_style: str = field(default="pm1", metadata={"help": "'pm1': +1 correct / -1 otherwise; 'binary': 1 / 0."})
    reward_timeout: float = field(default=2.0, metadata={"help": "Seconds allowed per answer check (at most 3600)."})
    # math-verify's grading options (steering.rewards.GradingOptions), under its names and with its defaults.
    reward_float_rounding: int = field(
        default=6, metadata={"help": "math-verify float_rounding: decimal places floats are rounded to before they are "
                                     "compared (math-verify's default 6)."})
    reward_numeric_precision: int = field(
        default=15, metadata={"help": "math-verify numeric_precision: significant digits of numeric evaluation "
                                      "(default 15)."})
    reward_strict: bool = field(
        default=True, metadata={"help": "math-verify strict: variables must match (f(x) != f(y)) and sets never "
                                        "equal tuples (default true)."})
    reward_allow_set_relation_comp: bool = field(
        default=False, metadata={"help": "math-verify allow_set_relation_comp: a relation in the answer (1 < x < 2) "
                                         "may equal a set in the ground truth ((1, 2)) (default false)."})
    template: str = field(
        default="qwen_math",
        metadata={"help": "Prompt template: 'qwen_math' (chat, reward reads the last \\boxed{}), 'r1' (plain text, "
                          "reward reads the last <answer>…</answer>), or a template file (YAML/JSON/TXT)."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "Training data: a known name (deepscaler, math, gsm8k), any Hub dataset id, a local "
                          ".json/.jsonl/.parquet file, or 'procedural:<task>' (arithmetic, word, mixed) for offline use."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub datasets; a file or "
                                                                  "procedural source has none)."})
    question_column: str | None = field(
        default=None, metadata={"help": "Column holding the problem; default from the known-dataset registry."})
    answer_column: str | None = field(
        default=None, metadata={"help": "Column holding the ground truth; default from the known-dataset registry."})
    answer_parser: str | None = field(
        default=None,
        metadata={"help": "How to read the ground truth: 'plain', 'gsm8k' (text after ####), 'boxed' (last \\boxed{} "
                          "of a solution, as in MATH) or 'auto' (gsm8k if the text has ####, else boxed if it has a "
                          "box, else plain); default from the registry (steering/problems.py)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    procedural_size: int = field(default=5000, metadata={"help": "Rows generated for a 'procedural:' dataset."})
    val_dataset: str | None = field(
        default=None,
        metadata={"help": "Validation data (same forms as dataset). Default: val_size rows held out of the training "
                          "data, never trained on."})
    val_size: int = field(default=200, metadata={"help": "Validation rows (held out, or taken from val_dataset)."})
    val_steps: int = field(
        default=0, metadata={"help": "Evaluate validation accuracy every N optimizer steps (0 = only at start and end)."})
    val_temperature: float = field(default=0.0, metadata={"help": "Sampling temperature for validation (0 = greedy)."})
    val_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch during validation."})
    rollout_backend: str = field(
        default="hf",
        metadata={"help": "Rollout generation without vLLM: 'hf' (model.generate, dynamic KV cache) or 'static' "
                          "(model.generate with transformers' static KV cache, compiled by transformers on CUDA). Both "
                          "sample from the same distribution. For the papers' scale use use_vllm: true."})
    rollout_compile: bool | None = field(
        default=None, metadata={"help": "static rollouts: false stops transformers from compiling the forward (it "
                                        "does on CUDA by default)."})
    vllm_sync: str = field(
        default="vectors",
        metadata={"help": "With use_vllm: 'vectors' pushes all weights once, then only the steering vectors; 'trl' "
                          "is TRL's own full sync (which cannot merge BEFT biases)."})
    vllm_max_logprob_gap: float | None = field(
        default=0.25,
        metadata={"help": "With use_vllm: stop the run (exit 3) when the mean |log p(trainer) - log p(vLLM)| of the "
                          "sampled tokens (TRL's sampling/sampling_logp_difference/mean, measured with "
                          "vllm_importance_sampling_correction on) exceeds this: the engine is not serving the trained "
                          "vectors. The same weights gave 0.0006 in fp32 on CPU (bf16 on GPU: expect ~0.01-0.05, "
                          "unmeasured here); null turns the check off."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that already holds a run's checkpoints, deleting them (its "
                          "latest marker, final/ and metrics file too). Without it such a start is refused."})
    metrics_file: str = field(
        default="metrics.jsonl", metadata={"help": "Per-step metrics, one JSON object per line, under output_dir. "
                                           "Its name is recorded in output_dir/run.json, where analysis finds it."})
    plot_curves: bool = field(
        default=True, metadata={"help": "Write output_dir/training_curves.png (and, with probe_steps, probes_*.png) at "
                                        "the end of the run."})
    probe_steps: int = field(
        default=0,
        metadata={"help": "Probe the vectors every N optimizer steps (0 = off, the default); N alone turns on the "
                          "whole set (docs/analysis.md, 'Probes during training'): per-layer norm and cosine to the "
                          "previous probe and to the start, the logit lens of each vector (top / bottom tokens, "
                          "non-English share), the first-token probability gain over the base and the KL there on "
                          "probe_size validation problems, and the cosine to probe_vectors. Rank 0 only, under no_grad, "
                          "consuming no random numbers: the trained vectors are the same with probes on and off. "
                          "Written to metrics.jsonl (event: probe), W&B, and probes_*.png at the end."})
    probe_size: int = field(
        default=16,
        metadata={"help": "Validation problems in the probe batch (the first probe_size held-out rows, drawn once) "
                          "on which the first-token gain and KL are measured (default 16)."})
    probe_k: int = field(
        default=10, metadata={"help": "Tokens listed per probe: top / bottom lens tokens of each vector and top "
                                      "gained first tokens (default 10)."})
    probe_vectors: str | None = field(
        default=None,
        metadata={"help": "Reference vectors for the probes' per-layer cosine: a steering checkpoint directory (e.g. "
                          "DiffMean behaviour vectors, another run's checkpoint) or a llama.cpp control-vector .gguf "
                          "file, made for this base model. Needs probe_steps."})
    build_demo_base: bool = field(
        default=False,
        metadata={"help": "If model_name_or_path does not exist, build the offline demo base there (train.demo_base)."})

    def __post_init__(self) -> None:
        # Our own fields, group by group, before TRL's checks see them.
        self._check_numbers()
        self._check_choices_and_required()
        self._parse_layer_settings()
        self._check_adapter_options()
        self._check_run_options()
        self._check_probes()

        # TRL's and transformers' own checks (one line of their message).
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(str(e).strip().splitlines()[0]) from None

        # Ours and theirs together.
        self._check_optimisation()
        self._check_generation_path()

    def _check_numbers(self) -> None:
        """Every number is finite (NaN or infinity anywhere: a run that diverges, or that trains for ever), and the
        counts that size a step are positive: before TRL's own checks, some of which divide by them."""
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate: {self.learning_rate} must be a finite number > 0")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: {value} is not a finite number")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length",
                    "num_generations"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: {value} must be >= 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: {self.max_steps}; use a positive number of steps, or -1 to train "
                              "num_train_epochs epochs")
        output_dir = Path(self.output_dir) if self.output_dir is not None else None
        if output_dir is not None and output_dir.exists() and not output_dir.is_dir():
            raise ConfigError(f"output_dir: {self.output_dir} is a file; give a directory")

    def _check_choices_and_required(self) -> None:
        """The fields with a fixed set of values, the preset name, and the two fields every run needs."""
        for key, value, allowed in (("adapter", self.adapter, ADAPTERS),
                                    ("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS),
                                    ("rollout_backend", self.rollout_backend, ROLLOUT_BACKENDS),
                                    ("vllm_sync", self.vllm_sync, VLLM_SYNCS),
                                    ("reward_style", self.reward_style, tuple(REWARD_STYLES)),
                                    ("dtype", self.dtype, DTYPES)):
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"preset: {self.preset!r} is unknown; known presets: {sorted(PRESETS)}")
        if self.model_name_or_path is None:
            raise ConfigError("model_name_or_path: missing; set it to a Hub id or a local model directory")
        if self.dataset is None:
            raise ConfigError("dataset: missing; e.g. deepscaler, gsm8k, math, a .jsonl file, or procedural:arithmetic")

    def _parse_layer_settings(self) -> None:
        """``layer_lr`` and ``init_scale`` from their string forms, then their layers against ``layers``."""
        self.layer_lr = _parse_mapping(self.layer_lr, "layer_lr")
        if isinstance(self.init_scale, str):
            try:
                self.init_scale = float(self.init_scale)
            except ValueError:
                self.init_scale = _parse_mapping(self.init_scale, "init_scale")
        elif isinstance(self.init_scale, dict):
            self.init_scale = _parse_mapping(self.init_scale, "init_scale")
        scales = self.init_scale.values() if isinstance(self.init_scale, dict) else [self.init_scale]
        if not all(math.isfinite(scale) for scale in scales if scale is not None):
            raise ConfigError(f"init_scale: {self.init_scale} is not finite")
        if self.layer_lr:
            for layer, lr in self.layer_lr.items():
                if not math.isfinite(lr):
                    raise ConfigError(f"layer_lr: the learning rate of layer {layer} is {lr}; it must be finite")
                if not lr > 0:
                    raise ConfigError(f"layer_lr: the learning rate of layer {layer} is {lr}; it must be > 0")
            if self.layers is not None and set(self.layer_lr) - set(self.layers):
                raise ConfigError(f"layer_lr: layers {sorted(set(self.layer_lr) - set(self.layers))} are not in "
                                  f"layers {self.layers}; add them to layers or drop them from layer_lr")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise ConfigError(f"layers: {self.layers} has a negative index; layers are 0-based")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers: {self.layers} names a layer twice; list each layer once")

    def _check_adapter_options(self) -> None:
        """The options that only a steering adapter reads."""
        if self.adapter != "steering" and (self.layers is not None or self.layer_lr or self.init_from):
            raise ConfigError("layers / layer_lr / init_from apply to adapter=steering only; remove them or set "
                              "adapter: steering")
        if self.token_scaling and self.adapter != "steering":
            raise ConfigError("token_scaling: needs adapter: steering")

    def _check_run_options(self) -> None:
        """Grading, validation, the dataset's split, the output directory and ``init_from``."""
        try:
            check_timeout(self.reward_timeout)
        except ValueError as e:
            raise ConfigError(f"reward_timeout: {e}") from None
        try:
            self.grading_options()
        except ValueError as e:
            raise ConfigError(f"reward_{e}") from None
        if self.val_size < 0 or self.val_steps < 0:
            raise ConfigError("val_size and val_steps must be >= 0")
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            raise ConfigError("overwrite_output_dir: true deletes the checkpoints that resume_from_checkpoint would "
                              "continue from; set one of them")
        if self.dataset_split != "train" or self.dataset_config:
            from steering.problems import PROCEDURAL, is_file_source

            # A file or a procedural source has no splits or configs: silently reading all of it instead of the split
            # asked for would train (or validate) on other data than intended.
            if is_file_source(self.dataset) or self.dataset.startswith(PROCEDURAL):
                key, value = (("dataset_config", self.dataset_config) if self.dataset_config
                              else ("dataset_split", self.dataset_split))
                raise ConfigError(f"{key}: {value!r} picks part of a Hub dataset, but dataset "
                                  f"{self.dataset!r} is a file or procedural source, which has none; remove {key}")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            from steering.gguf_vectors import is_control_vector_path

            if not (is_control_vector_path(self.init_from) and Path(self.init_from).is_file()):
                raise ConfigError(f"init_from: {self.init_from!r} is neither a directory nor a .gguf file; give a "
                                  "steering checkpoint directory or a llama.cpp control-vector .gguf file")

    def _check_optimisation(self) -> None:
        """RLOO's needs (and the reward weights it sets), and checkpoint retention; these read fields that TRL's
        ``__post_init__`` fills in."""
        if self.advantage_estimator == "rloo":
            if self.scale_rewards != "none":
                raise ConfigError(f"advantage_estimator: rloo needs scale_rewards: none (got {self.scale_rewards!r}); "
                                  "the leave-one-out baseline is not defined with std scaling")
            if self.num_generations is None or self.num_generations < 2:
                raise ConfigError(f"advantage_estimator: rloo needs num_generations >= 2 (got {self.num_generations}): "
                                  "the leave-one-out baseline averages the other samples of the same prompt")
            if self.reward_weights is not None:
                raise ConfigError("reward_weights: advantage_estimator rloo sets them (to G/(G-1)); remove "
                                  "reward_weights")
            # With scale_rewards: none, TRL's advantage of the rewards weighted by G/(G-1) is exactly RLOO's
            # r_i - mean_{j!=i} r_j (train/trainer.py).
            self.reward_weights = [self.num_generations / (self.num_generations - 1)]
        if self.save_total_limit is not None and self.save_total_limit < 2:
            raise ConfigError(f"save_total_limit: {self.save_total_limit} would let transformers delete the checkpoint "
                              "`latest` names while the next one is written; use 2 or more, or leave it unset")

    def _check_generation_path(self) -> None:
        """The rollout backend against vLLM, and what vLLM cannot run."""
        if self.rollout_backend == "static" and self.use_vllm:
            raise ConfigError("rollout_backend: static and use_vllm: true are exclusive; pick one generation path")
        if self.vllm_max_logprob_gap is not None and not self.vllm_max_logprob_gap > 0:
            raise ConfigError(f"vllm_max_logprob_gap: {self.vllm_max_logprob_gap} must be > 0 (null: no check)")
        if self.token_scaling and self.use_vllm:
            raise ConfigError("token_scaling: the per-token gate is a forward hook that vLLM does not run; set "
                              "use_vllm: false")

    def _check_probes(self) -> None:
        if self.probe_steps < 0 or self.probe_size < 1 or self.probe_k < 1:
            raise ConfigError(f"probe_steps ({self.probe_steps}) must be >= 0, probe_size ({self.probe_size}) and "
                              f"probe_k ({self.probe_k}) >= 1")
        if not self.probe_steps:
            if self.probe_vectors is not None:
                raise ConfigError("probe_vectors: the reference vectors are read by the probes, which are off; set "
                                  "probe_steps (e.g. 10) or remove probe_vectors")
            return
        if self.adapter != "steering":
            raise ConfigError(f"probe_steps: the probes read steering vectors; adapter is {self.adapter!r}. Set "
                              "adapter: steering or probe_steps: 0")
        if self.val_size < 1:
            raise ConfigError("probe_steps: the probe batch is drawn from the validation problems, and val_size is 0; "
                              "set val_size >= 1 or probe_steps: 0")
        if self.fsdp or self.deepspeed:
            # A probe is a forward pass on rank 0 alone; sharded parameters would need every rank to gather them.
            raise ConfigError("probe_steps: probes run on rank 0 alone, which FSDP / DeepSpeed sharded parameters "
                              "cannot do; use plain DDP (accelerate launch) or probe_steps: 0")

    def grading_options(self):
        """The reward's math-verify grading options (``reward_float_rounding`` ...) as a GradingOptions."""
        from steering.evaluation import grading_options

        return grading_options(vars(self))

    def eval_settings(self):
        """How validation evaluates (``steering.evaluation.EvalSettings``): ``val_temperature``, completions up to
        ``max_completion_length``, ``val_batch_size`` prompts per call, ``seed``, and the reward's grading."""
        from steering.evaluation import EvalSettings

        return EvalSettings(temperature=self.val_temperature, max_new_tokens=self.max_completion_length,
                            seeds=(self.seed,), batch_size=self.val_batch_size, timeout_s=self.reward_timeout,
                            grading=self.grading_options())

    def to_jsonable(self) -> dict[str, Any]:
        """A flat JSON-safe dict of the whole configuration, saved into every checkpoint."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            try:
                json.dumps(v)
                out[k] = v
            except TypeError:
                out[k] = str(v)
        return out


def _document_fields(cls: type) -> None:
    """Append the Parameters list to the class docstring, from the fields' own help (one text per field)."""
    lines = ["", "    Parameters:"]
    for f in fields(cls):
        if f.name in cls.__annotations__:
            lines.append(f"        {f.name}: {f.metadata.get('help', '').replace('%%', '%')}")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"


_document_fields(SteeringGRPOConfig)

def _parse_mapping(value: Any, key: str) -> dict[int, float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{key}: {value!r} is not JSON; write it like '{{\"27\": 0.1}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping {{layer: value}}, got {type(value).__name__}")
    try:
        return {int(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: keys must be layer indices and values numbers, got {value!r}") from None


def config_keys() -> set[str]:
    """Every key a training config may set (ours and TRL's / transformers'; both spellings of the renamed ones)."""
    renamed = set(compat.ACTIVATION_CHECKPOINTING_ARGS) | set(compat.ACTIVATION_CHECKPOINTING_ARGS.values())
    return {f.name for f in fields(SteeringGRPOConfig)} | renamed


def make_parser():
    """The command-line parser of ``python -m train``: every field of :class:`SteeringGRPOConfig` as ``--field``,
    plus ``--config FILE`` (TRL's ``TrlParser``, as TRL's own scripts use)."""
    from trl import TrlParser

    parser = TrlParser([SteeringGRPOConfig], prog="python -m train", description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of key: value pairs (any field below); command-line flags win.")
    return parser


def parse_config(argv: list[str] | None = None) -> SteeringGRPOConfig:
    """Parse ``--config FILE`` plus ``--key value`` overrides into one :class:`SteeringGRPOConfig`. Raises
    ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config: dict[str, Any] = {}
    config_path = _cli_value(argv, "config")
    if config_path is not None:
        config = _read_yaml(config_path)
        i = argv.index("--config") if "--config" in argv else next(i for i, a in enumerate(argv) if a.startswith("--config="))
        del argv[i: i + (2 if argv[i] == "--config" else 1)]
    env = config.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ConfigError("env: must be a mapping of environment variables")
    for k, v in env.items():
        os.environ[str(k)] = str(v)

    # activation_checkpointing* (transformers >= 5.24) and gradient_checkpointing* (older, and deprecated since) name
    # the same settings: either spelling works, with the installed transformers' name passed on (no warning).
    config = {compat.training_arg_name(k): v for k, v in config.items()}
    argv = [_translate_flag(a) for a in argv]
    unknown = sorted(set(config) - config_keys())
    if unknown:
        raise ConfigError(f"{config_path}: unknown key(s) {unknown}; see `python -m train --help` for valid keys")

    preset = _cli_value(argv, "preset") or config.get("preset")
    defaults: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: {preset!r} is unknown; known presets: {sorted(PRESETS)}")
        defaults.update(PRESETS[preset])
    # TRL's default (checkpointing on), spelled with the installed name so its deprecated alias is never the one set;
    # non-reentrant, which gives the first steered layer its gradient with a frozen base (see steering.vectors).
    defaults[compat.training_arg_name("gradient_checkpointing")] = GRPOConfig.__dataclass_fields__[
        "gradient_checkpointing"].default
    defaults[compat.training_arg_name("gradient_checkpointing_kwargs")] = {"use_reentrant": False}
    defaults.update(config)

    parser = make_parser()
    parser.set_defaults_with_config(**defaults)
    try:
        parsed, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)  # _: --config
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return parsed


def _translate_flag(arg: str) -> str:
    """``--gradient_checkpointing[=v]`` / ``--activation_checkpointing[=v]`` (and ``_kwargs``) -> the installed name."""
    if not arg.startswith("--"):
        return arg
    key, eq, value = arg[2:].partition("=")
    return f"--{compat.training_arg_name(key)}{eq}{value}"


def _read_yaml(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must be a YAML mapping of key: value")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a name", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _cli_value(argv: list[str], key: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
    return None
