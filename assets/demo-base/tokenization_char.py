"""The demo base's character-level tokenizer: exactly what tokenizer.json describes (one token per character).

Only here so that ``AutoTokenizer.from_pretrained(path, trust_remote_code=True)`` keeps these ids too; without
trust_remote_code, AutoTokenizer loads the same tokenizer.json as a plain ``TokenizersBackend``."""

from transformers import PreTrainedTokenizerFast


class CharTokenizer(PreTrainedTokenizerFast):
    pass
