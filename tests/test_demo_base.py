"""The offline demo's base model: the committed build, and the build script itself."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from steering.tasks import is_heldout
from train.demo_base import (
    DEFAULT_PATH,
    FORMATS,
    SYSTEM_PROMPT,
    build_demo_base,
    build_prompt,
    built_task,
    ensure_demo_base,
    heldout_rows,
    heldout_stats,
    is_built,
    make_completion,
    score_completion,
    steering_sanity_check,
)


def test_score_completion():
    assert score_completion("\\(12 + 7 = \\boxed{19}\\)", "19") == {
        "boxed": True, "number_correct": True, "boxed_correct": True}
    assert score_completion("So 12 + 7 = 19.", "19") == {
        "boxed": False, "number_correct": True, "boxed_correct": False}
    assert score_completion("\\(14 - 95 = \\boxed{-81}\\)", "-81")["boxed_correct"]
    assert not score_completion("\\(14 - 95 = \\boxed{81}\\)", "-81")["boxed_correct"]


def test_prompt_is_the_qwen_math_template_rendering():
    """The demo base is pretrained on exactly the prompts the demo's RL run and evaluation render (the ``qwen_math``
    template), byte for byte the ChatML text the committed base was built on."""
    from steering.templates import get_template
    from steering.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    qwen_math = get_template("qwen_math")
    assert SYSTEM_PROMPT == qwen_math.system
    for question in ("What is 7 * 8?", "Compute 3 - 9.", "x {question} \\boxed{}"):
        assert build_prompt(tok, question) == qwen_math.render(question, tok) == (
            "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_completion_formats():
    assert abs(sum(p for _, p, _ in FORMATS) - 1) < 1e-9
    rng = random.Random(0)
    seen = {}
    for _ in range(400):
        name, text = make_completion("What is 7 * 8?", "56", rng)
        seen[name] = text
        assert "7 * 8 = " in text and score_completion(text, "56")["number_correct"]
        # Only the boxed format earns reward, and the first character alone tells it apart.
        assert score_completion(text, "56")["boxed_correct"] == (name == "boxed") == text.startswith("\\")
        if name == "boxed":
            assert len(text) < 30  # the rewarded form fits the demo's max_completion_length with the end token
    assert set(seen) == {name for name, _, _ in FORMATS}


# --------------------------------------------------------------------------------------------------------------------
# The committed model


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM

    from steering.vectors import load_tokenizer

    if not is_built(DEFAULT_PATH):
        pytest.fail(f"the demo base is not committed at {DEFAULT_PATH}; build it: python -m train.demo_base")
    tok = load_tokenizer(str(DEFAULT_PATH))
    model = AutoModelForCausalLM.from_pretrained(str(DEFAULT_PATH), dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="module")
def rows():
    task, task_kwargs = built_task(DEFAULT_PATH)
    rows = heldout_rows(120, task=task, **task_kwargs)
    assert len(rows) >= 80 and all(is_heldout(r["question"]) for r in rows)
    return rows


def test_committed_model_loads_offline(demo):
    from transformers import AutoTokenizer

    from steering.tiny import build_char_tokenizer
    from steering.vectors import load_tokenizer

    model, tok = demo
    assert model.config.model_type == "qwen2"
    assert model.config.max_position_embeddings >= 256
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.pad_token_id
    # AutoTokenizer (with or without trust_remote_code) and load_tokenizer give the in-process tokenizer's ids, and
    # the chat template survives the round trip.
    ref = build_char_tokenizer()
    q = "What is 12 + 7?"
    assert build_prompt(ref, q).startswith("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n")
    want = ref(build_prompt(ref, q)).input_ids
    for t in (tok, load_tokenizer(str(DEFAULT_PATH)),
              AutoTokenizer.from_pretrained(str(DEFAULT_PATH), trust_remote_code=True)):
        assert build_prompt(t, q) == build_prompt(ref, q)
        assert t(build_prompt(t, q)).input_ids == want
        assert t.decode(want) == ref.decode(want)
    info = json.loads((DEFAULT_PATH / "build_info.json").read_text())
    assert {"args", "seed", "torch", "wall_seconds", "heldout"} <= set(info)
    # the script's defaults are the committed model's recipe: `python -m train.demo_base` rebuilds it
    from train.demo_base import DEFAULTS, FORMATS

    assert info["args"] == {k: DEFAULTS[k] for k in info["args"]} and set(info["args"]) == set(DEFAULTS)
    assert info["formats"] == [{"name": n, "p": p, "format": f} for n, p, f in FORMATS]
    size = sum(f.stat().st_size for f in DEFAULT_PATH.iterdir())
    assert size < 20e6


def test_committed_model_knows_answers_but_rarely_boxes(demo, rows):
    model, tok = demo
    greedy = heldout_stats(model, tok, rows, temperature=0.0)
    assert greedy["number_correct"] >= 0.9, greedy
    assert greedy["p_boxed"] <= 0.05, greedy
    sampled = heldout_stats(model, tok, rows, temperature=1.0, seed=0)
    assert 0.1 <= sampled["p_boxed"] <= 0.45, sampled  # boxed answers are a minority at T=1...
    assert sampled["correct_given_boxed"] >= 0.85, sampled  # ...but right when they come
    assert sampled["number_correct"] >= 0.85, sampled
    assert sampled["boxed_correct"] <= 0.45, sampled


def test_last_layer_vector_elicits_boxed_answers():
    # Plain cross-entropy on 32 boxed examples, last layer only: the reward RL can reach is there to be had.
    res = steering_sanity_check(DEFAULT_PATH, n_train=32, steps=40, lr=0.3, n_eval=92)
    assert res["before"]["boxed_correct"] <= 0.45, res
    assert res["after"]["boxed_correct"] >= 0.75, res
    assert res["after"]["boxed_correct"] >= res["before"]["boxed_correct"] + 0.4, res


# --------------------------------------------------------------------------------------------------------------------
# The build script

TINY = dict(steps=3, batch_size=4, eval_size=4, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


def test_tiny_build_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_demo_base(tmp_path / "db", progress=False, **TINY)
    assert is_built(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 32
    enc = tok(build_prompt(tok, "What is 1 + 2?"), return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] <= enc["input_ids"].shape[1] + 3
    info = json.loads((out / "build_info.json").read_text())
    assert info["args"]["steps"] == 3 and info["seed"] == 0
    assert set(info["heldout"]) >= {"greedy", "sample_t1"}
    # The tokenizer files do not depend on the model: a build writes exactly the committed ones.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenization_char.py"):
        assert (out / name).read_bytes() == (DEFAULT_PATH / name).read_bytes(), name
    # ensure_demo_base does not rebuild an existing model; a missing one it builds.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_base(out) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime
    other = ensure_demo_base(tmp_path / "missing", progress=False, **{**TINY, "eval_size": 0})
    assert is_built(other)


def test_tiny_builds_are_bit_identical(tmp_path):
    a = build_demo_base(tmp_path / "a", seed=1, progress=False, **TINY)
    b = build_demo_base(tmp_path / "b", seed=1, progress=False, **TINY)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = build_demo_base(tmp_path / "c", seed=2, progress=False, **TINY)
    wc = load_file(str(c / "model.safetensors"))
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_unknown_option_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="unknown options"):
        build_demo_base(tmp_path / "x", progress=False, stepz=3)
