"""Token-wise scaling: the gate (steering/token_scaling.py) and the token-scaling analysis command."""

import json

import pytest
import torch

from steering import hooks
from steering import token_scaling as ts
from steering import vectors as sv
from steering.tiny import tiny_model


def ids(seed=1):
    return torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(seed))


def random_vectors(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(32, generator=g) for layer in layers}


def randomize_gates(model, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in ts.gates(model).values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * scale)
            gate.bias.copy_(torch.randn(1, generator=g))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fresh_gate_and_gate_fixed_at_one_equal_plain_steering(arch):
    vecs = random_vectors(range(3))
    plain = sv.attach_steering(tiny_model(arch), init=vecs)
    gated = sv.attach_steering(tiny_model(arch), init=vecs)
    ts.attach_token_scaling(gated)
    x = ids()
    with torch.no_grad():
        ref = plain(x).logits
        assert torch.equal(gated(x).logits, ref)  # zero-initialised gate: α ≡ 1 exactly
        randomize_gates(gated)
        assert (gated(x).logits - ref).abs().max() > 1e-3  # a trained gate does change the model
        with ts.fixed_alpha(gated, 1.0):
            assert torch.equal(gated(x).logits, ref)  # gate fixed at 1 = plain steering, bit for bit
        with ts.fixed_alpha(gated, 0.0), sv.steering_disabled(plain):
            torch.testing.assert_close(gated(x).logits, plain(x).logits, rtol=0, atol=1e-5)  # α = 0: no steering
        with sv.steering_disabled(gated):
            assert torch.equal(gated(x).logits, tiny_model(arch)(x).logits)  # disabling turns the gate off too


def test_gate_adds_alpha_times_vector_per_token():
    layer = 1
    s = torch.randn(32)
    model = sv.attach_steering(tiny_model("qwen2"), layers=[layer], init={layer: s})
    gate = ts.attach_token_scaling(model)[layer]
    randomize_gates(model, seed=3)
    x = ids()
    with torch.no_grad():
        with ts.record_alphas(model) as rec:
            _, c = hooks.run_with_cache(model, x, names=[f"blocks.{layer}.ln2.hook_normalized",
                                                         f"blocks.{layer}.hook_mlp_out"])
        with sv.steering_disabled(model):
            _, c0 = hooks.run_with_cache(model, x, names=[f"blocks.{layer}.hook_mlp_out"],
                                         fwd_hooks=[(f"blocks.{layer}.ln2.hook_normalized",
                                                     hooks.replace_with(c[f"blocks.{layer}.ln2.hook_normalized"]))])
    mlp_in = c[f"blocks.{layer}.ln2.hook_normalized"]
    u = mlp_in / mlp_in.norm(dim=-1, keepdim=True)
    alpha = torch.nn.functional.softplus(u @ gate.weight + gate.bias) / torch.nn.functional.softplus(torch.zeros(()))
    torch.testing.assert_close(rec[layer][0], alpha, rtol=1e-6, atol=1e-6)
    assert alpha.std() > 0.05  # varies per token
    added = c[f"blocks.{layer}.hook_mlp_out"] - c0[f"blocks.{layer}.hook_mlp_out"]
    torch.testing.assert_close(added, alpha.unsqueeze(-1) * s, rtol=1e-5, atol=1e-5)


