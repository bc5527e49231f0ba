"""End-to-end GRPO training of steering vectors on the demo base (CPU, offline)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from steering import vectors as sv
from train import checkpointing as ckpt_io

ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = ROOT / "assets" / "demo-base"


def small_config(tmp_path, name="run", **overrides):
    """configs/demo.yaml shrunk to a few seconds a step."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(model_name_or_path=str(DEMO_BASE), build_demo_base=False, procedural_size=300, val_size=16,
               val_steps=0, num_generations=4, per_device_train_batch_size=16, max_completion_length=24,
               max_steps=2, save_steps=1, output_dir=str(tmp_path / name), plot_curves=False)
    cfg.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    from train.__main__ import main, parse_config

    tmp = tmp_path_factory.mktemp("train")
    trainer = main(parse_config(["--config", str(small_config(tmp, learning_rate=0.05))]))
    return trainer, tmp / "run"


def test_two_step_run_changes_vectors_only(two_step_run):
    trainer, run_dir = two_step_run
    assert trainer.state.global_step == 2
    vecs = sv.get_vectors(trainer.model)
    assert any(v.abs().max() > 0 for v in vecs.values()), "no vector moved"
    base = AutoModelForCausalLM.from_pretrained(DEMO_BASE)
    live = dict(trainer.model.get_base_model().named_parameters())
    for name, p in base.named_parameters():
        key = name if name in live else name.replace("down_proj.weight", "down_proj.base_layer.weight")
        assert torch.equal(live[key].detach().cpu(), p.detach()), name


def test_metrics_jsonl_has_required_fields(two_step_run):
    trainer, run_dir = two_step_run
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    layers = sv.steered_layers(trainer.model)
    for r in train_rows:
        for key in ("step", "reward", "accuracy", "completion_length"):
            assert key in r, key
        assert r["accuracy"] == pytest.approx((r["reward"] + 1) / 2)
        assert all(f"vector_norm/{l}" in r for l in layers)
    evals = [r for r in rows if "eval_accuracy" in r and r.get("event") != "final"]
    assert [r["step"] for r in evals] == [0, 2]
    assert any("base_eval_accuracy" in r for r in rows)
    final = [r for r in rows if r.get("event") == "final"]
    assert len(final) == 1 and final[0]["eval_accuracy"] == evals[-1]["eval_accuracy"]


def test_checkpoints_load_through_peft_and_match(two_step_run):
    trainer, run_dir = two_step_run
    ck = run_dir / "checkpoint-2"
    assert ckpt_io.is_complete(ck)
    assert json.loads((run_dir / "latest").read_text())["checkpoint"] == "checkpoint-2"
    ckpt_io.verify_checkpoint(ck)
    listed = set(json.loads((ck / ckpt_io.MANIFEST).read_text())["files"])
    assert listed == {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()} - {ckpt_io.MANIFEST}
    assert {"adapter_model.safetensors", "steering.json", "optimizer.pt", "trainer_state.json"} <= listed
    # The model state is safetensors + JSON; optimizer / scheduler / RNG state are transformers' own files, which a
    # resume reads with torch.load(weights_only=True) (tests/test_reliability.py checks that nothing else is unpickled).
    assert not [p for p in ck.rglob("*.pt*") if not p.name.startswith(("optimizer", "scheduler", "rng_state"))]
    ours = sv.load_steered_model(ck, base=AutoModelForCausalLM.from_pretrained(DEMO_BASE))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_BASE), str(ck))
    for layer, v in sv.get_vectors(trainer.model).items():
        assert torch.equal(sv.get_vectors(ours)[layer], v)
    x = torch.randint(4, 100, (2, 11))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, theirs(x).logits)
    meta = sv.read_meta(ck)
    assert meta["step"] == 2 and meta["base_model"] == str(DEMO_BASE)
    assert meta["training_config"]["loss_type"] == "dapo"


def test_model_cards_are_this_runs_and_their_code_loads_the_model(two_step_run):
    """final/, each checkpoint and the run directory hold this run's card (base, layers, settings, validation), not
    TRL's ("a fine-tuned version of [None]", a pipeline(...) snippet) or PEFT's empty template; its code runs."""
    import re

    trainer, run_dir = two_step_run
    layers = ", ".join(map(str, sv.steered_layers(trainer.model)))
    final = ckpt_io.final_dir(run_dir)
    for d in (final, ckpt_io.checkpoint_dir(run_dir, 2), run_dir):
        card = (d / ckpt_io.CARD).read_text()
        assert f"Steered layers: {layers}." in card and f'from_pretrained("{DEMO_BASE}")' in card, d
        assert "| `learning_rate` | `0.05` |" in card and "at step" in card, d
        assert "[None]" not in card and "pipeline(" not in card and "More Information Needed" not in card, d
    step, accuracy = trainer.validation.history[-1]
    assert step == 2
    for d in (final, run_dir):  # the run directory's card is rewritten when training ends
        assert f"**{100 * accuracy:.1f}%** at step {step}" in (d / ckpt_io.CARD).read_text(), d
    assert "README.md" in json.loads((ckpt_io.checkpoint_dir(run_dir, 2) / ckpt_io.MANIFEST).read_text())["files"]
    snippets = re.findall(r"```python\n(.*?)```", (final / ckpt_io.CARD).read_text(), re.S)
    assert len(snippets) == 2  # this project's loader, then PEFT's
    for code in snippets:
        scope = {}
        exec(code.replace('"DIR"', repr(str(final))), scope)
        assert torch.equal(sv.get_vectors(scope["model"])[0], sv.get_vectors(trainer.model)[0])


