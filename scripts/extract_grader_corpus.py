"""One-off: build tests/data/grader_corpus.jsonl from public answer-grading test suites.

    python scripts/extract_grader_corpus.py [--peer-tests ../shared/peer-tests] [--out tests/data/grader_corpus.jsonl]

The suites are read as data (``ast``, never imported or run): every ``compare_strings(gold, pred, ...)`` /
``verify(parse(gold), parse(pred))`` case of Math-Verify's and lighteval's tests becomes one case per answer format the
reward reads (``... \\boxed{pred}`` for qwen_math, ``<answer>pred</answer>`` for r1), named by its file and line.
A prediction that is a whole model output with a box is the completion as it is (qwen_math only). Left out, and
counted: other languages, multiple-choice letter extraction, and whole solutions without a box (no form the reward
reads). The Qwen2.5-Math grader's cases are transcribed below from its source (it is not on disk), and the project's
own adversarial shapes are listed below as well. CI never runs this script: the tests read the committed corpus.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from steering.rewards import MAX_ANSWER_CHARS  # noqa: E402

REASONING = "We work through the problem step by step and check each step.\nSo the result is "
THINK = "<think>We work through the problem step by step and check each step.</think> "

# Parameters of the suites' helpers that are math-verify grading options, by the name ``verify`` takes.
OPTION_NAMES = {"precision": "float_rounding", "strict": "strict", "allow_set_relation_comp": "allow_set_relation_comp"}
SUITES = {"math-verify": "huggingface/Math-Verify tests/", "lighteval": "huggingface/lighteval "}

# QwenLM/Qwen2.5-Math, evaluation/grader.py at commit 29a82a8802e058c236fe7903ae6d8362df078aa7: the assertions of
# its TestMathEquality unittest class, as (test method, prediction, reference, expected). math_equal's own defaults
# (include_percentage=True, is_close=True) apply; repeated pairs are listed once.
QWEN_GRADER_CASES = [
    ("test_math_equal", "10", "10", True),
    ("test_math_equal", "10%", "0.1", True),
    ("test_math_equal", "[1, 2, 3]", "[1, 2, 3]", True),
    ("test_math_equal", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    ("test_math_equal", "x = y", "x = y", True),
    ("test_math_equal", "10", "20", False),
    ("test_math_equal", "x = y", "x = z", False),
    ("test_compare_equations", "x = 10", "10", True),
    ("test_compare_equations", "10", "x = 10", True),
    ("test_is_numerical_equal", "10%", "0.2", False),
    ("test_compare_lists", "[1, 2, 3]", "[1, 2, 4]", False),
    ("test_compare_lists", "(1, 2, 3)", "(1, 2, 3)", True),
    ("test_compare_matrices", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", False),
]

# The project's own shapes: (completion or box content, gold, expected verdict of a correct grader, note). A
# completion is given whole when it starts with "!" (the "!" is dropped); otherwise it is the content of one box.
ADVERSARIAL = [
    ("!\\[\n\\boxed{\n\\sqrt3\n}\n\\]", "$\\sqrt{3}$", True, "newlines inside a box inside \\[ \\]"),
    ("\n4\\sqrt{2}\n", "4", False, "newlines inside a box: 4*sqrt(2) is not 4"),
    ("\n 72 \n", "72", True, "newlines and spaces around a number"),
    ("!\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}", "(2, 2), (6, 2)", True, "two boxes joined by and"),
    ("!\\boxed{1},\\boxed{2},\\boxed{3}", "\\{1,2,3\\}", True, "three boxes separated by commas"),
    ("!\\boxed{k = 45} \\quad\\text{and}\\quad \\boxed{n = 2}", "k = 45, n = 2", True, "two assignments"),
    ("!first \\boxed{3} then \\boxed{5}", "5", False, "two close boxes are one answer {3, 5}"),
    ("!\\boxed{3} was wrong, the count has to include the two endpoints as well, which gives \\boxed{5}", "5", True,
     "a far earlier box is dropped"),
    ("!\\boxed{5}, that is, \\boxed{5}", "5", True, "a repeated box counts once"),
    ("\\text{Therefore } $x \\geq 5$", "x \\geq 5", True, "$ inside a box"),
    ("$\\frac{1}{2}$", "0.5", True, "$ inside a box"),
    ("x = $3$", "3", True, "$ inside a box"),
    ("!\\boxed 5", "5", True, "brace-less box"),
    ("!\\boxed {5}", "5", True, "space before the brace"),
    ("!\\fbox{5}", "5", True, "fbox"),
    ("!\\boxed{\\boxed{5}}", "5", True, "box in a box"),
    ("{5}", "5", True, "nested braces"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True, "nested braces"),
    ("5.", "5", True, "trailing period"),
    ("12 \\text{ cm}", "12", True, "units"),
    ("5\\ \\mathrm{m}", "5", True, "units"),
    ("\\$18", "18", True, "currency"),
    ("18 \\text{ dollars}", "18", True, "units"),
    ("25\\%", "25", True, "percent"),
    ("25\\%", "0.25", True, "percent"),
    ("!\\boxed{25}\\%", "25\\%", True, "percent after the box"),
    ("1,000", "1000", True, "thousands separator"),
    ("1000", "1,000", True, "GSM8K gold with a thousands separator"),
    ("1,000", "1,000", True, "thousands separator"),
    ("1{,}000", "1000", True, "thousands separator in braces"),
    ("1 000", "1000", True, "space as a thousands separator"),
    ("12,345,678", "12345678", True, "thousands separator"),
    ("1,001", "1000", False, "thousands separator"),
    ("(1, 2]", "(1,2]", True, "interval"),
    ("[0, \\infty)", "[0,\\infty)", True, "interval"),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty,1)\\cup(2,\\infty)", True, "union of intervals"),
    ("(1, 2)", "[1, 2]", False, "open vs closed interval"),
    ("\\{1, 2\\}", "\\{2,1\\}", True, "set"),
    ("(3, 4)", "(3,4)", True, "tuple"),
    ("(4, 3)", "(3,4)", False, "tuple order"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True, "matrix"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 5 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False, "matrix"),
    ("1,2,3,4,5,6,7,8,9,10", "5", False, "a list of guesses is not the answer"),
    ("5 \\text{ or } 6", "5", False, "two guesses"),
    ("x", "5", False, "a variable"),
    ("\\pm 5", "5", False, "plus-minus"),
    ("-5", "5", False, "sign"),
    ("\\dfrac{3}{4}", "0.75", True, "fraction vs decimal"),
    ("3/4", "\\frac{3}{4}", True, "slash fraction"),
    ("\\frac{2}{4}", "\\frac{1}{2}", True, "unreduced fraction"),
    ("0.333", "\\frac{1}{3}", False, "rounded decimal"),
    ("!The final answer is $3$. I hope it is correct.\nBut \\boxed{5}", "5", True,
     "a final-answer sentence before the box"),
    ("\\text{(B)}", "B", True, "multiple choice letter"),
]


def literal(node: ast.AST):
    """The value of a case's AST node: a literal, ``Language.X`` as "X", or the one f-string of the suites
    (``f"{math.sqrt(17):.15f}"``). Anything else raises ValueError."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Tuple):
        return tuple(literal(e) for e in node.elts)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Language":
        return node.attr
    if isinstance(node, ast.JoinedStr):
        parts = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                parts.append(part.value)
            elif (isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Call)
                  and ast.unparse(part.value.func) == "math.sqrt"):
                spec = literal(part.format_spec) if part.format_spec is not None else ""
                parts.append(format(math.sqrt(literal(part.value.args[0])), spec))
            else:
                raise ValueError(ast.unparse(node))
        return "".join(parts)
    raise ValueError(ast.unparse(node))


