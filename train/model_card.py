"""The model card (``README.md``) of a run directory and of each model directory in it (``checkpoint-<step>/``,
``final/``): what a user who uploads the run to the Hub publishes.

TRL's card (``GRPOTrainer.create_model_card``, written into the run directory at every checkpoint) names no base
model ("a fine-tuned version of [None]") and offers a ``pipeline(...)`` snippet that cannot load a steering adapter;
PEFT's (``save_pretrained``, in every model directory) is an empty template. ``SteeringGRPOTrainer`` writes this card in
both places instead: the base model, the adapter and its layers, how to load, serve and export it, the key training
settings and the last held-out validation accuracy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steering.files import write_text_atomic
from train.checkpointing import CARD, CHECKPOINT_PREFIX, FINAL, MANIFEST

# The settings a reader needs to know what was trained; the whole config is in steering.json ("training_config").
KEY_SETTINGS = ("preset", "dataset", "template", "init_from", "learning_rate", "layer_lr", "lr_scheduler_type",
                "max_steps", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_completion_length", "temperature", "loss_type", "beta", "reward_style", "seed")
ADAPTER_SETTINGS = {"steering": (), "lora": ("lora_r", "lora_alpha", "lora_target_modules"), "full": ()}


@dataclass(frozen=True)
class CardFacts:
    """What the card says, as the trainer knows it when it saves."""

    base_model: str
    adapter: str  # "steering", "lora" or "full" (the config's ``adapter``)
    layers: list[int] | None  # the steered layers (steering only)
    token_scaling: bool
    settings: dict[str, Any]  # the training config, flat (``SteeringGRPOConfig.to_jsonable``)
    validation: tuple[int, float] | None  # (step, accuracy) of the last held-out validation, if one ran
    base_accuracy: float | None
    val_problems: int


def write_card(out_dir: str | os.PathLike, facts: CardFacts, *, run_dir: bool) -> Path:
    """Write ``out_dir/README.md`` (replacing TRL's or PEFT's); ``run_dir``: the run directory, not a model."""
    path = Path(out_dir) / CARD
    write_text_atomic(path, render_card(facts, run_dir=run_dir))
    return path


def render_card(facts: CardFacts, *, run_dir: bool) -> str:
    return "\n".join([_front_matter(facts), _summary(facts, run_dir), _usage(facts, run_dir), _settings(facts),
                      _validation(facts)])


def _front_matter(facts: CardFacts) -> str:
    lines = ["---", f"library_name: {'transformers' if facts.adapter == 'full' else 'peft'}"]
    if not Path(facts.base_model).is_dir():  # the Hub takes a model id here, not a local path
        lines.append(f"base_model: {facts.base_model}")
    kind = {"steering": ["- steering-vectors"], "lora": ["- lora"], "full": []}[facts.adapter]
    lines += ["tags:", *kind, "- grpo", "- trl", "---", ""]
    return "\n".join(lines)


def _summary(facts: CardFacts, run_dir: bool) -> str:
    base = f"`{facts.base_model}`"
    if facts.adapter == "steering":
        layers = ", ".join(map(str, facts.layers or []))
        what = (f"# Steering vectors for {facts.base_model}\n\nOne trained vector per steered layer of {base}, added "
                f"to that layer's output at every position (a PEFT BEFT bias on `down_proj`). Steered layers: "
                f"{layers}.")
        if facts.token_scaling:
            what += " Each vector is scaled per token by a trained gate (`token_scaling`)."
    elif facts.adapter == "lora":
        what = f"# LoRA adapter for {facts.base_model}\n\nA LoRA adapter (PEFT) on {base}."
    else:
        what = f"# {facts.base_model}, fine-tuned\n\nEvery weight of {base}, fine-tuned."
    what += " Trained with GRPO (TRL) by `python -m train` of steering-vectors-rl."
    if run_dir:
        what += (f"\n\nThis is a training run directory: the model is in `{FINAL}/` (written when training ends) and "
                 f"in `{CHECKPOINT_PREFIX}<step>/` (complete once it holds `{MANIFEST}`); the per-step metrics are "
                 f"in `{facts.settings['metrics_file']}`.")
    return what + "\n"


def _usage(facts: CardFacts, run_dir: bool) -> str:
    where = (f"`DIR` is `{FINAL}/` or a `{CHECKPOINT_PREFIX}<step>/` directory of this run" if run_dir
             else "`DIR` is this directory")
    if facts.adapter == "full":
        how = _code("python", "from transformers import AutoModelForCausalLM",
                    'model = AutoModelForCausalLM.from_pretrained("DIR")')
    elif facts.adapter == "lora":
        how = _peft_code(facts.base_model)
    elif facts.token_scaling:
        how = _code("python", "from steering.token_scaling import load_token_scaled_model", "",
                    'model = load_token_scaled_model("DIR")  # the base recorded in steering.json')
        how += ("\nThe per-token gates load only with this project's loader: PEFT, `python -m analysis serve` and "
                "`python -m analysis export` take fixed vectors.\n")
    else:
        how = _steering_usage(facts.base_model)
    return f"## Use\n\n{where}.\n\n{how}"


def _steering_usage(base_model: str) -> str:
    """This project's loader, PEFT's, vLLM serving and export (docs/export.md, docs/vllm.md)."""
    ours = _code("python", "from steering import vectors as sv", "",
                 'model = sv.load_steered_model("DIR")  # the base recorded in steering.json',
                 "with sv.steering_scale(model, 2.0): ...  # scale the vectors")
    export = "python -m analysis export --checkpoint DIR"
    engines = _code("bash", "python -m analysis serve --checkpoint DIR -- --port 8000",
                    f"{export} --to gguf --out vectors.gguf   # llama.cpp control vector",
                    f"{export} --to merged --out merged/      # Llama: down_proj biases",
                    f"{export} --to peft --out adapter/       # the adapter files alone")
    return (f"{ours}\nWith PEFT alone (the same logits):\n\n{_peft_code(base_model)}\n"
            f"Serve with vLLM (an OpenAI-compatible server), or export for other engines:\n\n{engines}")


def _peft_code(base_model: str) -> str:
    return _code("python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                 f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
                 'model = PeftModel.from_pretrained(base, "DIR")')


def _settings(facts: CardFacts) -> str:
    keys = KEY_SETTINGS + ADAPTER_SETTINGS[facts.adapter]
    rows = [f"| `{k}` | `{facts.settings[k]}` |" for k in keys if facts.settings.get(k) is not None]
    whole = " (the whole configuration: `training_config` in `steering.json`)" if facts.adapter == "steering" else ""
    return "\n".join(["## Training", "", f"Adapter: `{facts.adapter}`. Key settings{whole}:", "",
                      "| setting | value |", "|---|---|", *rows, ""])


def _validation(facts: CardFacts) -> str:
    if facts.validation is None:
        return "## Held-out validation\n\nNo held-out validation had run when this card was written.\n"
    step, accuracy = facts.validation
    text = (f"## Held-out validation\n\nAccuracy on {facts.val_problems} held-out problems "
            f"(T={facts.settings['val_temperature']}): **{100 * accuracy:.1f}%** at step {step}")
    if facts.base_accuracy is not None:
        text += f" (the base model: {100 * facts.base_accuracy:.1f}%)"
    return text + ".\n"


def _code(language: str, *lines: str) -> str:
    return "\n".join([f"```{language}", *lines, "```", ""])
