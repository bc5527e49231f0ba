"""Properties of the steering vector and its checkpoint format (issue: core)."""

import json

import pytest
import torch
from peft import PeftModel
from torch import nn

from steering import compat
from steering import vectors as sv
from steering.tiny import tiny_config, tiny_model

ARCHS = ["qwen2", "llama"]


def ids(batch=2, seq=9, vocab=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, seq), generator=g)


def random_vectors(model, layers, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    return {layer: torch.randn(hidden, generator=g) * scale for layer in layers}


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_vectors_give_bit_identical_logits(arch):
    x = ids()
    base_logits = tiny_model(arch)(x).logits
    steered = sv.attach_steering(tiny_model(arch))
    assert torch.equal(steered(x).logits, base_logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 1])
def test_vector_at_layer_equals_adding_to_hidden_state(arch, layer):
    x = ids()
    base = tiny_model(arch)
    with torch.no_grad():
        ref = base(x, output_hidden_states=True).hidden_states
    model = sv.attach_steering(tiny_model(arch), layers=[layer])
    s = random_vectors(model, [layer])[layer]
    sv.set_vectors(model, {layer: s})
    with torch.no_grad():
        got = model(x, output_hidden_states=True).hidden_states
    # Layers before l are untouched; layer l's output is the base output plus s, at every position.
    for j in range(layer + 1):
        assert torch.equal(got[j], ref[j])
    torch.testing.assert_close(got[layer + 1], ref[layer + 1] + s, rtol=0, atol=1e-5)
    # The difference is non-trivial (the test can fail).
    assert (got[layer + 2] - ref[layer + 2]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_vector_equals_hook_before_final_norm(arch):
    x = ids()
    base = tiny_model(arch)
    last = base.config.num_hidden_layers - 1
    s = torch.randn(base.config.hidden_size)
    handle = base.model.layers[last].register_forward_hook(
        lambda mod, inp, out: (out[0] + s, *out[1:]) if isinstance(out, tuple) else out + s
    )
    with torch.no_grad():
        ref = base(x).logits
    handle.remove()
    model = sv.attach_steering(tiny_model(arch), layers=[last])
    sv.set_vectors(model, {last: s})
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_vectors_get_gradients(arch, checkpointing):
    model = sv.attach_steering(tiny_model(arch))
    model.train()
    if checkpointing:
        sv.enable_activation_checkpointing(model)
        assert compat.activation_checkpointing_enabled(model)
    x = ids()
    model(x, labels=x).loss.backward()
    vec = sv.vector_parameters(model)
    assert sorted(vec) == list(range(model.config.num_hidden_layers))
    for layer, p in vec.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {layer} got no gradient"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(vec)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_gradient_checkpointing_matches_plain_gradients():
    grads = []
    for checkpointing in (False, True):
        model = sv.attach_steering(tiny_model("qwen2"))
        sv.set_vectors(model, random_vectors(model, range(3)))
        model.train()
        if checkpointing:
            sv.enable_activation_checkpointing(model)
        x = ids()
        model(x, labels=x).loss.backward()
        grads.append({k: p.grad.clone() for k, p in sv.vector_parameters(model).items()})
    for layer in grads[0]:
        torch.testing.assert_close(grads[0][layer], grads[1][layer], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_base_parameters_bit_identical_after_optimizer_step(arch):
    model = sv.attach_steering(tiny_model(arch))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(sv.param_groups(model, lr=1e-2, layer_lr={0: 1e-1}), weight_decay=0.0)
    model.train()
    x = ids()
    for _ in range(2):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    for n, p in before.items():
        assert torch.equal(after[n], p), n
    assert all(v.abs().sum() > 0 for v in sv.get_vectors(model).values())


def test_per_layer_learning_rate_and_layer_subset():
    model = sv.attach_steering(tiny_model("qwen2"), layers=[2])
    assert sv.steered_layers(model) == [2]
    groups = sv.param_groups(model, lr=1e-3, layer_lr={2: 0.5})
    assert len(groups) == 1 and groups[0]["lr"] == 0.5 and groups[0]["layer"] == 2
    opt = torch.optim.SGD(groups, lr=1e-3)
    x = ids()
    model(x, labels=x).loss.backward()
    g = sv.vector_parameters(model)[2].grad.clone()
    opt.step()
    torch.testing.assert_close(sv.get_vectors(model)[2], -0.5 * g.reshape(-1))
    with pytest.raises(sv.SteeringError, match="not steered"):
        sv.param_groups(model, lr=1e-3, layer_lr={0: 0.1})


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_exact(arch, tmp_path):
    model = sv.attach_steering(tiny_model(arch), layers=[0, 2])
    vecs = random_vectors(model, [0, 2])
    sv.set_vectors(model, vecs)
    out = sv.save_checkpoint(model, tmp_path / "ck", base_model="tiny", step=7, training_config={"lr": 0.1})
    meta = json.loads((out / "steering.json").read_text())
    assert meta["layers"] == [0, 2] and meta["hidden_size"] == 32 and meta["step"] == 7
    assert meta["num_hidden_layers"] == 3 and meta["training_config"] == {"lr": 0.1}
    loaded = sv.load_steered_model(out, base=tiny_model(arch))
    for layer, v in sv.get_vectors(loaded).items():
        assert torch.equal(v, vecs[layer])
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert not list(tmp_path.glob(".ck.tmp-*")), "temporary directory left behind"


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_from_pretrained_parity(arch, tmp_path):
    model = sv.attach_steering(tiny_model(arch), layers=[1, 2])
    sv.set_vectors(model, random_vectors(model, [1, 2]))
    sv.save_checkpoint(model, tmp_path / "ck", base_model="tiny")
    cfg = json.loads((tmp_path / "ck" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BEFT"
    ours = sv.load_steered_model(tmp_path / "ck", base=tiny_model(arch))
    theirs = PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "ck"))
    x = ids()
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
        assert torch.equal(a, b)
        assert (a - tiny_model(arch)(x).logits).abs().max() > 1e-3


def test_init_from_file_and_mapping(tmp_path):
    src = sv.attach_steering(tiny_model("qwen2"), layers=[1])
    vecs = random_vectors(src, [1])
    sv.set_vectors(src, vecs)
    sv.save_checkpoint(src, tmp_path / "ck", base_model="tiny")
    from_dir = sv.attach_steering(tiny_model("qwen2"), layers=[0, 1], init=tmp_path / "ck")
    got = sv.get_vectors(from_dir)
    assert torch.equal(got[1], vecs[1]) and torch.equal(got[0], torch.zeros(32))
    from_file = sv.attach_steering(tiny_model("qwen2"), layers=[1], init=tmp_path / "ck" / "adapter_model.safetensors")
    assert torch.equal(sv.get_vectors(from_file)[1], vecs[1])
    with pytest.raises(sv.SteeringError, match="not steered"):
        sv.attach_steering(tiny_model("qwen2"), layers=[0], init=tmp_path / "ck")


def test_fp32_vectors_on_bf16_base():
    model = sv.attach_steering(tiny_model("qwen2", dtype=torch.bfloat16))
    for p in sv.vector_parameters(model).values():
        assert p.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
    x = ids()
    model.train()
    out = model(x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for p in sv.vector_parameters(model).values():
        assert p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
    # A tiny update survives in fp32 where bf16 would round it away.
    with torch.no_grad():
        p = sv.vector_parameters(model)[0]
        p.fill_(1.0)
        p.add_(1e-4)
        assert p[0, 0].item() != 1.0


def test_global_multiplier_and_disable():
    x = ids()
    base_logits = tiny_model("qwen2")(x).logits
    model = sv.attach_steering(tiny_model("qwen2"), layers=[0, 1, 2])
    vecs = random_vectors(model, [0, 1, 2])
    sv.set_vectors(model, vecs)
    with torch.no_grad():
        steered = model(x).logits
        doubled_model = sv.attach_steering(tiny_model("qwen2"))
        sv.set_vectors(doubled_model, {k: 2 * v for k, v in vecs.items()})
        with sv.steering_scale(model, 2.0):
            torch.testing.assert_close(model(x).logits, doubled_model(x).logits, rtol=0, atol=0)
        with sv.steering_scale(model, 0.0):
            assert torch.equal(model(x).logits, base_logits)
        with sv.steering_disabled(model):
            assert torch.equal(model(x).logits, base_logits)
        assert torch.equal(model(x).logits, steered)
    for layer, v in sv.get_vectors(model).items():
        assert torch.equal(v, vecs[layer])


@pytest.mark.parametrize("hidden,layers", [(64, 3), (32, 2)])
def test_shape_mismatch_names_both_shapes(tmp_path, hidden, layers):
    src = sv.attach_steering(tiny_model("qwen2"), layers=[0, 2])
    sv.save_checkpoint(src, tmp_path / "ck", base_model="tiny")
    other = tiny_model("qwen2", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden)
    with pytest.raises(sv.CheckpointError) as err:
        sv.load_steered_model(tmp_path / "ck", base=other)
    msg = str(err.value)
    assert "32" in msg and f"{layers} layers x hidden size {hidden}" in msg


def test_unsupported_architecture_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(sv.SteeringError, match="'gpt2' is not supported.*qwen2.*llama"):
        sv.attach_steering(model)


def test_layer_out_of_range_errors():
    with pytest.raises(sv.SteeringError, match=r"layers \[3\] out of range.*0\.\.2"):
        sv.attach_steering(tiny_model("qwen2"), layers=[0, 3])


def test_incomplete_and_corrupt_checkpoints_fail_clearly(tmp_path):
    model = sv.attach_steering(tiny_model("qwen2"))
    ck = sv.save_checkpoint(model, tmp_path / "ck", base_model="tiny")
    (ck / "steering.json").unlink()
    with pytest.raises(sv.CheckpointError, match="steering.json is missing"):
        sv.load_steered_model(ck, base=tiny_model("qwen2"))
    ck = sv.save_checkpoint(model, tmp_path / "ck2", base_model="tiny")
    data = (ck / "adapter_model.safetensors").read_bytes()
    (ck / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(sv.CheckpointError, match="truncated or tampered"):
        sv.load_steered_model(ck, base=tiny_model("qwen2"))
    with pytest.raises(sv.CheckpointError, match="never pickle"):
        sv.load_vectors(tmp_path / "x.bin") if (tmp_path / "x.bin").write_bytes(b"x") else None


def test_vectors_are_real_parameters_named_like_peft():
    model = sv.attach_steering(tiny_model("llama"), layers=[1])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["base_model.model.model.layers.1.mlp.down_proj.beft_bias.default"]
    assert isinstance(sv.vector_parameters(model)[1], nn.Parameter)


def test_tampered_weights_fail_the_checksum(tmp_path):
    model = sv.attach_steering(tiny_model("qwen2"), layers=[0])
    sv.set_vectors(model, {0: torch.ones(32)})
    ck = sv.save_checkpoint(model, tmp_path / "ck", base_model="tiny")
    data = bytearray((ck / "adapter_model.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # one float changed in place: still a well-formed safetensors file
    (ck / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(sv.CheckpointError, match="checksum"):
        sv.load_steered_model(ck, base=tiny_model("qwen2"))


def test_save_refuses_to_replace_a_non_checkpoint_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(sv.CheckpointError, match="refusing"):
        sv.save_checkpoint(sv.attach_steering(tiny_model("qwen2")), tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_saved_char_tokenizer_round_trips_on_a_qwen2_model(tiny_base_dir):
    """AutoTokenizer swaps in Qwen2's own class for a qwen2 config and changes the ids; load_tokenizer must not."""
    from steering.tiny import build_char_tokenizer

    text = "<|im_start|>user\nWhat is 9 * 0?<|im_end|>\n\\(9 * 0 = \\boxed{0}\\)"
    loaded = sv.load_tokenizer(str(tiny_base_dir))
    assert loaded(text).input_ids == build_char_tokenizer()(text).input_ids
    assert loaded.padding_side == "left" and loaded.pad_token == "<|endoftext|>"


def test_add_to_hidden_adds_in_fp32_then_casts():
    # 1 + (2^-8 + 2^-18) in bf16: the vector cast to bf16 first rounds to exactly 2^-8, and 1 + 2^-8 is a tie that
    # rounds to even (1.0); added in fp32 first, the sum is just above the tie and rounds up to 1 + 2^-7.
    h = torch.ones(1, 2, 1, dtype=torch.bfloat16)
    v = torch.tensor([2.0 ** -8 + 2.0 ** -18])
    assert torch.equal(h + v.to(torch.bfloat16), h)
    got = sv.add_to_hidden(h, v)
    assert got.dtype == torch.bfloat16 and torch.equal(got, (h.float() + v).to(torch.bfloat16))
    assert got[0, 0, 0].item() == 1 + 2.0 ** -7
    # random bf16 states: always the fp32 sum cast back; only the masked positions change
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 32, generator=g).to(torch.bfloat16)
    v = torch.randn(32, generator=g)
    assert torch.equal(sv.add_to_hidden(h, v), (h.float() + v).to(torch.bfloat16))
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    masked = sv.add_to_hidden(h, v, mask)
    assert torch.equal(masked[mask], (h.float() + v).to(torch.bfloat16)[mask]) and torch.equal(masked[~mask], h[~mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_at_mlp_out_equals_the_beft_bias_bit_for_bit(dtype):
    from steering import hooks

    x = ids()
    s = torch.randn(32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hooked = hooks.run_with_hooks(tiny_model("qwen2", dtype=dtype), x,
                                      fwd_hooks=[("blocks.1.hook_mlp_out", hooks.add_at(s))]).logits
        steered = sv.attach_steering(tiny_model("qwen2", dtype=dtype), layers=[1], init={1: s})(x).logits
    assert torch.equal(hooked, steered)


def test_check_fits_is_one_line_naming_both_shapes_and_the_fix():
    config = tiny_config("qwen2")  # 3 layers x hidden size 32
    sv.check_fits({0: torch.zeros(32), 2: torch.zeros(32)}, config)
    cases = {"wide": {0: torch.zeros(48)}, "too deep": {3: torch.zeros(32)}, "negative": {-1: torch.zeros(32)},
             "empty": {}}
    for vectors in cases.values():
        with pytest.raises(sv.CheckpointError) as err:
            sv.check_fits(vectors, config, source="init_from: v.gguf", target="the base", fix="give other vectors")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("init_from: v.gguf does not fit the base")
        assert "the base has 3 layers x hidden size 32" in msg and msg.endswith("; give other vectors")
    model = sv.attach_steering(tiny_model("qwen2"), layers=[0])
    with pytest.raises(sv.CheckpointError, match=r"hidden size \[48\].*3 layers x hidden size 32"):
        sv.set_vectors(model, {0: torch.zeros(48)})


@pytest.mark.parametrize("content, message", [
    ("5", "must hold a JSON object"),
    ("null", "must hold a JSON object"),
    ('["layers"]', "must hold a JSON object"),
    ('{"layers": "0,1", "hidden_size": 32, "num_hidden_layers": 3}', "not a non-empty list"),
    ('{"layers": [], "hidden_size": 32, "num_hidden_layers": 3}', "not a non-empty list"),
    ('{"layers": [0, 7], "hidden_size": 32, "num_hidden_layers": 3}', "in 0..2"),
    ('{"layers": [1, 1], "hidden_size": 32, "num_hidden_layers": 3}', "not distinct"),
    ('{"layers": [0], "hidden_size": "32", "num_hidden_layers": 3}', "hidden_size is '32'"),
    ('{"layers": [0], "hidden_size": 32, "num_hidden_layers": 0}', "num_hidden_layers is 0"),
])
def test_a_hostile_steering_json_is_one_checkpoint_error(tmp_path, content, message):
    """Issue 25: steering.json holding 5 or null was a TypeError in every command; a layer list that disagrees with the
    model (or is a string) was accepted by some commands. The one reader refuses each in one line."""
    (tmp_path / sv.META_FILE).write_text(content)
    with pytest.raises(sv.CheckpointError) as err:
        sv.read_meta(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
