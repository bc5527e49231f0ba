"""The evaluate command and library: benchmarks, accounting, results.json / table.md / samples.jsonl, CLI misuse."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from analysis.__main__ import main
from conftest import corrupt_checkpoint
from steering.problems import (BENCHMARKS, SUITES, DataError, expand_specs, load_benchmark, load_benchmarks,
                               parse_answer)
from steering.rewards import extract_answer

REPO = Path(__file__).resolve().parents[1]
DEMO_BASE = REPO / "assets" / "demo-base"

# --------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def local_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "local.jsonl"
    rows = [{"problem": "What is 2 + 3?", "solution": "We add: $\\boxed{5}$."},
            {"problem": "What is 7 - 4?", "solution": "So \\boxed{3}"},
            {"problem": "What is 6 + 6?", "solution": "It is \\boxed{12}."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def zero_checkpoint(tiny_base_dir, tmp_path_factory):
    """A steering checkpoint with all-zero vectors: the steered model is the base, exactly."""
    from steering import vectors as sv

    base = sv.load_base_model(str(tiny_base_dir), dtype="float32")
    model = sv.attach_steering(base)
    return sv.save_checkpoint(model, tmp_path_factory.mktemp("zero") / "checkpoint-0", base_model=str(tiny_base_dir),
                              step=0)


def read_samples(out):
    return [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------------
# Benchmarks


def test_registry_names_and_suite():
    assert set(SUITES["six"]) <= set(BENCHMARKS)
    assert BENCHMARKS["aime24"].hub_id == "Maxwell-Jia/AIME_2024"
    assert BENCHMARKS["aime25"].configs == ("AIME2025-I", "AIME2025-II")
    assert {BENCHMARKS[n].default_samples for n in ("aime24", "aime25", "amc23")} == {32}
    assert {BENCHMARKS[n].default_samples for n in ("math500", "minerva", "olympiadbench", "gsm8k")} == {1}
    assert expand_specs(["six,gsm8k"]) == [*SUITES["six"], "gsm8k"]
    with pytest.raises(DataError, match="unknown benchmark 'aime2'.*aime24.*math500"):
        load_benchmarks(["aime2"])


def test_answer_normalisation():
    assert extract_answer(r"a \boxed{1} then \boxed{\frac{1}{2}} end", "boxed") == r"\frac{1}{2}"
    assert extract_answer("no box", "boxed") is None
    assert parse_answer("Natalia sold ... #### 1,072") == "1072"
    assert parse_answer(r"so $\boxed{x^2}$") == "x^2"
    assert parse_answer(27.0) == "27"
    assert parse_answer(["3\\sqrt{2}"]) == "3\\sqrt{2}"


def test_local_files_json_jsonl_parquet(tmp_path, local_jsonl):
    b = load_benchmark(f"file:{local_jsonl}")
    assert b.name == "local" and [p["answer"] for p in b.problems] == ["5", "3", "12"]
    assert b.problems[0]["question"] == "What is 2 + 3?"
    # plain JSON list with custom keys; label prefix
    js = tmp_path / "x.json"
    js.write_text(json.dumps([{"q": "1+1?", "gt": 2}, {"q": "2+2?", "gt": "4"}]))
    b = load_benchmark(f"mine={js}", question_key="q", answer_key="gt")
    assert b.name == "mine" and [p["answer"] for p in b.problems] == ["2", "4"]
    with pytest.raises(DataError, match="cannot find the question key"):
        load_benchmark(str(js))
    # parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "y.parquet"
    pq.write_table(pa.table({"question": ["3+4?"], "answer": ["7"]}), pqf)
    assert load_benchmark(str(pqf)).problems == [{"id": 0, "question": "3+4?", "answer": "7"}]
    # gsm8k-style answers in a local file
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"question": "q", "answer": "work\n#### 1,234"}) + "\n")
    assert load_benchmark(str(g)).problems[0]["answer"] == "1234"


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_benchmark(str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        load_benchmark(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_benchmark(f"file:{tmp_path / 'nope.jsonl'}")
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_benchmark(str(corrupt))


def test_procedural_specs_match_split_tasks():
    from steering.tasks import is_heldout, split_tasks

    _, val, test = split_tasks("arithmetic", 5, 4, 6, seed=3)
    b_val = load_benchmark("procedural:arithmetic:4:seed=3")
    b_test = load_benchmark("procedural:arithmetic:6:seed=3:offset=4")
    strip = lambda ps: [{"question": p["question"], "answer": p["answer"]} for p in ps]  # noqa: E731
    assert strip(b_val.problems) == val and strip(b_test.problems) == test
    assert all(is_heldout(p["question"]) for p in b_test.problems)
    assert len(load_benchmark("procedural:mixed").problems) == 100
    for spec, msg in [("procedural:nope:3", "unknown procedural task"), ("procedural:arithmetic:x", "integer"),
                      ("procedural:arithmetic:0", ">= 1"), ("procedural:arithmetic:3:part=test", "part")]:
        with pytest.raises(DataError, match=msg):
            load_benchmark(spec)


def test_hub_benchmark_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load math500 = HuggingFaceH4/MATH-500"):
        load_benchmark("math500")


# --------------------------------------------------------------------------------------------------------------------
# Library accounting, with a scripted generator (known verdicts)


def test_evaluate_model_accounting(monkeypatch):
    import steering.generation as gen
    from steering.evaluation import evaluate_model

    problems = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"},
                {"question": "What is 3 + 3?", "answer": "6"}]
    # seed 0: problem 0 right 3/4, problem 1 right 0/4, problem 2 right 4/4; seed 1: all right
    script = {0: [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], 1: [[1] * 4] * 3}
    calls = []

    def fake_generate(model, tokenizer, prompts, params, *, num_return_sequences=1, batch_size=None, seed=None,
                      backend="hf", progress=False, stops=None):
        calls.append((len(prompts), num_return_sequences, seed))
        s = seed // 1_000_003
        texts = []
        for i, prompt in enumerate(prompts):
            assert problems[i]["question"] in prompt  # the template rendered the question
            for j in range(num_return_sequences):
                ans = problems[i]["answer"] if script[s][i][j] else "-1"
                texts.append(f"Thinking... the answer is \\boxed{{{ans}}}")
        ids = [[0] * 5 for _ in texts]
        return gen.GenerationResult([[0]] * len(texts), ids, texts, [True] * len(texts), num_return_sequences,
                                    ended=["eos"] * len(texts))

    monkeypatch.setattr(gen, "generate", fake_generate)
    from steering.tiny import build_char_tokenizer

    res = evaluate_model(None, build_char_tokenizer(), problems, template="qwen_math",
                         params=gen.SamplingParams(max_new_tokens=8), num_samples=4, seeds=[0, 1])
    assert calls == [(3, 4, 0), (3, 4, 1_000_003)]
    assert res.settings["grading_options"] == {"float_rounding": 6, "numeric_precision": 15, "strict": True,
                                               "allow_set_relation_comp": False}  # math-verify's defaults
    assert res.per_seed_accuracy == [pytest.approx(1.75 / 3), 1.0]
    assert res.accuracy == pytest.approx((1.75 / 3 + 1) / 2)
    assert res.seeds[0].correct == [[True, True, False, True], [False] * 4, [True] * 4]
    assert res.seeds[0].pass_at_1 == pytest.approx(2 / 3)
    assert res.per_problem_accuracy == [pytest.approx(7 / 8), pytest.approx(4 / 8), 1.0]
    recs = list(res.records())
    assert len(recs) == 2 * 3 * 4
    assert sum(r["correct"] for r in recs if r["seed"] == 0) == 7
    assert {r["extracted"] for r in recs if not r["correct"]} == {"-1"}
    m = res.seeds[0].metrics(pass_ks=[2, 4])
    assert m["pass@4"] == pytest.approx(2 / 3) and m["num_correct"] == 7 and m["num_completions"] == 12


# --------------------------------------------------------------------------------------------------------------------
# End to end on the tiny model


def _check_consistency(out, results):
    """accuracy in results.json == fraction of correct verdicts in samples.jsonl, per row / benchmark / seed, and
    every problem has k samples per seed."""
    samples = read_samples(out)
    groups = defaultdict(list)
    for s in samples:
        groups[(s["row"], s["benchmark"], s["seed"])].append(s)
    bench_sizes = {b["name"]: b["num_problems"] for b in results["benchmarks"]}
    n_checked = 0
    for row in results["rows"]:
        for bname, res in row["results"].items():
            k = res["num_samples"]
            assert len(res["per_seed"]) == len(row["seeds"])
            for ps in res["per_seed"]:
                group = groups[(row["label"], bname, ps["seed"])]
                assert len(group) == bench_sizes[bname] * k
                per_problem = defaultdict(list)
                for s in group:
                    per_problem[s["problem_id"]].append(s["correct"])
                assert len(per_problem) == bench_sizes[bname]
                assert all(len(v) == k for v in per_problem.values())
                assert ps["accuracy"] == pytest.approx(sum(s["correct"] for s in group) / len(group))
                n_checked += 1
    assert len(samples) == sum(len(g) for g in groups.values())
    return n_checked


def test_evaluate_base_and_checkpoint_end_to_end(tiny_base_dir, tiny_checkpoint, local_jsonl, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_base_dir), "--include-base",
                 "--checkpoint", f"steering={tiny_checkpoint}",
                 "--benchmarks", "procedural:arithmetic:3", f"file:{local_jsonl}",
                 "-k", "2", "--seeds", "0", "1", "--max-new-tokens", "6", "--pass-k", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == ["Base", "Steering"]
    assert [r["kind"] for r in results["rows"]] == ["base", "steering"]
    assert [b["name"] for b in results["benchmarks"]] == ["procedural:arithmetic:3", "local"]
    s = results["settings"]
    assert s["sampling"]["temperature"] == 1.0 and s["sampling"]["max_new_tokens"] == 6
    assert s["seeds"] == [0, 1] and s["template"] == "qwen_math" and s["num_samples"] == {
        "procedural:arithmetic:3": 2, "local": 2}
    assert _check_consistency(out, results) == 2 * 2 * 2
    row = results["rows"][1]
    assert "pass@2" in row["results"]["local"]["per_seed"][0]
    per_seed_avg = [(row["results"]["procedural:arithmetic:3"]["per_seed"][i]["accuracy"]
                     + row["results"]["local"]["per_seed"][i]["accuracy"]) / 2 for i in range(2)]
    assert row["avg"]["per_seed"] == pytest.approx(per_seed_avg)
    table = (out / "table.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| Model | procedural:arithmetic:3 (avg@2) | local (avg@2) | Avg |")
    assert lines[2].startswith("| Base |") and lines[3].startswith("| Steering |")
    assert "±" in lines[2]
    assert "Relative" not in lines[0]  # no Full row: the Relative columns are left out
    samples = read_samples(out)
    assert {"completion", "extracted", "correct", "answer", "question", "num_tokens", "finished"} <= set(samples[0])
    assert "| Base |" in capsys.readouterr().out


def test_greedy_identical_across_seeds_and_one_sample(tiny_base_dir, local_jsonl, tmp_path):
    out = tmp_path / "greedy"
    code = main(["evaluate", "--model", str(tiny_base_dir), "--benchmarks", str(local_jsonl),
                 "--temperature", "0", "-k", "4", "--seeds", "0", "1", "2", "--max-new-tokens", "8",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    res = results["rows"][0]["results"]["local"]
    assert res["num_samples"] == 1 and res["metric"] == "pass@1"  # T=0: one sample per problem
    accs = [p["accuracy"] for p in res["per_seed"]]
    assert accs == [accs[0]] * 3 and res["std"] == 0.0
    by_seed = defaultdict(list)
    for s in read_samples(out):
        by_seed[s["seed"]].append((s["problem_id"], s["completion"]))
    assert by_seed[0] == by_seed[1] == by_seed[2]
    assert len(by_seed[0]) == 3
    _check_consistency(out, results)


def test_zero_vector_checkpoint_equals_base_exactly(tiny_base_dir, zero_checkpoint, local_jsonl, tmp_path):
    out = tmp_path / "zero"
    code = main(["evaluate", "--model", str(tiny_base_dir), "--include-base", "--base-greedy",
                 "--checkpoint", f"zero={zero_checkpoint}", "--benchmarks", str(local_jsonl),
                 "procedural:word:2", "-k", "3", "--seeds", "0", "1", "--max-new-tokens", "10",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["rows"]]
    assert labels == ["Base", "Base (greedy)", "zero"]
    greedy = results["rows"][1]
    assert greedy["seeds"] == [0] and greedy["sampling"]["temperature"] == 0.0
    assert greedy["results"]["local"]["num_samples"] == 1
    base_samples = [(s["benchmark"], s["seed"], s["problem_id"], s["sample"], s["completion"])
                    for s in read_samples(out) if s["row"] == "Base"]
    zero_samples = [(s["benchmark"], s["seed"], s["problem_id"], s["sample"], s["completion"])
                    for s in read_samples(out) if s["row"] == "zero"]
    assert len(base_samples) == 2 * (3 + 2) * 3
    assert base_samples == zero_samples  # sampled at T=1 with the same seeds: token-identical
    assert results["rows"][0]["results"] == results["rows"][2]["results"]
    # the samples differ between seeds (T=1), so the equality above is not vacuous
    assert len({c for (_, seed, _, _, c) in base_samples if seed == 0} ^
               {c for (_, seed, _, _, c) in base_samples if seed == 1}) > 0
    _check_consistency(out, results)


def test_results_match_samples_with_nonzero_accuracy(tiny_base_dir, tmp_path, monkeypatch):
    """Through the CLI, with a scripted generator so that some verdicts are correct: the accuracies in results.json
    are the fractions of correct verdicts in samples.jsonl."""
    import steering.generation as gen

    bench = load_benchmark("procedural:arithmetic:5")
    answers = {p["question"]: p["answer"] for p in bench.problems}

    def fake_generate(model, tokenizer, prompts, params, *, num_return_sequences=1, seed=None, **kw):
        texts = []
        for i, prompt in enumerate(prompts):
            answer = next(a for q, a in answers.items() if q in prompt)
            for j in range(num_return_sequences):
                right = (i + j + seed // 1_000_003) % 3 == 0
                texts.append(f"\\boxed{{{answer if right else 'x'}}}")
        return gen.GenerationResult([[0]] * len(texts), [[1, 2]] * len(texts), texts, [True] * len(texts),
                                    num_return_sequences, ended=["eos"] * len(texts))

    monkeypatch.setattr(gen, "generate", fake_generate)
    out = tmp_path / "scripted"
    assert main(["evaluate", "--model", str(tiny_base_dir), "--benchmarks", "procedural:arithmetic:5", "-k", "3",
                 "--seeds", "0", "1", "--pass-k", "2", "3", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    _check_consistency(out, results)
    res = results["rows"][0]["results"]["procedural:arithmetic:5"]
    # seed s, problem i, sample j correct iff (i + j + s) % 3 == 0: 5 of 15 for seed 0 and seed 1
    assert [p["accuracy"] for p in res["per_seed"]] == [pytest.approx(5 / 15), pytest.approx(5 / 15)]
    assert [p["num_correct"] for p in res["per_seed"]] == [5, 5]
    assert res["per_seed"][0]["pass@3"] == 1.0  # every problem has one correct sample of three
    assert res["per_seed"][0]["pass@1"] == pytest.approx(2 / 5)  # first samples: i = 0, 3
    assert res["accuracy"] == pytest.approx(1 / 3) and res["std"] == 0.0


def test_paper_rows_lora_and_full_checkpoints(tiny_base_dir, tiny_checkpoint, tmp_path):
    """A PEFT LoRA adapter dir and a plain HF model dir load as the LoRA / Full rows; the table gets the Relative
    columns. (A fresh LoRA has B = 0 and the 'full' model is the base itself, so both equal the base exactly.)"""
    from peft import LoraConfig, get_peft_model

    from steering import vectors as sv

    lora_dir = tmp_path / "lora-ckpt"
    base = sv.load_base_model(str(tiny_base_dir), dtype="float32")
    get_peft_model(base, LoraConfig(r=1, lora_alpha=2, target_modules=["down_proj"])).save_pretrained(lora_dir)
    out = tmp_path / "paper"
    code = main(["evaluate", "--model", str(tiny_base_dir), "--include-base",
                 "--checkpoint", f"steering={tiny_checkpoint}", "--checkpoint", f"lora={lora_dir}",
                 "--checkpoint", f"full={tiny_base_dir}", "--benchmarks", "procedural:arithmetic:2",
                 "--temperature", "0", "--max-new-tokens", "6", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["label"], r["kind"]) for r in results["rows"]] == [
        ("Base", "base"), ("Steering", "steering"), ("LoRA", "lora"), ("Full", "full")]
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0].endswith("| Avg | Relative (%) | Rel. Improvement (%) |")
    assert [line.split(" |")[0] for line in lines[2:6]] == ["| Base", "| Steering", "| LoRA", "| Full"]
    completions = defaultdict(list)
    for s in read_samples(out):
        completions[s["row"]].append(s["completion"])
    assert completions["Base"] == completions["LoRA"] == completions["Full"]


def test_table_relative_columns():
    from analysis.table import add_relative, render_table

    def row(label, role, avg):
        return {"label": label, "role": role, "results": {"b": {"accuracy": avg, "std": 0.0}},
                "avg": {"mean": avg, "std": 0.0}}

    rows = [row("Base", "base", 0.25), row("Steering", "steering", 0.75), row("LoRA", "lora", 0.80),
            row("Full", "full", 0.85)]
    add_relative(rows)
    assert rows[1]["relative"] == pytest.approx(100 * 0.75 / 0.85)
    assert rows[1]["relative_improvement"] == pytest.approx(100 * 0.5 / 0.6)
    assert rows[0]["relative_improvement"] == 0.0 and rows[3]["relative"] == pytest.approx(100.0)
    results = {"rows": rows, "benchmarks": [{"name": "b", "metric": "avg@32"}],
               "settings": {"seeds": [0, 1, 2], "template": "qwen_math",
                            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4096}}}
    table = render_table(results)
    lines = table.splitlines()
    assert lines[0] == "| Model | b (avg@32) | Avg | Relative (%) | Rel. Improvement (%) |"
    assert lines[3] == "| Steering | 75.00 ± 0.00 | 75.00 ± 0.00 | 88.24 | 83.33 |"
    assert lines[5].startswith("| Full |") and lines[5].endswith("| 100.00 | 100.00 |")


@pytest.mark.skipif(not (DEMO_BASE / "config.json").is_file(), reason="assets/demo-base not built")
def test_demo_base_and_demo_checkpoint_evaluate(tmp_path):
    """The committed demo base and demo checkpoint, on procedural facts and a local JSONL: the steered row wins."""
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in [(2, 3), (7, 8), (9, 9), (4, 0), (6, 5), (1, 8)]))
    out = tmp_path / "demo"
    code = main(["evaluate", "--model", str(DEMO_BASE), "--include-base",
                 "--checkpoint", f"steering={DEMO_BASE.parent / 'demo-checkpoint'}",
                 "--benchmarks", "procedural:facts:16", f"file:{data}", "--temperature", "0",
                 "--max-new-tokens", "32", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    _check_consistency(out, results)
    base, steered = results["rows"][0]["results"], results["rows"][1]["results"]
    assert len(base) == len(steered) == 2
    for bench in base:
        # greedy, the base never boxes its (right) answers; the RL-trained vectors make it box them
        assert base[bench]["accuracy"] == 0.0 and steered[bench]["accuracy"] >= 0.8, (bench, base, steered)
    assert (out / "table.md").read_text().count("|") > 10


# --------------------------------------------------------------------------------------------------------------------
# CLI misuse: one line, exit 2, before any model loads


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "/nonexistent/ckpt"], "no such directory"),
    (["--benchmarks", "aime2"], "unknown benchmark 'aime2'"),
    (["-k", "0"], "--num-samples must be >= 1"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--seeds", "1", "1"], "duplicates"),
    (["--benchmarks", "procedural:arithmetic:0"], ">= 1"),
    (["--template", "no_such_template"], "--template"),
    (["--label", "a"], "--label given 1 times for 0 --checkpoint"),
    (["--reward-float-rounding", "-1"], "--reward-float-rounding must be an integer >= 0"),
    (["-k", "1", "--pass-k", "5"], "--pass-k 5: procedural:arithmetic:2 draws 1 sample(s) per problem"),
    (["-k", "4", "--pass-k", "2", "8"], "--pass-k 8: procedural:arithmetic:2 draws 4 sample(s) per problem"),
])
def test_cli_misuse_exits_2(extra, message, tiny_base_dir, tmp_path, capsys, weight_loads):
    argv = ["evaluate", "--model", str(tiny_base_dir), "--benchmarks", "procedural:arithmetic:2",
            "--out", str(tmp_path / "o"), "--no-progress"]
    # later flags override earlier ones for single-valued options
    code = main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("python -m analysis evaluate: error:")
    assert message in err


def test_cli_misuse_more(tmp_path, capsys, weight_loads, tiny_base_dir):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        (["evaluate", "--benchmarks", "procedural:arithmetic:2", "--out", str(tmp_path / "o")], "nothing to evaluate"),
        (["evaluate", "--model", str(tiny_base_dir), "--benchmarks", str(bad), "--out", str(tmp_path / "o")],
         "not valid JSON"),
        (["evaluate", "--model", str(tmp_path / "missing-model"), "--benchmarks", "procedural:arithmetic:2",
          "--out", str(tmp_path / "o")], "no such directory"),
        (["evaluate", "--checkpoint", str(tmp_path), "--benchmarks", "procedural:arithmetic:2",
          "--out", str(tmp_path / "o")], "not a checkpoint"),
        # offline (conftest sets HF_HUB_OFFLINE): a Hub model fails on its config, before any weights load
        (["evaluate", "--model", "no-such-org/no-such-model", "--benchmarks", "procedural:arithmetic:2",
          "--out", str(tmp_path / "o")], "cannot load the config of 'no-such-org/no-such-model'"),
    ]
    for argv, message in cases:
        code = main(argv + ["--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and message in err, err


def test_cli_subprocess_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis", "evaluate", "--checkpoint", str(tmp_path / "nope"),
                           "--benchmarks", "gsm8k", "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such directory" in proc.stderr


@pytest.mark.parametrize("kind, message", [
    ("truncated", "does not match the checksum"),
    ("nan", "NaN or Inf"),
    ("wrong hidden size", "width [48]"),
    ("extra layer", "layers [0, 1, 2, 7]"),
])
def test_a_corrupt_checkpoint_is_refused_before_loading_and_leaves_earlier_results(
        kind, message, tiny_base_dir, tiny_checkpoint, tmp_path, capsys, weight_loads):
    out = tmp_path / "earlier"
    out.mkdir()
    earlier = {name: f"an earlier evaluation's {name}" for name in ("results.json", "samples.jsonl", "table.md")}
    for name, text in earlier.items():
        (out / name).write_text(text)
    code = main(["evaluate", "--checkpoint", str(corrupt_checkpoint(kind, tiny_checkpoint, tmp_path)), "--benchmarks",
                 "procedural:arithmetic:2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert {name: (out / name).read_text() for name in earlier} == earlier