def grading_call(fn: ast.FunctionDef) -> ast.Call | None:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("compare_strings",
                                                                                               "verify"):
            return node
    return None


def call_settings(call: ast.Call, params: dict) -> dict:
    """match_types, language and grading options of a compare_strings call, resolving parameter names."""
    def value(node):
        return params[node.id] if isinstance(node, ast.Name) and node.id in params else literal(node)

    if call.func.id == "verify":  # test_yujianll: verify(parse(gold), parse(pred)): math-verify's defaults
        return {"match_types": ["latex", "expr"], "language": "ENGLISH", "options": {}}
    settings = {"match_types": ["latex", "expr"], "language": "ENGLISH", "options": {}}
    positional = ["gold", "pred", "language", "match_types"]
    for name, node in list(zip(positional, call.args))[2:] + [(k.arg, k.value) for k in call.keywords]:
        if name in ("language", "match_types"):
            settings[name] = value(node)
        elif name in OPTION_NAMES:
            settings["options"][OPTION_NAMES[name]] = value(node)
    defaults = {"float_rounding": 6, "strict": True, "allow_set_relation_comp": False}
    settings["options"] = {k: v for k, v in settings["options"].items() if defaults[k] != v}
    return settings


def suite_cases(path: Path):
    """(test, line, gold, pred, expected, settings) of every grading case in one test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or (call := grading_call(fn)) is None:
            continue
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("parametrize")):
                continue
            names = [n.strip() for n in literal(dec.args[0]).split(",")]
            for elt in dec.args[1].elts:
                params = dict(zip(names, literal(elt)))
                expected = params.get("expected", params.get("result"))
                yield fn.name, elt.lineno, params["gold"], params["pred"], bool(expected), call_settings(call, params)
        # Plain assertions: assert compare_strings("gold", "pred", ...) == 1
        for node in ast.walk(fn):
            if (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)
                    and isinstance(node.test.left, ast.Call) and ast.unparse(node.test.left.func) == "compare_strings"
                    and not fn.decorator_list):
                c = node.test.left
                yield (fn.name, node.lineno, literal(c.args[0]), literal(c.args[1]),
                       bool(literal(node.test.comparators[0])), call_settings(c, {}))


_MATH_ENV = re.compile(r"\s*(?:\$\$(.+)\$\$|\$(.+)\$|\\\((.+)\\\)|\\\[(.+)\\\])\s*", re.S)


def box_content(pred: str) -> str:
    """What a model would put in the box for this prediction: the inside of a prediction that is exactly one math
    environment, else the prediction as it is."""
    m = _MATH_ENV.fullmatch(pred)
    if m:
        inner = next(g for g in m.groups() if g is not None)
        if "$" not in inner:
            return inner
    return pred


def shape(text: str) -> str:
    """The answer shape of a completion: the first rule that applies to its answer (from the first box or tag)."""
    starts = [i for i in (text.find("\\boxed"), text.find("\\fbox"), text.find("<answer>")) if i >= 0]
    answer = re.sub(r"</?answer>", " ", text[min(starts, default=0):])
    words = re.sub(r"\\(?:boxed|fbox|frac|dfrac|tfrac|sqrt|pi|infty|cup|pm|quad|left|right|begin|end|cdot)\b", " ",
                   answer)
    rules = [
        ("full-solution", len(text) > 400),
        ("several-boxes", answer.count("\\boxed") + answer.count("\\fbox") > 1),
        ("fbox", "\\fbox" in answer),
        ("brace-less-box", re.search(r"\\boxed\s*[^\s{]", answer) is not None),
        ("space-before-brace", re.search(r"\\boxed\s+\{", answer) is not None),
        ("newline-in-answer", "\n" in answer),
        ("dollar-in-answer", "$" in answer),
        ("matrix", "matrix" in answer or "\\begin{array}" in answer),
        ("percent", re.search(r"%|percent|pct", answer) is not None),
        ("interval-or-set", re.search(r"\\cup|\\infty|\\\{|\[[^\]]*,[^\]]*\)|\([^)]*,[^)]*\]", answer) is not None),
        ("relation", re.search(r"[<>=]|\\[lg]eq?\b|\\neq|\\approx|\\in\b", answer) is not None),
        ("tuple-or-list", re.search(r"[(\[][^()\[\]]*,[^()\[\]]*[)\]]", answer) is not None),
        ("thousands-separator", re.search(r"\d(?:,|\{,\}|,\\!|\\,| )\d{3}\b", answer) is not None),
        ("text-or-units", re.search(r"\\(?:text|mbox|mathrm|textbf|textnormal)|\\\$|[A-Za-z]{2,}", words) is not None),
        ("number", re.fullmatch(r"\s*(?:\\boxed\{)?\s*-?[\d.,/]+\s*\}?\.?\s*", answer) is not None),
    ]
    return next((name for name, applies in rules if applies), "expression")


def completions(content_or_text: str, whole: bool):
    """(answer_format, completion) pairs for one prediction."""
    yield "boxed", content_or_text if whole else f"{REASONING}\\boxed{{{content_or_text}}}."
    yield "answer_tag", f"{THINK}<answer>{content_or_text}</answer>"


def make_case(source: str, origin: str, fmt: str, completion: str, gold: str, pred: str, expected: bool,
         options: dict | None = None, match_types: list | None = None) -> dict:
    return {"source": source, "origin": origin, "answer_format": fmt, "completion": completion, "gold": gold,
            "pred": pred, "expected": expected, "options": options or {}, "suite_match_types": match_types}


def build(peer_tests: Path) -> list[dict]:
    cases, left_out = [], Counter()
    for suite, upstream in SUITES.items():
        for path in sorted((peer_tests / suite).glob("test_*.py")):
            for test, line, gold, pred, expected, settings in suite_cases(path):
                if settings["language"] != "ENGLISH":
                    left_out["another language"] += 1
                    continue
                if not set(settings["match_types"]) <= {"latex", "expr"}:
                    left_out["multiple-choice letter extraction"] += 1
                    continue
                # A prediction that already holds a box is a model's output: the completion itself (in the r1
                # format only the answer goes in the tag, so such a solution has no r1 form). A whole solution
                # without a box has no form the reward reads (it would be a box longer than MAX_ANSWER_CHARS).
                whole = "\\boxed" in pred or "\\fbox" in pred
                content = pred if whole else box_content(pred)
                if not whole and len(content) > MAX_ANSWER_CHARS:
                    left_out["a whole solution without a box"] += 1
                    continue
                origin = f"{upstream}{path.name}::{test} (line {line} of peer-tests/{suite}/{path.name})"
                for fmt, text in completions(content, whole):
                    if whole and fmt == "answer_tag":
                        continue
                    cases.append(make_case(suite, origin, fmt, text, gold, pred, expected, settings["options"],
                                      settings["match_types"]))
    for test, pred, reference, expected in QWEN_GRADER_CASES:
        origin = f"QwenLM/Qwen2.5-Math@29a82a8 evaluation/grader.py::TestMathEquality.{test}"
        for fmt, text in completions(pred, whole=False):
            cases.append(make_case("qwen2.5-math-grader", origin, fmt, text, reference, pred, expected))
    for content, gold, expected, note in ADVERSARIAL:
        whole = content.startswith("!")
        pred = content[1:] if whole else content
        for fmt, text in completions(pred, whole):
            cases.append(make_case("project-adversarial", note, fmt, text, gold, pred, expected))
    for i, case in enumerate(cases):
        case["id"] = f"{case['source']}-{i:04d}"
        case["shape"] = shape(case["completion"])
    print(f"{len(cases)} cases; suite cases left out: {dict(left_out)}")
    return cases


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-tests", type=Path, default=root.parent / "shared" / "peer-tests")
    p.add_argument("--out", type=Path, default=root / "tests" / "data" / "grader_corpus.jsonl")
    args = p.parse_args()
    cases = build(args.peer_tests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["id", "source", "origin", "shape", "answer_format", "completion", "gold", "expected", "options", "pred",
            "suite_match_types"]
    with open(args.out, "w", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps({k: case[k] for k in keys}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
