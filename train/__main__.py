"""``python -m train --config FILE [--key value …]`` (or ``accelerate launch -m train …``): GRPO on steering vectors.

Reads the configuration (see ``train/config.py``; ``--help`` lists every key), checks everything it can before any
model loads (bad input: one line on stderr, exit code 2), then trains with ``SteeringGRPOTrainer``, writing
``output_dir/metrics.jsonl``, ``checkpoint-<step>/`` and, at the end, ``training_curves.png`` and the final
checkpoint in ``output_dir/final``. It ends by printing the held-out accuracy of the base and of the trained model.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("train")


def _fail(message: str) -> int:
    print(f"python -m train: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from steering import vectors as sv
    from steering.problems import DataError
    from steering.templates import TemplateError, get_template
    from train import checkpointing as ckpt_io
    from train.config import ConfigError, build_parser, parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    try:
        s, g = parse_config(argv)
        template = get_template(s.template)
        prepared = prepare(s, g, template)
    except (ConfigError, TemplateError, DataError, sv.SteeringError, FileNotFoundError) as e:
        return _fail(str(e))
    from train.trainer import TrainingDiverged

    try:
        run(s, g, template, prepared)
    except TrainingDiverged as e:
        latest = ckpt_io.read_latest(Path(g.output_dir))
        newline = "" if g.disable_tqdm else "\n"  # the progress bar was left mid-line
        print(f"{newline}python -m train: error: training diverged: {e}; last good checkpoint: {latest or 'none'}",
              file=sys.stderr)
        return 3
    return 0


def build_trainer(argv: list[str]):
    """Parse, check and build (no training): ``(trainer, context)``. Raises the configuration errors."""
    from steering.templates import get_template
    from train.config import parse_config

    s, g = parse_config(argv)
    template = get_template(s.template)
    prepared = prepare(s, g, template)
    return make_trainer(s, g, template, prepared)


def train(argv: list[str]):
    """Parse, check, build and train; returns the trainer (for tests and notebooks)."""
    from steering.templates import get_template
    from train.config import parse_config

    s, g = parse_config(argv)
    template = get_template(s.template)
    return run(s, g, template, prepare(s, g, template))


def prepare(s: Any, g: Any, template: Any) -> dict[str, Any]:
    """Everything that can be checked without loading weights: base config, layers, init vectors, data, resume."""
    from transformers import AutoConfig

    from steering import vectors as sv
    from steering.problems import load_problems, split_off_validation
    from train import checkpointing as ckpt_io
    from train.config import ConfigError

    model_path = s.model_name_or_path
    if s.build_demo_base and not Path(model_path).exists():
        from train.demo_base import ensure_demo_base

        ensure_demo_base(model_path)
    try:
        config = AutoConfig.from_pretrained(model_path, revision=s.model_revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_name_or_path: cannot read the config of {model_path!r} "
                          f"({str(e).splitlines()[0]})") from None
    sv.check_supported(config)
    num_layers, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    if s.adapter == "steering":
        try:
            sv.validate_layers(s.layers, num_layers)
        except sv.SteeringError as e:
            raise ConfigError(f"layers: {e}") from None
    init_vectors = None
    if s.init_from:
        try:
            init_vectors = sv.load_vectors(s.init_from)
        except sv.SteeringError as e:
            raise ConfigError(f"init_from: {e}") from None
        sizes = {int(v.numel()) for v in init_vectors.values()}
        if sizes != {hidden} or max(init_vectors) >= num_layers:
            raise ConfigError(
                f"init_from: {s.init_from} has vectors of hidden size {sorted(sizes)} for layers {sorted(init_vectors)}"
                f", but {model_path} has {num_layers} layers x hidden size {hidden}; give init_from vectors made for "
                "this base model, or remove init_from")
        wanted = set(sv.validate_layers(s.layers, num_layers))
        init_vectors = {l: v for l, v in init_vectors.items() if l in wanted}
        scale = s.init_scale
        init_vectors = {l: v * (scale.get(l, 1.0) if isinstance(scale, dict) else float(scale))
                        for l, v in init_vectors.items()}

    problems = load_problems(s.dataset, split=s.dataset_split, config=s.dataset_config,
                             question_column=s.question_column, answer_column=s.answer_column,
                             answer_parser=s.answer_parser, procedural_size=s.procedural_size, seed=g.seed,
                             limit=s.max_train_samples)
    if s.val_dataset:
        val_problems = load_problems(s.val_dataset, split="test" if not s.val_dataset.startswith(("procedural:",)) else
                                     "train", procedural_size=s.val_size, seed=g.seed + 1, limit=s.val_size)
        train_rows = problems.rows
        val_question_set = {r["question"] for r in train_rows}
        val_rows = [r for r in val_problems.rows if r["question"] not in val_question_set]
        skipped = problems.skipped + val_problems.skipped
    else:
        train_rows, val_rows = split_off_validation(problems, s.val_size, g.seed)
        skipped = problems.skipped

    resume = g.resume_from_checkpoint
    if resume is not None:
        resume = ckpt_io.resolve_resume(resume, g.output_dir)
    return {"train_rows": train_rows, "val_rows": val_rows, "skipped_rows": skipped, "init_vectors": init_vectors,
            "resume": resume, "num_layers": num_layers}


def build_model(s: Any, init_vectors: Any, resume: str | None = None):
    """The frozen base plus what is trained (steering vectors, LoRA, or everything). The trainer restores what it
    saves itself when it resumes; the token gates, which live outside the PEFT adapter, come from ``resume`` here."""
    from steering import vectors as sv

    base = sv.load_base_model(s.model_name_or_path, dtype=s.dtype, revision=s.model_revision,
                              attn_implementation=s.attn_implementation)
    if s.adapter == "steering":
        model = sv.attach_steering(base, layers=s.layers, init=init_vectors, base_model_id=s.model_name_or_path)
        if s.token_scaling:
            from steering import token_scaling as ts

            # s_l * alpha_l(t); fresh gates start at alpha = 1 (plain steering)
            ts.attach_token_scaling(model, init=resume)
        return model
    if s.adapter == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                            target_modules=list(s.lora_target_modules), task_type="CAUSAL_LM")
        return get_peft_model(base, config)
    for p in base.parameters():  # full fine-tuning baseline
        p.requires_grad_(True)
    return base


def make_trainer(s: Any, g: Any, template: Any, prepared: dict[str, Any]):
    from transformers import set_seed

    from steering import vectors as sv
    from steering.problems import to_prompt_dataset
    from steering.rewards import MathReward
    from train.config import to_jsonable
    from train.rollout import StaticRollouts
    from train.trainer import (MetricsFileCallback, SteeringGRPOTrainer, ValidationCallback, write_metrics_line)
    from train.validation import Validator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(g.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = sv.load_tokenizer(s.model_name_or_path, revision=s.model_revision)
    train_ds = to_prompt_dataset(prepared["train_rows"], template, tokenizer)
    # Seeded before the model is built, as TRL's scripts do: LoRA's random init must be the same run after run.
    set_seed(g.seed)
    model = build_model(s, prepared["init_vectors"], prepared["resume"])

    reward = MathReward(answer_format=template.answer_format, reward_style=s.reward_style, timeout_s=s.reward_timeout,
                        options=s.grading_options())
    validator = Validator(prepared["val_rows"], template, tokenizer, max_new_tokens=g.max_completion_length,
                          temperature=s.val_temperature, batch_size=s.val_batch_size, seed=g.seed,
                          timeout_s=s.reward_timeout, options=reward.options)
    run_config = to_jsonable(s, g)
    metrics_path = out / s.metrics_file
    rollout_func = StaticRollouts(compile=s.rollout_compile) if s.rollout_backend == "static" else None
    trainer = SteeringGRPOTrainer(
        model=model, reward_funcs=[reward], args=g, train_dataset=train_ds, processing_class=tokenizer,
        steering_args=s, reward_fn=reward, run_config=run_config, rollout_func=rollout_func,
        callbacks=[MetricsFileCallback(metrics_path, s.reward_style)],
    )
    val_cb = ValidationCallback(trainer, validator, s.val_steps)
    trainer.add_callback(val_cb)
    if trainer.is_world_process_zero():
        write_metrics_line(metrics_path, {"step": 0, "event": "data", "train_rows": len(prepared["train_rows"]),
                                          "val_rows": len(prepared["val_rows"]),
                                          "skipped_rows": prepared["skipped_rows"]})
        if s.adapter == "steering":
            n = sum(p.numel() for p in sv.vector_parameters(trainer.model).values())
            logger.info("steering %d layers: %d trainable parameters", len(sv.vector_parameters(trainer.model)), n)
    return trainer, {"val_callback": val_cb, "metrics_path": metrics_path, "out": out, "prepared": prepared}


def run(s: Any, g: Any, template: Any, prepared: dict[str, Any]):
    from train.plots import plot_training_curves
    from train.trainer import write_metrics_line

    from train.trainer import RunAlreadyFinished

    trainer, ctx = make_trainer(s, g, template, prepared)
    val_cb, metrics_path, out = ctx["val_callback"], ctx["metrics_path"], ctx["out"]
    try:
        trainer.train(resume_from_checkpoint=prepared["resume"])
    except RunAlreadyFinished as e:
        # The checkpoint is loaded and nothing is left to train: validate and write final/ as a finished run would.
        logger.info("%s; nothing to train", e)
        val_cb.validate(trainer.state)
    trainer.save_model(str(out / "final"))
    if trainer.is_world_process_zero():
        base_acc, final_acc = val_cb.base_accuracy, (val_cb.history[-1][1] if val_cb.history else None)
        write_metrics_line(metrics_path, {"step": trainer.state.global_step, "event": "final",
                                          "base_eval_accuracy": base_acc, "eval_accuracy": final_acc})
        if s.plot_curves:
            plot_training_curves(metrics_path, out / "training_curves.png")
        if final_acc is not None:
            n = len(prepared["val_rows"])
            base_txt = f"{100 * base_acc:.1f}%" if base_acc is not None else "n/a"
            print(f"\nheld-out accuracy on {n} problems (T={s.val_temperature:g}): base {base_txt} -> "
                  f"trained {100 * final_acc:.1f}%   [{out}]")
    return trainer


if __name__ == "__main__":
    sys.exit(main())
