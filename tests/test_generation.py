"""The static-cache backend (transformers' own static KV cache) samples from exactly HF ``generate``'s distribution, with
the steering vectors active; completions end where the template says on every backend."""

import pytest
import torch

from steering import compat
from steering import vectors as sv
from steering.generation import (
    GenerationError,
    SamplingParams,
    end_completions,
    generate,
)
from steering.tiny import build_char_tokenizer, tiny_model

ARCHS = ["qwen2", "llama"]
PROMPTS = ["a", "hello world", "the quick brown fox", "1+1=", "Why?"]  # different lengths: left padding


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def sharpen(model, k=8.0):
    """Scale the random weights up so next-token distributions are peaked and greedy paths are varied."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(k)
    return model


def steered(arch, layers=(0, 2), scale=1.0, seed=0, dtype=torch.float32):
    model = sv.attach_steering(sharpen(tiny_model(arch, dtype=dtype)), layers=list(layers))
    g = torch.Generator().manual_seed(seed)
    sv.set_vectors(model, {l: torch.randn(model.config.hidden_size, generator=g) * scale for l in layers})
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_static_is_token_identical_to_hf(arch, tok):
    model = steered(arch)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    hf = generate(model, tok, PROMPTS, params, backend="hf")
    fast = generate(model, tok, PROMPTS, params, backend="static")
    assert fast.completion_ids == hf.completion_ids
    assert fast.completions == hf.completions
    assert all(len(c) == 24 for c in hf.completion_ids)
    # The vectors are active in both paths: switching them off changes the greedy completions.
    with sv.steering_disabled(model):
        base = generate(model, tok, PROMPTS, params, backend="static")
    assert base.completion_ids != fast.completion_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_early_eos_rows_stop_and_keep_eos(arch, tok):
    model = steered(arch)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    ref = generate(model, tok, PROMPTS, params, backend="hf")
    # Pick an end token that some greedy completions reach early and at least one never produces.
    counts = {}
    for row in ref.completion_ids:
        for t in set(row[:12]):
            counts[t] = counts.get(t, 0) + 1
    stop = next(t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c < len(PROMPTS))
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop])
    hf = generate(model, tok, PROMPTS, params, backend="hf")
    fast = generate(model, tok, PROMPTS, params, backend="static")
    assert fast.completion_ids == hf.completion_ids
    assert fast.finished == hf.finished
    assert any(fast.finished) and not all(fast.finished)
    for row, fin in zip(fast.completion_ids, fast.finished):
        assert (row[-1] == stop) == fin
        assert row.count(stop) <= 1
        assert fin or len(row) == 20


@pytest.mark.parametrize(
    "arch,params",
    [
        ("qwen2", SamplingParams(max_new_tokens=40, temperature=1.0)),
        ("llama", SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, top_k=20)),
    ],
)
def test_sampling_same_seed_gives_identical_tokens(arch, params, tok):
    """Same processors, same softmax + multinomial, same random stream: the same samples, EOS stops included."""
    model = steered(arch)
    hf = generate(model, tok, PROMPTS, params, backend="hf", seed=7, num_return_sequences=4)
    fast = generate(model, tok, PROMPTS, params, backend="static", seed=7, num_return_sequences=4)
    assert fast.completion_ids == hf.completion_ids
    assert fast.finished == hf.finished
    other = generate(model, tok, PROMPTS, params, backend="static", seed=8, num_return_sequences=4)
    assert other.completion_ids != fast.completion_ids


def _filtered_probs(logits, temperature, top_k, top_p):
    """Reference next-token distribution: temperature, then top-k, then top-p (transformers' order and rules)."""
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1:
        sorted_p, idx = torch.sort(probs, descending=False)
        remove_sorted = sorted_p.cumsum(-1) <= 1 - top_p
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, idx, remove_sorted)
        probs = torch.softmax(logits.masked_fill(remove, float("-inf")), -1)
    return probs


