"""The benchmark command: real shapes are right, and the CPU/tiny run produces every figure for both trainers."""

import json

import pytest
import torch

from train import benchmark as bench


@pytest.mark.parametrize(
    "shape,params,layers",
    [
        ("qwen2.5-math-1.5b", 1_543_714_304, 28),
        ("qwen2.5-math-7b", 7_615_616_512, 28),
        ("llama-3.1-8b", 8_030_261_248, 32),
    ],
)
def test_real_shapes_have_the_published_parameter_counts(shape, params, layers):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench.build_config(shape))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.num_hidden_layers == layers


def test_synthetic_tokenizer_round_trips_random_prompts():
    tok = bench.build_tokenizer(300)
    prompts = bench.random_prompts(3, 7, 300, seed=0)
    ids = tok(prompts)["input_ids"]
    assert all(len(row) == 7 and min(row) >= 2 for row in ids)
    assert tok.decode(ids[0]) == prompts[0]
    assert tok.eos_token_id == bench.EOS_ID and tok.pad_token_id == bench.PAD_ID


def test_tiny_cpu_run_reports_both_trainers(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main([
        "--shape", "tiny", "--device", "cpu", "--prompts", "2", "--generations", "2", "--prompt-len", "8",
        "--new-tokens", "8", "--steps", "2", "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    trl, ours = report["results"]
    assert trl["trainer"] == "trl" and ours["trainer"] == "ours[static]"
    for r in (trl, ours):
        assert len(r["step_times_s"]) == 2 and r["step_time_s"] > 0
        assert r["rollout_decode_tok_per_s"] > 0 and r["train_tok_per_s"] > 0 and r["peak_memory_gib"] > 0
        assert r["completion_tokens_per_step"] > 0
    # Same seed, same model, same sampler: the two trainers see the same rollouts, hence the same loss.
    assert trl["final_loss"] == pytest.approx(ours["final_loss"], abs=1e-6)
    assert report["speedup_step"] > 0
    assert saved["command"].startswith("python -m train.benchmark --shape tiny")


def test_generate_mode_and_memory_check_defaults(tmp_path):
    report = bench.main(["--mode", "generate", "--shape", "tiny", "--device", "cpu", "--prompts", "2",
                         "--generations", "2", "--prompt-len", "4", "--new-tokens", "6", "--steps", "2"])
    assert [r["backend"] for r in report["results"]] == ["hf", "static"]
    assert all(r["decode_tok_per_s"] > 0 for r in report["results"])
    ns = bench.parse_args(["--memory-check", "--device", "cpu"])
    assert (ns.shape, ns.prompts, ns.generations, ns.prompt_len + ns.new_tokens) == ("qwen2.5-math-7b", 1, 16, 4096)
    assert ns.skip_trl and ns.gradient_checkpointing and ns.micro_batch == 2
    with pytest.raises(SystemExit):
        bench.build_config("gpt-5")