def test_paper_preset_rloo_loss_and_gradient_by_hand(tmp_path):
    """One real training step of the paper preset, with fixed ±1 rewards: TRL's loss value and its gradient w.r.t.
    the vectors are the paper's RLOO loss worked out by hand (A_i = r_i - mean_{j != i} r_j, loss
    -sum_i A_i sum_t log p_it / N with N the completion tokens of the whole batch). Public API only: the rewards come
    through the reward function, the gradient is read off one plain SGD step (lr 1, no clipping)."""
    from train.__main__ import build_trainer, parse_config

    cfg = small_config(tmp_path, per_device_train_batch_size=8, max_steps=1, val_size=0, optim="sgd",
                       learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0)
    trainer = build_trainer(parse_config(["--config", str(cfg)]))
    g = trainer.num_generations
    assert g == 4 and trainer.args.reward_weights == [4 / 3]  # what makes TRL's advantage RLOO's
    # Two prompts x four completions; rewards ±1.
    rewards = [1.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0]
    # RLOO: A_i = r_i - mean_{j != i} r_j, by hand for group 1: 1-(-1)=2, -1-(-1/3)=-2/3 (x3);
    # group 2: 1-(1/3)=2/3 (x3), -1-1=-2.
    expected = torch.tensor([2.0, -2 / 3, -2 / 3, -2 / 3, 2 / 3, 2 / 3, -2.0, 2 / 3], dtype=torch.float64)
    seen = {}

    def fixed_reward(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=list(prompts), completion_ids=[list(map(int, c)) for c in completion_ids])
        return rewards

    trainer.reward_funcs[0] = fixed_reward
    before = {l: p.detach().clone() for l, p in sv.vector_parameters(trainer.model).items()}
    trainer.train()
    grads = {l: before[l] - p.detach() for l, p in sv.vector_parameters(trainer.model).items()}  # SGD, lr 1

    # The same loss by hand, from the prompts and completions TRL sampled, on the model before the step.
    model = sv.attach_steering(AutoModelForCausalLM.from_pretrained(DEMO_BASE))
    sv.set_vectors(model, {l: v.reshape(-1) for l, v in before.items()})
    tok = trainer.processing_class
    n_tokens = sum(len(c) for c in seen["completion_ids"])
    by_hand = 0.0
    for a, prompt, completion in zip(expected, seen["prompts"], seen["completion_ids"]):
        prompt_ids = tok(text=[prompt])["input_ids"][0]
        ids = torch.tensor([prompt_ids + completion])
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].double() / trainer.args.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).sum()
        by_hand = by_hand - a * logp / n_tokens
    hand = dict(zip(before, torch.autograd.grad(by_hand, list(sv.vector_parameters(model).values()))))
    for layer, grad in grads.items():
        assert hand[layer].abs().max() > 0
        torch.testing.assert_close(grad.double(), hand[layer].double(), rtol=1e-3, atol=1e-6)
    # On-policy the PPO ratio is exp(logp - logp.detach()) = 1, so TRL's loss *value* is -sum_i A_i n_i / N.
    [logged] = [h for h in trainer.state.log_history if "loss" in h]
    lengths = torch.tensor([len(c) for c in seen["completion_ids"]], dtype=torch.float64)
    assert logged["loss"] == pytest.approx(float(-(expected * lengths).sum() / n_tokens), rel=1e-4, abs=1e-6)
    assert logged["reward"] == pytest.approx(sum(rewards) / len(rewards))  # the reward itself, not the weighted one


