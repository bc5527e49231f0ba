"""evaluate's intervals, paired differences and detectable differences through the CLI; table.md and results.json
agree number for number; ``analysis compare`` between runs, and its refusals (one line, exit 2)."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import numpy as np
import pytest

from analysis.__main__ import main
from analysis.table import add_relative, add_statistics, default_pairs, render_table

NUM = r"[-+]?\d+\.\d+"


def _right(question: str, seed: int, sample: int, p: float) -> bool:
    h = hashlib.sha256(f"{question}|{seed}|{sample}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2 ** 32 < p


def scripted(monkeypatch):
    """A generator whose verdicts are a fixed function of (question, seed, sample): the steered row is right more
    often (0.7) than the base (0.3)."""
    import steering.generation as gen
    from steering.problems import load_benchmark

    answers = {p["question"]: p["answer"] for spec in ("procedural:arithmetic:24", "procedural:word:12")
               for p in load_benchmark(spec).problems}

    def fake_generate(model, tokenizer, prompts, params, *, num_return_sequences=1, seed=None, **kw):
        p = 0.7 if hasattr(model, "peft_config") else 0.3
        texts = []
        for prompt in prompts:
            question = next(q for q in answers if q in prompt)
            texts += [f"\\boxed{{{answers[question] if _right(question, seed, j, p) else 'x'}}}"
                      for j in range(num_return_sequences)]
        return gen.GenerationResult([[0]] * len(texts), [[1, 2]] * len(texts), texts, [True] * len(texts),
                                    num_return_sequences, ended=["eos"] * len(texts))

    monkeypatch.setattr(gen, "generate", fake_generate)


def _evaluate(out, base, checkpoint, seeds, extra=()):
    argv = ["evaluate", "--model", str(base), "--include-base", "--checkpoint", f"steering={checkpoint}",
            "--benchmarks", "procedural:arithmetic:24", "procedural:word:12", "-k", "3", "--seeds", *seeds,
            "--resamples", "500", "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two_runs(tiny_base_dir, tiny_checkpoint, tmp_path_factory):
    """Two evaluate runs of the same rows: seeds 0 and 1, then seed 2."""
    tmp = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        scripted(monkeypatch)
        return (_evaluate(tmp / "run1", tiny_base_dir, tiny_checkpoint, ["0", "1"]),
                _evaluate(tmp / "run2", tiny_base_dir, tiny_checkpoint, ["2"]), tmp)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(NUM, cell)]


def _check_table_agrees(results, table):
    """Every accuracy cell ``mean ± std [low, high]``, Relative cell and differences cell of table.md is the
    results.json number, rounded."""
    lines = table.splitlines()
    benches = [b["name"] for b in results["benchmarks"]]
    checked = 0
    for row in results["rows"]:
        cells = _cells(next(line for line in lines if line.startswith(f"| {row['label']} |")))
        stats = [row["results"][b] for b in benches] + [dict(row["avg"], accuracy=row["avg"]["mean"])]
        for cell, res in zip(cells[1:], stats):
            assert _numbers(cell) == [round(100 * v, 2) for v in (res["accuracy"], res["std"], *res["ci"])], cell
            checked += 1
        if row.get("relative") is not None:
            assert _numbers(cells[len(benches) + 2]) == [round(v, 2) for v in (row["relative"], *row["relative_ci"])]
            checked += 1
    for d in results["differences"]:
        cells = _cells(next(line for line in lines if line.startswith(f"| {d['a']} − {d['b']} |")))
        for cell, v in zip(cells[1:], [d["benchmarks"][b] for b in benches] + [d["avg"]]):
            p = float(re.search(r"p = ([\d.e-]+)", cell).group(1))
            assert _numbers(cell)[:3] == [round(100 * x, 2) for x in (v["difference"], *v["ci"])], cell
            assert p == float(f"{v['p_value']:.3g}")
            checked += 1
    note = next(line for line in lines if line.startswith("Smallest detectable difference"))
    for name, det in results["detectable"]["benchmarks"].items():
        assert f"{name} (" in note and f"{100 * det['detectable']:.1f} points" in note
    return checked


def test_evaluate_writes_intervals_differences_and_a_table_that_agrees(two_runs):
    results, _, tmp = two_runs
    out = tmp / "run1"
    assert [(d["a"], d["b"]) for d in results["differences"]] == [("Steering", "Base")]
    for b in results["benchmarks"]:
        assert len(b["problem_keys"]) == len(b["problem_ids"]) == b["num_problems"]
    for row in results["rows"]:
        for res in row["results"].values():
            for ps in res["per_seed"]:  # the per-problem table: correct samples of k per problem and seed
                assert len(ps["problem_correct"]) == ps["num_problems"] and sum(ps["problem_correct"]) == ps[
                    "num_correct"]
            assert res["ci"][0] <= res["accuracy"] <= res["ci"][1]
        assert row["avg"]["ci"][0] <= row["avg"]["mean"] <= row["avg"]["ci"][1]
    d = results["differences"][0]
    assert d["avg"]["difference"] > 0.2 and d["avg"]["p_value"] < 0.01  # 0.7 vs 0.3: found
    assert d["avg"]["ci"][0] > 0 and 0 < d["benchmarks"]["procedural:word:12"]["detectable"] < 1
    assert (out / "differences.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert table == results["table"] and "Differences (points)" in table
    assert _check_table_agrees(results, table) == 2 * 3 + 3
    # deterministic under --stats-seed: recomputing from the per-problem counts gives the same numbers
    again = copy.deepcopy(results)
    add_statistics(again, [("Steering", "Base")], resamples=500, seed=0)
    assert again["differences"] == results["differences"] and again["rows"] == results["rows"]
    add_statistics(again, [("Steering", "Base")], resamples=500, seed=1)
    assert again["differences"][0]["avg"]["ci"] != results["differences"][0]["avg"]["ci"]


def _synthetic(rows, n=(30, 12), k=4, seeds=2, seed=0):
    """A results.json as evaluate writes it (the parts the statistics read), rows ``{label: (role, p)}``."""
    rng = np.random.default_rng(seed)
    benches = [{"name": f"b{i}", "num_problems": size, "num_samples": k, "metric": f"avg@{k}"}
               for i, size in enumerate(n)]
    difficulty = {b["name"]: rng.random(b["num_problems"]) for b in benches}
    out = []
    for label, (role, p) in rows.items():
        res = {}
        for b in benches:
            q = np.clip(difficulty[b["name"]] + p - 0.5, 0, 1)
            counts = rng.binomial(k, q, size=(seeds, b["num_problems"]))
            accs = counts.sum(axis=1) / (k * b["num_problems"])
            res[b["name"]] = {"accuracy": float(accs.mean()), "std": float(accs.std(ddof=1)), "num_samples": k,
                              "per_seed": [{"accuracy": float(a), "problem_correct": c.tolist()}
                                           for a, c in zip(accs, counts)]}
        per_seed = [np.mean([res[b["name"]]["per_seed"][s]["accuracy"] for b in benches]) for s in range(seeds)]
        out.append({"label": label, "role": role, "results": res,
                    "avg": {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed, ddof=1))}})
    return {"rows": out, "benchmarks": benches,
            "settings": {"seeds": list(range(seeds)), "template": "qwen_math", "max_length": None,
                         "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64}}}


def test_paper_rows_relative_intervals_and_default_pairs():
    results = _synthetic({"Base": ("base", 0.3), "Steering": ("steering", 0.55), "LoRA": ("lora", 0.5),
                          "Full": ("full", 0.6)})
    rows = results["rows"]
    assert default_pairs(rows) == [("Steering", "Base"), ("LoRA", "Base"), ("Full", "Base"), ("Steering", "Full"),
                                   ("Steering", "LoRA")]
    add_relative(rows)
    add_statistics(results, default_pairs(rows), resamples=2000, seed=0)
    for r in rows:
        assert r["relative_ci"][0] <= r["relative"] <= r["relative_ci"][1]
    full = rows[3]
    assert full["relative_ci"] == pytest.approx([100.0, 100.0])  # Full / Full, on every draw
    steering = rows[1]
    assert steering["relative_improvement_ci"][0] <= steering["relative_improvement"] <= \
        steering["relative_improvement_ci"][1]
    assert rows[0]["relative_improvement_ci"] == pytest.approx([0.0, 0.0])  # Base: 0 on every draw
    table = render_table(results)
    assert _check_table_agrees(results, table) == 4 * 3 + 4 + 5 * 3


def test_compare_runs_on_their_shared_problems(two_runs, capsys, tmp_path):
    _, _, tmp = two_runs
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp / "run1"), str(tmp / "run2" / "results.json"), "--resamples", "500",
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert [(d["a"], d["b"]) for d in result["differences"]] == [("run2/Base", "run1/Base"),
                                                                  ("run2/Steering", "run1/Steering")]
    for d in result["differences"]:  # the same model, other seeds: no real difference
        assert d["avg"]["p_value"] > 0.01 and d["avg"]["ci"][0] < d["avg"]["difference"] < d["avg"]["ci"][1]
        assert d["problems"]["procedural:word:12"] == {"a": 12, "b": 12, "shared": 12}
    assert (out / "differences.png").is_file()
    assert "| run2/Steering − run1/Steering |" in capsys.readouterr().out
    assert main(["compare", f"old={tmp / 'run1'}", f"new={tmp / 'run2'}", "--pair", "new/Steering", "old/Base",
                 "--resamples", "500", "--out", str(out)]) == 0
    d = json.loads((out / "result.json").read_text())["differences"]
    assert [(x["a"], x["b"]) for x in d] == [("new/Steering", "old/Base")] and d[0]["avg"]["p_value"] < 0.01


def _edited(tmp, name, edit):
    results = json.loads((tmp / "run2" / "results.json").read_text())
    edit(results)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(results))
    return str(path)


def test_compare_refuses_bad_input(two_runs, capsys, tmp_path):
    _, _, runs = two_runs
    tmp = tmp_path
    for name in ("run1", "run2"):
        (tmp / name).mkdir()
        (tmp / name / "results.json").write_text((runs / name / "results.json").read_text())

    def set_temperature(r):
        for row in r["rows"]:
            row["sampling"]["temperature"] = 0.6

    def lenient(r):
        r["settings"]["grading_options"]["strict"] = False

    def old_format(r):
        for b in r["benchmarks"]:
            del b["problem_keys"]

    def other_problems(r):
        for b in r["benchmarks"]:
            b["problem_keys"] = [f"other-{i}" for i in range(b["num_problems"])]

    not_json = tmp / "bad.json"
    not_json.write_text("{oops")
    run1 = str(tmp / "run1")
    cases = [
        ([_edited(tmp, "hot", set_temperature)], "not comparable: temperature 0.6 vs 1.0"),
        ([_edited(tmp, "lenient", lenient)], "not comparable: grading_options"),
        ([_edited(tmp, "old", old_format)], "no per-problem records"),
        ([_edited(tmp, "other", other_problems)], "share no problem"),
        ([str(tmp / "missing")], "no such file"),
        ([str(not_json)], "not a readable results.json"),
        ([str(tmp / "run2"), "--pair", "run2/Nope", "run1/Base"], "--pair: no row 'run2/Nope'"),
        ([str(tmp / "run2"), "--resamples", "10"], "--resamples must be >= 100"),
        ([], "at least two results"),
    ]
    for extra, message in cases:
        code = main(["compare", run1, *extra, "--out", str(tmp / "refused")])
        err = capsys.readouterr().err.strip()
        assert code == 2, (extra, err)
        assert len(err.splitlines()) == 1 and err.startswith("python -m analysis compare: error:") and message in err
    assert not (tmp / "refused").exists()  # refused before any output


def test_evaluate_statistics_misuse(tiny_base_dir, tmp_path, capsys, monkeypatch):
    import analysis.evaluate as ev

    monkeypatch.setattr(ev, "load_row_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for extra, message in [(["--pair", "base", "nope"], "--pair: no row 'nope'"),
                           (["--pair", "base", "Base"], "against itself"),
                           (["--resamples", "99"], "--resamples must be >= 100")]:
        code = main(["evaluate", "--model", str(tiny_base_dir), "--benchmarks", "procedural:arithmetic:2",
                     "--out", str(tmp_path / "o"), "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
