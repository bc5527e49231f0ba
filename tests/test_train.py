"""End-to-end GRPO training of steering vectors on the demo base (CPU, offline)."""

import json
import os
import subprocess
import sys
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
    from train.__main__ import train

    tmp = tmp_path_factory.mktemp("train")
    trainer = train(["--config", str(small_config(tmp, learning_rate=0.05))])
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
    assert not list(run_dir.glob("**/*.pt")) and not list(run_dir.glob("**/*.pth")) and not list(run_dir.glob("**/*.bin"))
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


def test_paper_preset_advantages_and_loss_by_hand(tmp_path):
    """RLOO advantages and the global token-mean loss, against numbers worked out by hand."""
    from train.__main__ import build_trainer

    trainer, _ = build_trainer(["--config", str(small_config(tmp_path, per_device_train_batch_size=8))])
    g = trainer.num_generations
    assert g == 4
    # Two prompts x four completions; rewards ±1.
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    # RLOO: A_i = r_i - mean_{j != i} r_j, by hand for group 1: 1-(-1)=2, -1-(-1/3)=-2/3 (x3);
    # group 2: 1-(1/3)=2/3 (x3), -1-1=-2.
    expected = torch.tensor([2.0, -2 / 3, -2 / 3, -2 / 3, 2 / 3, 2 / 3, -2.0, 2 / 3])
    trainer._calculate_rewards = lambda *a, **k: rewards.unsqueeze(1)
    batch = [{"prompt": p, "answer": "0", "question": "q"} for p in trainer.train_dataset["prompt"][:2]
             for _ in range(g)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    torch.testing.assert_close(out["advantages"].cpu(), expected)

    # Loss: -sum_i A_i sum_t logp_it / (completion tokens of the whole batch). On-policy the PPO ratio is exp(logp -
    # logp.detach()) = 1, so TRL's loss *value* is -sum_i A_i n_i / N while its *gradient* is the paper's; compare both.
    mask = out["completion_mask"]
    n_tokens = mask.sum()
    out["num_items_in_batch"] = n_tokens
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by the train loop
    params = sv.vector_parameters(trainer.model)
    sv.set_vectors(trainer.model, {l: 0.3 * torch.randn(p.numel()) for l, p in params.items()})
    loss = trainer._compute_loss(trainer.model, out)
    torch.testing.assert_close(loss.detach(), -(expected.unsqueeze(1) * mask).sum() / n_tokens, rtol=1e-5, atol=1e-6)
    trl_grads = torch.autograd.grad(loss, list(params.values()))

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], mask], 1)
    logits = trainer.model(input_ids=ids, attention_mask=att).logits[:, out["prompt_ids"].size(1) - 1:-1]
    logp = torch.log_softmax(logits.float() / trainer.temperature, -1).gather(
        -1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
    by_hand = -(expected.unsqueeze(1) * logp * mask).sum() / n_tokens
    hand_grads = torch.autograd.grad(by_hand, list(params.values()))
    for a, b in zip(trl_grads, hand_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    from train.__main__ import train

    full = train(["--config", str(small_config(tmp_path, "full", max_steps=4, save_steps=2, val_size=0))])
    ref = sv.get_vectors(full.model)
    ref_opt = ckpt_io.load_file_tensors(tmp_path / "full" / "checkpoint-4") if hasattr(ckpt_io, "load_file_tensors") else None
    cut = train(["--config", str(small_config(tmp_path, "cut", max_steps=2, save_steps=2, val_size=0))])
    assert cut.state.global_step == 2
    resumed = train(["--config", str(small_config(tmp_path, "cut", max_steps=4, save_steps=2, val_size=0)),
                     "--resume_from_checkpoint", "latest"])
    assert resumed.state.global_step == 4
    for layer, v in sv.get_vectors(resumed.model).items():
        torch.testing.assert_close(v, ref[layer], rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "checkpoint-4" / ckpt_io.OPTIMIZER_TENSORS))
    b = load_file(str(tmp_path / "cut" / "checkpoint-4" / ckpt_io.OPTIMIZER_TENSORS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    del ref_opt


def test_token_scaling_trains_through_the_same_trainer(tmp_path):
    """token_scaling: true trains gates alpha_l(t) next to the vectors and checkpoints them in safetensors."""
    from steering import token_scaling as ts
    from train.__main__ import train

    trainer = train(["--config", str(small_config(tmp_path, "ts", learning_rate=0.05, val_size=0)),
                     "--token_scaling", "true"])
    ck = tmp_path / "ts" / "checkpoint-2"
    assert (ck / "token_gates.safetensors").is_file() and sv.read_meta(ck)["token_scaling"]["layers"] == [0, 1, 2]
    moved = [p for p in ts.gate_parameters(trainer.model) if p.detach().abs().max() > 0]
    assert moved, "no gate parameter moved"
    loaded = ts.load_token_scaled_model(ck, base=AutoModelForCausalLM.from_pretrained(DEMO_BASE))
    x = torch.randint(4, 100, (2, 11))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, trainer.model(x).logits.cpu())
