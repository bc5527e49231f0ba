"""Properties of the prompt templates (issue: templates): the built-ins match docs/recipe.md verbatim, the
problem is inserted as-is whatever braces it holds, and bad template files fail with a one-line error."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steering.templates import BUILTIN_TEMPLATES, PromptTemplate, TemplateError, get_template
from steering.tiny import build_char_tokenizer

# Written out again here, not imported, so that a change to the module's constants shows up as a failure.
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
R1_PREFIX = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant "
    "first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning "
    "process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\nUser: "
)
R1_SUFFIX = "\nAssistant: <think>"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_builtins_verbatim(tok):
    q = "What is $\\frac{1}{2} + {x}$ when x = {question}?"
    qwen = get_template("qwen_math")
    assert qwen.answer_format == "boxed"
    assert qwen.render(q, tok) == (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
                                   f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    r1 = get_template("r1")
    assert r1.answer_format == "answer_tag"
    assert r1.render(q) == R1_PREFIX + q + R1_SUFFIX
    assert r1.render(q, tok) == R1_PREFIX + q + R1_SUFFIX  # a tokenizer is ignored by plain templates
    assert set(BUILTIN_TEMPLATES) == {"qwen_math", "r1"}


@settings(max_examples=100, deadline=None, database=None)
@given(question=st.text(max_size=200))
def test_question_is_inserted_verbatim(question):
    """str.format would choke on "{", "}" or "{0}"; only the placeholder is replaced, once."""
    assert get_template("r1").render(question) == R1_PREFIX + question + R1_SUFFIX
    assert get_template("qwen_math").messages(question)[-1] == {"role": "user", "content": question}


def test_chat_template_needs_a_tokenizer_with_chat_template(tok):
    with pytest.raises(TemplateError, match="chat_template"):
        get_template("qwen_math").render("1+1")
    no_chat = build_char_tokenizer()
    no_chat.chat_template = None
    with pytest.raises(TemplateError, match="chat_template"):
        get_template("qwen_math").render("1+1", no_chat)


def test_unknown_name_lists_builtins():
    with pytest.raises(TemplateError, match="qwen_math.*r1"):
        get_template("qwen")
    with pytest.raises(TemplateError, match="does not exist"):
        get_template("configs/nope.yaml")


def test_template_files(tmp_path, tok):
    chat = tmp_path / "mine.yaml"
    chat.write_text("system: Be brief. Use \\boxed{}.\nuser: 'Problem: {question}'\n")
    t = get_template(str(chat))
    assert (t.name, t.answer_format, t.system, t.user, t.text) == (
        "mine", "boxed", "Be brief. Use \\boxed{}.", "Problem: {question}", None)
    assert "<|im_start|>user\nProblem: {x}<|im_end|>" in t.render("{x}", tok)

    plain = tmp_path / "tagged.yml"
    plain.write_text("name: tagged\nanswer_format: answer_tag\ntext: |-\n  Q: {question}\n  A: <think>\n")
    t = get_template(str(plain))
    assert (t.name, t.answer_format) == ("tagged", "answer_tag")
    assert t.render("2+2") == "Q: 2+2\nA: <think>"

    js = tmp_path / "j.json"
    js.write_text(json.dumps({"text": "{question} =", "answer_format": "boxed"}))
    assert get_template(str(js)).render("1+1") == "1+1 ="

    txt = tmp_path / "p.txt"
    txt.write_text("Solve: {question}\nPut the answer in \\boxed{}.\n")
    t = get_template(str(txt))
    assert (t.name, t.answer_format) == ("p", "boxed")
    assert t.render("{y}") == "Solve: {y}\nPut the answer in \\boxed{}.\n"

    system_only = tmp_path / "s.yaml"
    system_only.write_text("system: Think.\n")
    assert get_template(str(system_only)).messages("q") == [
        {"role": "system", "content": "Think."}, {"role": "user", "content": "q"}]


@pytest.mark.parametrize("name, content, field", [
    ("a.yaml", "user: 'Solve it'\n", "'user'"),
    ("b.yaml", "text: 'Solve {problem}'\n", "'text'"),
    ("c.json", json.dumps({"system": "x", "user": "no placeholder"}), "'user'"),
    ("d.txt", "Solve the problem.\n", "{question}"),
    ("e.yaml", "text: '{question}'\nanswer_format: latex\n", "answer_format"),
    ("f.yaml", "sytem: typo\nuser: '{question}'\n", "sytem"),
    ("g.yaml", "text: '{question}'\nsystem: x\n", "either"),
    ("h.yaml", "- a list\n", "mapping"),
    ("i.yaml", "name: only a name\n", "'text'"),
    ("j.json", "{not json", "JSON"),
    ("k.yaml", "user: [1, 2]\n", "'user'"),
    ("l.yaml", "text: {question}\n", "quote"),
])
def test_bad_template_files_fail_in_one_line(tmp_path, name, content, field):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TemplateError) as err:
        get_template(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and field in message, message
    assert isinstance(err.value, ValueError)


def test_dataclass_validates():
    with pytest.raises(TemplateError, match="must contain"):
        PromptTemplate(name="x", answer_format="boxed", user="no placeholder")
    with pytest.raises(TemplateError, match="answer_format"):
        PromptTemplate(name="x", answer_format="last_number", text="{question}")
    t = PromptTemplate(name="x", answer_format="boxed", text="{question} and again {question}")
    assert t.render("q") == "q and again q"
    assert get_template(t) is t