def test_sampled_tokens_follow_the_model_distribution(tok):
    """Statistical check, independent of transformers' sampler: first and second tokens of the static path."""
    model = steered("qwen2", scale=0.5)
    t, k, p = 0.8, 12, 0.95
    params = SamplingParams(max_new_tokens=2, temperature=t, top_k=k, top_p=p)
    n = 3000
    out = generate(model, tok, ["hello"], params, backend="static", seed=0, num_return_sequences=n)
    prompt = out.prompt_ids[0]
    with torch.no_grad():
        first_logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = _filtered_probs(first_logits, t, k, p)
    first = torch.tensor([c[0] for c in out.completion_ids])
    observed = torch.bincount(first, minlength=expected.numel()).float() / n
    assert (observed[expected == 0] == 0).all(), "sampled a token that top-k/top-p removes"
    assert 0.5 * (observed - expected).abs().sum() < 0.05  # total variation; ~0.02 expected from noise
    # Second token, conditioned on the most frequent first token.
    top = int(torch.mode(first).values)
    rows = [c for c in out.completion_ids if c[0] == top and len(c) > 1]
    with torch.no_grad():
        second_logits = model(torch.tensor([prompt + [top]])).logits[0, -1]
    expected2 = _filtered_probs(second_logits, t, k, p)
    observed2 = torch.bincount(torch.tensor([c[1] for c in rows]), minlength=expected2.numel()).float() / len(rows)
    assert (observed2[expected2 == 0] == 0).all()
    assert 0.5 * (observed2 - expected2).abs().sum() < 0.12


def test_plain_base_model_token_prompts_and_chunking(tok):
    """No PEFT wrapper, token-id prompts, and chunked batches give the same greedy results."""
    model = sharpen(tiny_model("llama", seed=3)).eval()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    hf = generate(model, tok, prompts, params, backend="hf", num_return_sequences=2)
    fast = generate(model, tok, prompts, params, backend="static", batch_size=4, num_return_sequences=2)
    assert fast.completion_ids == hf.completion_ids
    assert len(fast.completion_ids) == 2 * len(prompts) and fast.prompt_ids[2] == prompts[1]
    assert fast.stats["chunks"] == 3


def test_errors_and_helpers(tok):
    model = tiny_model("qwen2")
    with pytest.raises(GenerationError, match="unknown generation backend 'tgi'"):
        generate(model, tok, ["a"], SamplingParams(max_new_tokens=2), backend="tgi")
    with pytest.raises(GenerationError, match="VLLMModel"):
        generate(model, tok, ["a"], SamplingParams(max_new_tokens=2), backend="vllm")
    with pytest.raises(GenerationError, match="CUDA only"):
        generate(model, tok, ["a"], SamplingParams(max_new_tokens=2), backend="static", compile=True)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(max_new_tokens=1, top_p=0.0)
    with pytest.raises(TypeError, match="all strings or all token-id lists"):
        generate(model, tok, [[5, 6], "a"], SamplingParams(max_new_tokens=2))
    comp, how = end_completions(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), [2])
    assert comp == [[5, 2], [5, 6, 7, 8]] and how == ["eos", "length"]
    cfg = SamplingParams(max_new_tokens=3, temperature=0).generation_config(tok, model)
    assert cfg.do_sample is False and tok.eos_token_id in cfg.eos_token_id


