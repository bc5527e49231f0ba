"""Tiny models and a character-level tokenizer, built in-process, for tests and the offline demo.

No network is needed: the tokenizer is made from a fixed character set with the ``tokenizers`` library, and the
models are random-weight Qwen2 / Llama models built from a config.
"""

from __future__ import annotations

import string

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
# Every printable ASCII character is a token; the tokenizer never splits a character or merges two.
CHARACTERS = list(string.digits + string.ascii_letters + string.punctuation + " \n")

# Qwen2.5's chat template, reduced to what the templates here use (system / user / assistant turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per printable ASCII character and Qwen-style chat tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(arch: str = "qwen2", *, vocab_size: int | None = None, hidden_size: int = 32,
                num_hidden_layers: int = 3, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                intermediate_size: int = 64, max_position_embeddings: int = 512):
    """Config of a small Qwen2 or Llama model (GQA by default, so patching code sees grouped heads)."""
    from transformers import LlamaConfig, Qwen2Config

    if vocab_size is None:
        vocab_size = len(SPECIAL_TOKENS) + len(CHARACTERS)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        bos_token_id=None, eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"), tie_word_embeddings=False,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"tiny_config: arch must be 'qwen2' or 'llama', got {arch!r}")


def tiny_model(arch: str = "qwen2", seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """A random-weight causal LM of the given family, deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = f"tiny-{arch}"
    return model.eval()


def scripted_model(tokenizer, pairs, *, vocab_size: int, seed: int = 0, max_steps: int = 400, **kwargs):
    """A tiny Qwen2 whose greedy continuation of each ``(prompt, completion)`` pair's prompt is that completion (and
    beyond, whatever it learned), on a real tokenizer's full vocabulary.

    Training on a 150k-token vocabulary is slow, so the model is trained on the sub-vocabulary of the pairs' tokens
    and then written into a ``vocab_size`` model: those tokens' embedding and unembedding rows are the trained ones,
    every other unembedding row is zero (logit 0). The loss counts the other tokens as one class of logit
    ``log(vocab_size - k)``, so a trained token wins only with a logit that beats all of them; training stops once
    every completion token is the argmax with logit > 1. Same transformer weights, same logits on these tokens:
    the full model continues exactly as the trained one."""
    import math

    rows, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    used = sorted({t for r in rows for t in r})
    small_id = {t: i for i, t in enumerate(used)}
    kwargs = {"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 1024, **kwargs}
    small = tiny_model("qwen2", seed=seed, vocab_size=len(used), **kwargs)
    width = max(map(len, rows))
    ids = torch.tensor([[small_id[t] for t in r] + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([[small_id.get(t, -100) for t in lab] + [-100] * (width - len(lab)) for lab in labels])[:, 1:]
    sel = target != -100
    others = math.log(vocab_size - len(used))
    opt = torch.optim.Adam(small.parameters(), lr=1e-2)
    small.train()
    for step in range(max_steps):
        opt.zero_grad()
        logits = small(input_ids=ids, attention_mask=mask).logits[:, :-1][sel]
        logits = torch.cat([logits, torch.full((logits.shape[0], 1), others)], dim=1)
        torch.nn.functional.cross_entropy(logits, target[sel]).backward()
        opt.step()
        if step % 20 == 19:
            with torch.no_grad():
                lg = small(input_ids=ids, attention_mask=mask).logits[:, :-1][sel]
            if bool(((lg.argmax(-1) == target[sel]) & (lg.max(-1).values > 1.0)).all()):
                break
    else:
        raise RuntimeError(f"scripted_model: the completions were not learnt in {max_steps} steps")
    full = tiny_model("qwen2", seed=seed, vocab_size=vocab_size, **kwargs)
    body = {n: p for n, p in small.state_dict().items() if "embed_tokens" not in n and "lm_head" not in n}
    missing = full.load_state_dict(body, strict=False).missing_keys
    if sorted(missing) != ["lm_head.weight", "model.embed_tokens.weight"]:
        raise RuntimeError(f"scripted_model: unexpected parameters left untrained: {missing}")
    with torch.no_grad():
        idx = torch.tensor(used)
        full.model.embed_tokens.weight[idx] = small.model.embed_tokens.weight
        full.lm_head.weight.zero_()
        full.lm_head.weight[idx] = small.lm_head.weight
    return full.eval()
