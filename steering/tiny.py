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