def _progression(g, n):
    import string

    letters = string.ascii_lowercase
    start, step = int(torch.randint(26, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    return "".join(letters[(start + i * step) % 26] for i in range(n))


def _train_progressions(model, tok, steps):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.tensor([tok(_progression(g, 48))["input_ids"] for _ in range(32)], device=model.device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_static_compiled_agrees_with_hf_greedy(tok):
    """bf16 on CUDA, where transformers compiles the static-cache forward (CUDA graphs): >= 99% of greedy tokens
    agree with the dynamic-cache HF path, and the compiled path is deterministic."""
    # A random tiny model has near-uniform logits, which bf16 rounds into exact ties, so greedy decoding is
    # ill-posed there. Train it for a few seconds to continue letter progressions ("adgj" -> "mpsv..."): confident
    # predictions, varied tokens.
    model = tiny_model("qwen2", seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, intermediate_size=512).cuda()
    _train_progressions(model, tok, steps=200)
    model = sv.attach_steering(model.to(torch.bfloat16)).eval()
    g = torch.Generator().manual_seed(0)
    sv.set_vectors(model, {l: torch.randn(256, generator=g) * 0.05 for l in range(4)})
    g = torch.Generator().manual_seed(1)
    prompts = [_progression(g, 4 + i % 9) for i in range(32)]  # 4..12 letters: left padding
    params = SamplingParams(max_new_tokens=64, temperature=0)
    hf = generate(model, tok, prompts, params, backend="hf")
    fast = generate(model, tok, prompts, params, backend="static")
    again = generate(model, tok, prompts, params, backend="static")  # graph replays
    assert again.completion_ids == fast.completion_ids
    agree = sum(int(a == b) for x, y in zip(hf.completion_ids, fast.completion_ids) for a, b in zip(x, y))
    total = sum(min(len(x), len(y)) for x, y in zip(hf.completion_ids, fast.completion_ids))
    assert agree / total >= 0.99, f"only {agree}/{total} greedy positions agree"


# --------------------------------------------------------------------------------------------------------------------
# The static rollouts inside a real TRL GRPOTrainer (its public rollout_func argument)


def _grpo_trainer(tmp_path, tok, rollout_func=None):
    """A tiny GRPOTrainer whose reward function records the completion ids TRL hands it."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    seen: list[list[list[int]]] = []

    def reward(completions, completion_ids, **kwargs):
        seen.append([list(map(int, c)) for c in completion_ids])
        return [float(sum(map(ord, c)) % 7) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=12,
        max_steps=2, learning_rate=1e-2, beta=0.0, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
        seed=0, bf16=False, temperature=1.0, dataloader_num_workers=0,
        **{compat.training_arg_name("gradient_checkpointing"): False})
    dataset = Dataset.from_dict({"prompt": ["a", "hello world", "1+1=", "Why?"]})
    trainer = GRPOTrainer(model=steered("qwen2", scale=0.5), reward_funcs=[reward], args=args,
                          train_dataset=dataset, processing_class=tok, rollout_func=rollout_func)
    return trainer, seen


def test_static_rollouts_equal_trls_own_in_real_grpo_steps(tmp_path, tok):
    """Same seed, same model: two GRPO steps with TRL's own generation and two with ``rollout_func=Rollouts("static")``
    sample the same completions token for token, and so end with the same vectors."""
    from train.rollout import Rollouts

    ref, ref_seen = _grpo_trainer(tmp_path / "trl", tok)
    ref.train()
    rollouts = Rollouts("static")
    ours, our_seen = _grpo_trainer(tmp_path / "ours", tok, rollout_func=rollouts)
    ours.train()
    assert rollouts.stats["calls"] == 2 and rollouts.stats["completion_tokens"] > 0
    assert len(ref_seen) == 2 and our_seen == ref_seen
    assert len({tuple(map(tuple, s)) for s in ref_seen}) == 2  # the steps sampled different things
    before, a, b = sv.get_vectors(steered("qwen2", scale=0.5)), sv.get_vectors(ref.model), sv.get_vectors(ours.model)
    assert any(not torch.equal(before[l], a[l]) for l in before)  # a gradient step was taken
    for layer in a:
        torch.testing.assert_close(b[layer], a[layer], rtol=1e-6, atol=1e-7)


def test_pad_rows_left_for_generation_right_for_teacher_forcing():
    from steering.generation import GenerationError, pad_rows

    rows = [[5, 6, 7], [8], []]
    ids, mask = pad_rows(rows, 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_rows(rows, 9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    with pytest.raises(GenerationError, match="'left' or 'right'"):
        pad_rows(rows, 0, side="middle")