def test_gate_is_trainable_from_the_start_and_saved_in_safetensors(tmp_path):
    model = sv.attach_steering(tiny_model("qwen2"), init=random_vectors(range(3)))
    ts.attach_token_scaling(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.model.layers.1.mlp.steering_gate.weight" in names
    assert len(names) == 3 + 6  # 3 vectors, 3 gates x (weight, bias)
    model.train()
    x = ids()
    model(x, labels=x).loss.backward()
    for gate in ts.gates(model).values():
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        assert gate.weight.dtype == torch.float32
    groups = ts.param_groups(model, lr=1e-3)
    assert len(groups[0]["params"]) == 6

    randomize_gates(model)
    model.eval()
    ck = sv.save_checkpoint(model, tmp_path / "ck", base_model="tiny", extra=ts.checkpoint_extra(model))
    ts.save_token_gates(model, ck)
    from safetensors.torch import load_file

    stored = load_file(str(ck / ts.GATE_FILE))
    assert set(stored) == {f"layers.{l}.steering_gate.{k}" for l in range(3) for k in ("weight", "bias")}
    assert sorted(sv.load_vectors(ck)) == [0, 1, 2]  # the BEFT file holds only the vectors
    assert json.loads((ck / "steering.json").read_text())["token_scaling"]["layers"] == [0, 1, 2]
    loaded = ts.load_token_scaled_model(ck, base=tiny_model("qwen2"))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(RuntimeError, match="already attached"):
        ts.attach_token_scaling(loaded)
    with pytest.raises(ts.TokenScalingError, match="no token_gates"):
        ts.load_gate_tensors(tmp_path)


def test_gate_gradients_with_gradient_checkpointing():
    x = ids()
    grads = []
    for checkpointing in (False, True):
        model = sv.attach_steering(tiny_model("qwen2"), init=random_vectors(range(3)))
        ts.attach_token_scaling(model)
        randomize_gates(model, scale=0.5)
        model.train()
        if checkpointing:
            sv.enable_activation_checkpointing(model)
        model(x, labels=x).loss.backward()
        grads.append([p.grad.clone() for p in ts.gate_parameters(model)])
    assert grads[0][0].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gate_needs_vectors():
    with pytest.raises(ts.TokenScalingError, match="attach_steering"):
        ts.attach_token_scaling(tiny_model("qwen2"))


@pytest.fixture(scope="module")
def gated_checkpoint(tiny_base_dir, tmp_path_factory):
    base = sv.load_base_model(str(tiny_base_dir), dtype="float32")
    model = sv.attach_steering(base, init=random_vectors(range(3), seed=5))
    ts.attach_token_scaling(model)
    randomize_gates(model, seed=7)
    ck = sv.save_checkpoint(model, tmp_path_factory.mktemp("ts") / "ck", base_model=str(tiny_base_dir),
                            extra=ts.checkpoint_extra(model))
    ts.save_token_gates(model, ck)
    return ck


def test_token_scaling_command(gated_checkpoint, tiny_checkpoint, tmp_path, capsys):
    from analysis.__main__ import main

    out = tmp_path / "out"
    argv = ["token-scaling", "--checkpoint", str(gated_checkpoint), "--out", str(out), "--benchmarks",
            "procedural:arithmetic:3", "--max-new-tokens", "6", "--no-progress", "--examples", "2"]
    assert main(argv) == 0
    r = json.loads((out / "result.json").read_text())
    for name in r["plots"]:
        assert (out / name).stat().st_size > 0
    assert r["layers"] == [0, 1, 2]
    seg = r["segments"]
    assert seg["question"]["num_tokens"] > 0 and seg["system"]["num_tokens"] > 0
    assert seg["generation"]["num_tokens"] > 0
    assert sum(s["num_tokens"] for s in seg.values()) == r["num_tokens"]
    # ρ(t) is the norm-weighted mean of α_l(t): check it on the first example
    ex = r["examples"][0]
    norms = r["vector_norms"]
    for t in (0, len(ex["tokens"]) // 2, len(ex["tokens"]) - 1):
        rho = sum(ex["alpha"][str(l)][t] * norms[str(l)] for l in range(3)) / sum(norms.values())
        assert ex["relative_magnitude"][t] == pytest.approx(rho, rel=1e-5)
    # the question segment is exactly the question's text
    from steering.problems import load_benchmark

    question = load_benchmark("procedural:arithmetic:3").problems[0]["question"]
    text = "".join(tok for tok, s in zip(ex["tokens"], ex["segments"]) if s == "question")
    assert "".join(text.split()) == "".join(question.split())
    assert all(st["min"] > 0 for st in r["alpha_stats"].values())
    assert max(st["std"] for st in r["alpha_stats"].values()) > 0.01
    # a checkpoint without gates is refused before any model loads
    code = main(["token-scaling", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x"),
                 "--benchmarks", "procedural:arithmetic:2"])
    assert code == 2 and "token_scaling: true" in capsys.readouterr().err