def _optimizer_state(ckpt):
    """The optimizer tensors of a checkpoint, read the way a resume reads them (the restricted unpickler)."""
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("adapter", ["steering", "lora", "full"])
def test_resume_from_latest_matches_uninterrupted_run(tmp_path, adapter):
    """Every adapter: 2 steps, stop, resume from `latest` to 4 steps == 4 steps without a stop (trained weights and
    optimizer state)."""
    from train.__main__ import main, parse_config

    extra = [] if adapter == "steering" else ["--adapter", adapter]
    cfg = dict(save_steps=2, val_size=0)
    full = main(parse_config(["--config", str(small_config(tmp_path, "full", max_steps=4, **cfg))] + extra))
    cut = main(parse_config(["--config", str(small_config(tmp_path, "cut", max_steps=2, **cfg))] + extra))
    assert cut.state.global_step == 2
    resumed = main(parse_config(["--config", str(small_config(tmp_path, "cut", max_steps=4, **cfg)),
                     "--resume_from_checkpoint", "latest"] + extra))
    assert resumed.state.global_step == 4
    trained = {n: p.detach() for n, p in full.model.named_parameters() if p.requires_grad}
    ref_model = AutoModelForCausalLM.from_pretrained(DEMO_BASE)
    moved = 0
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), trained[name], rtol=1e-5, atol=1e-6)
            base_name = name.removeprefix("base_model.model.")
            ref = dict(ref_model.named_parameters()).get(base_name)
            moved += ref is None or not torch.equal(ref, p.detach())
    assert moved > 0, "nothing was trained: the comparison would be vacuous"
    a, b = _optimizer_state(tmp_path / "full" / "checkpoint-4"), _optimizer_state(tmp_path / "cut" / "checkpoint-4")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_token_scaling_trains_through_the_same_trainer(tmp_path):
    """token_scaling: true trains gates alpha_l(t) next to the vectors and checkpoints them in safetensors."""
    from steering import token_scaling as ts
    from train.__main__ import main, parse_config

    trainer = main(parse_config(["--config", str(small_config(tmp_path, "ts", learning_rate=0.05, val_size=0)),
                     "--token_scaling", "true"]))
    ck = tmp_path / "ts" / "checkpoint-2"
    assert (ck / "token_gates.safetensors").is_file() and sv.read_meta(ck)["token_scaling"]["layers"] == [0, 1, 2]
    moved = [p for p in ts.gate_parameters(trainer.model) if p.detach().abs().max() > 0]
    assert moved, "no gate parameter moved"
    loaded = ts.load_token_scaled_model(ck, base=AutoModelForCausalLM.from_pretrained(DEMO_BASE))
    x = torch.randint(4, 100, (2, 11))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, trainer.model(x).logits.cpu())


@pytest.mark.parametrize("init", ["zero", "init_from"])
def test_base_is_validated_on_its_own_only_when_the_step_0_model_differs(tmp_path, init, monkeypatch):
    """Zero vectors: the step-0 model is the base, so one validation gives both numbers; vectors from init_from: the
    base is validated separately (and may differ)."""
    from train.__main__ import main, parse_config
    from train.validation import Validator

    calls = []
    accuracy = Validator.accuracy

    def counted(self, model, accelerator=None):
        calls.append(1)
        return accuracy(self, model, accelerator)

    monkeypatch.setattr(Validator, "accuracy", counted)
    extra = {}
    if init == "init_from":
        extra["init_from"] = str(ROOT / "assets" / "demo-checkpoint")
    trainer = main(parse_config(["--config", str(small_config(tmp_path, max_steps=1, val_size=8, **extra))]))
    rows = read_metrics(tmp_path / "run")
    [base] = [r for r in rows if "base_eval_accuracy" in r and r.get("event") != "final"]
    [step0] = [r for r in rows if "eval_accuracy" in r and r["step"] == 0]
    assert len(calls) == (2 if init == "zero" else 3)  # step 0 (+ the base on its own), then the final step
    if init == "zero":
        assert base["base_eval_accuracy"] == step0["eval_accuracy"]
    else:
        assert trainer.validation.base_accuracy == base["base_eval_accuracy"]


def test_console_prints_one_short_line_per_step():
    from types import SimpleNamespace

    from train.trainer import ConsoleLog

    console = ConsoleLog(progress_bar=False)
    state = SimpleNamespace(global_step=3, max_steps=30, is_world_process_zero=True)
    args = SimpleNamespace(reward_style="pm1")
    console._last = None
    logs = {"reward": 0.5, "completions/mean_length": 21.25, "loss": 0.1, "grad_norm": 1.0, "kl": 0.0,
            "vector_norm/0": 1.0, "vector_norm/1": 3.0, **{f"noise/{i}": float(i) for i in range(40)}}
    line = console.format(args, state, logs)
    assert line == "step 3/30 | reward +0.500 | accuracy 75.0% | length 21.2 | |s| 2.000"
    assert console.format(args, state, {"eval_accuracy": 0.94}) == "step 3/30 | held-out accuracy 94.0%"
    assert console.format(args, state, {"learning_rate": 1e-3}) is None  # nothing worth a line
