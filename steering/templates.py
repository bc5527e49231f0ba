"""Prompt templates: how a problem becomes the prompt, and where the reward looks for the answer.

Two built-ins reproduce the papers (docs/recipe.md):

- ``qwen_math``: the tokenizer's chat template with the system message "Please reason step by step, and put your
  final answer within \\boxed{}.", the problem as the user turn and the generation prompt added; the answer is
  the last ``\\boxed{}``.
- ``r1``: a plain-text prompt for base models ending in ``Assistant: <think>``; the answer is the last
  ``<answer>...</answer>``, and generation stops at the first ``</answer>`` (kept), as public R1-template code does.

Each template owns where generation ends (:meth:`PromptTemplate.stops`): the tokenizer's EOS and the model's
``generation_config`` EOS always; for chat templates also the end-of-turn token the chat template writes after an
assistant message (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), whatever ``config.json`` and
``tokenizer_config.json`` say the EOS is; and the template's stop strings (``r1``: ``</answer>``).

Custom templates come from a file:

- ``.yaml`` / ``.yml`` / ``.json`` with the fields ``name`` (optional, defaults to the file name),
  ``answer_format`` (``boxed`` or ``answer_tag``, default ``boxed``), and either ``text`` (a plain-text prompt) or
  ``system`` and/or ``user`` (a chat prompt; ``user`` defaults to the bare problem). ``text`` or ``user`` must
  contain ``{question}``. Optional ``stop``: a list of stop strings (generation ends at the first token that completes
  one; that token is kept).
  In YAML, write a multi-line ``text`` with ``|-`` unless you want its final newline in the prompt.
- ``.txt``: the whole file is a plain-text prompt containing ``{question}``, with a boxed answer.

Only the literal ``{question}`` is replaced (never ``str.format``), so problems and templates may contain LaTeX
braces freely.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from steering.rewards import ANSWER_FORMATS

PLACEHOLDER = "{question}"
_FILE_FIELDS = {"name", "answer_format", "system", "user", "text", "stop"}


class TemplateError(ValueError):
    """A template that cannot be used, with the reason and the fix in one line."""


@dataclass(frozen=True)
class Stops:
    """Where generation ends: at any of ``token_ids`` (kept in the completion), or at the first token whose text
    completes one of ``strings`` (that token kept; nothing after it is sampled, scored or trained on)."""

    token_ids: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()

    def vllm_kwargs(self) -> dict[str, Any]:
        """The same stops as vLLM ``SamplingParams`` fields: vLLM ends a sequence at the token whose text completes a
        stop string (what :func:`steering.generation.end_completions` cuts to) and keeps the string."""
        out: dict[str, Any] = {"stop_token_ids": list(self.token_ids)}
        if self.strings:
            out.update(stop=list(self.strings), include_stop_str_in_output=True)
        return out


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    answer_format: str  # "boxed" or "answer_tag": where rewards.extract_answer looks
    system: str | None = None  # chat templates: the system message (None: no system turn)
    user: str = PLACEHOLDER  # chat templates: the user turn
    text: str | None = None  # plain-text templates (no chat template): the whole prompt
    stop: tuple[str, ...] = ()  # stop strings: generation ends at the first token that completes one (kept)

    def __post_init__(self):
        if isinstance(self.stop, str) or not all(isinstance(x, str) and x for x in self.stop):
            raise TemplateError(f"template {self.name!r}: stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.answer_format not in ANSWER_FORMATS:
            raise TemplateError(f"template {self.name!r}: answer_format must be one of {ANSWER_FORMATS}, "
                                f"got {self.answer_format!r}")
        field, value = ("text", self.text) if self.text is not None else ("user", self.user)
        if not isinstance(value, str) or PLACEHOLDER not in value:
            raise TemplateError(f"template {self.name!r}: field {field!r} must contain {PLACEHOLDER} "
                                f"where the problem goes")
        if self.text is not None and self.system is not None:
            raise TemplateError(f"template {self.name!r}: give either 'text' (plain) or 'system'/'user' (chat), "
                                f"not both")

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def messages(self, question: str) -> list[dict]:
        """The chat turns of a chat template (system first when there is one)."""
        if not self.is_chat:
            raise TemplateError(f"template {self.name!r} is plain text; it has no chat messages")
        turns = [{"role": "system", "content": self.system}] if self.system is not None else []
        return turns + [{"role": "user", "content": self.user.replace(PLACEHOLDER, question)}]

    def render(self, question: str, tokenizer=None) -> str:
        """The prompt string for one problem. Chat templates need a tokenizer that has a chat template."""
        if not self.is_chat:
            return self.text.replace(PLACEHOLDER, question)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"template {self.name!r} is a chat template and needs a tokenizer with a "
                                f"chat_template (got {type(tokenizer).__name__}); pass tokenizer=..., or use a "
                                f"plain-text template such as 'r1'")
        return tokenizer.apply_chat_template(self.messages(question), tokenize=False, add_generation_prompt=True)

    def stops(self, tokenizer: Any = None, model: Any = None) -> Stops:
        """Where generation ends with this template: the EOS of ``tokenizer`` and of ``model``'s generation config,
        the chat template's end-of-turn token (chat templates), and the template's stop strings."""
        from steering.generation import eos_token_ids

        ids = eos_token_ids(tokenizer, model)
        if self.is_chat and tokenizer is not None:
            ids += [t for t in end_of_turn_ids(tokenizer) if t not in ids]
        return Stops(token_ids=tuple(ids), strings=self.stop)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token a chat template writes right after an assistant message's content (``<|im_end|>`` for
    ChatML, ``<|eot_id|>`` for Llama 3), found by rendering one assistant turn; ``[]`` when the template writes no
    special token there. Read off the template itself because checkpoints disagree about their EOS: Qwen2.5 base
    models say ``<|endoftext|>`` while their turns end with ``<|im_end|>``."""
    marker = "Zq7-answer-end-marker"
    turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception as e:  # a template that cannot render an assistant turn cannot tell us where turns end
        raise TemplateError(f"the tokenizer's chat template cannot render an assistant turn ({type(e).__name__}: "
                            f"{e}); use a plain-text template or a chat template that renders assistant turns") from None
    if marker not in text:
        raise TemplateError("the tokenizer's chat template drops the assistant message's content; cannot tell where "
                            "an assistant turn ends")
    after = text[text.rindex(marker) + len(marker):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {int(i) for i, t in tokenizer.added_tokens_decoder.items()
                                                 if t.special}
    return [int(ids[0])] if ids and int(ids[0]) in special else []


QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
R1_TEXT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>"
)

BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    "qwen_math": PromptTemplate(name="qwen_math", answer_format="boxed", system=QWEN_MATH_SYSTEM),
    "r1": PromptTemplate(name="r1", answer_format="answer_tag", text=R1_TEXT, stop=("</answer>",)),
}


def get_template(name_or_path) -> PromptTemplate:
    """A built-in template by name ("qwen_math", "r1"), or one loaded from a .yaml/.yml/.json/.txt file."""
    if isinstance(name_or_path, PromptTemplate):
        return name_or_path
    key = str(name_or_path)
    if key in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[key]
    if os.path.isfile(key):
        return load_template(key)
    looks_like_path = os.sep in key or key.endswith((".yaml", ".yml", ".json", ".txt"))
    if looks_like_path:
        raise TemplateError(f"template file {key!r} does not exist")
    raise TemplateError(f"unknown template {key!r}: use one of {sorted(BUILTIN_TEMPLATES)} or a path to a "
                        f".yaml/.json/.txt template file")


def load_template(path: str) -> PromptTemplate:
    """Read a template file (see the module docstring for the format)."""
    stem, ext = os.path.splitext(os.path.basename(path))
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if ext == ".txt":
        if PLACEHOLDER not in raw:
            raise TemplateError(f"{path}: a .txt template is the whole prompt and must contain {PLACEHOLDER} "
                                f"where the problem goes")
        return PromptTemplate(name=stem, answer_format="boxed", text=raw)
    if ext in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise TemplateError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    elif ext == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TemplateError(f"{path}: not valid JSON ({e})") from None
    else:
        raise TemplateError(f"{path}: template files must end in .yaml, .yml, .json or .txt")
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: expected a mapping with 'text' or 'user'/'system', got {type(data).__name__}")
    unknown = set(data) - _FILE_FIELDS
    if unknown:
        raise TemplateError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FILE_FIELDS)}")
    stop = data.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise TemplateError(f"{path}: field 'stop' must be a list of non-empty strings, got {stop!r}")
    for field in ("name", "answer_format", "system", "user", "text"):
        if field in data and not isinstance(data[field], str):
            # YAML reads an unquoted "{question}" as a mapping: the commonest way to get here.
            hint = "; in YAML, quote a value that starts with '{'" if isinstance(data[field], dict) else ""
            raise TemplateError(f"{path}: field {field!r} must be a string, got {type(data[field]).__name__}{hint}")
    if "text" in data and ("user" in data or "system" in data):
        raise TemplateError(f"{path}: give either 'text' (a plain prompt) or 'user'/'system' (a chat prompt), "
                            f"not both")
    if not {"text", "user", "system"} & set(data):
        raise TemplateError(f"{path}: needs a 'text' (plain prompt) or 'user'/'system' (chat) field; 'text' or "
                            f"'user' contains {PLACEHOLDER}")
    field = "text" if "text" in data else "user"
    if PLACEHOLDER not in data.get(field, PLACEHOLDER):
        raise TemplateError(f"{path}: field {field!r} must contain {PLACEHOLDER} where the problem goes")
    answer_format = data.get("answer_format", "boxed")
    if answer_format not in ANSWER_FORMATS:
        raise TemplateError(f"{path}: answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    return PromptTemplate(name=data.get("name", stem), answer_format=answer_format, system=data.get("system"),
                          user=data.get("user", PLACEHOLDER), text=data.get("text"), stop=tuple(stop))
