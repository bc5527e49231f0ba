"""Behaviour steering evaluation: +c*u / 0 / -c*u at one layer, sentence fractions per label, JSON + bar plot."""

import json
from pathlib import Path

import pytest

from analysis.__main__ import main as analysis_main
from steering import annotate
from steering import vectors as sv

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "traces.jsonl"
DEMO_BASE = ROOT / "assets" / "demo-base"


@pytest.fixture(scope="module")
def dm_out(tiny_base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("beh") / "dm"
    assert analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--label",
                          "backtracking", "--out", str(out)]) == 0
    return out


def check_result(out, coefs, n):
    res = json.loads((out / "result.json").read_text())
    assert [r["coef"] for r in res["runs"]] == coefs
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == n * len(coefs)
    h = annotate.HeuristicAnnotator()
    for run in res["runs"]:
        rows = [g for g in gens if g["coef"] == run["coef"]]
        assert run["n_generations"] == n == len(rows)
        # recount from the saved generations: the numbers are what the annotator says
        counts = annotate.label_counts([g["completion"] for g in rows], [h.annotate(g["completion"]) for g in rows])
        assert run["counts"] == counts
        assert run["n_sentences"] == sum(counts.values()) == sum(len(annotate.sentences(g["completion"])) for g in rows)
        assert set(run["fractions"]) == set(annotate.LABELS) | {"none"}
        if run["n_sentences"]:
            assert abs(sum(run["fractions"].values()) - 1) < 1e-9
            for k, c in counts.items():
                assert run["fractions"][k] == pytest.approx(c / run["n_sentences"])
    assert (out / "behavior.png").stat().st_size > 0
    return res, gens


def test_behavior_end_to_end_on_a_tiny_model(dm_out, tiny_base_dir, tmp_path):
    from steering.generation import SamplingParams, generate
    from steering.templates import get_template
    from steering.tasks import make_tasks
    from steering.vectors import load_tokenizer

    out = tmp_path / "beh"
    n, coefs = 4, [-8.0, 0.0, 8.0]
    rc = analysis_main(["behavior", "--vectors", str(dm_out), "--label", "backtracking", "--layer", "1",
                        "--coefs", *map(str, coefs), "--n", str(n), "--max-new-tokens", "40", "--task", "arithmetic",
                        "--out", str(out)])
    assert rc == 0
    res, gens = check_result(out, coefs, n)
    assert res["layer"] == 1 and res["label"] == "backtracking" and res["model"] == str(tiny_base_dir)
    assert set(res["target_fraction_change"]) == {"-8", "0", "8"} and res["target_fraction_change"]["0"] == 0
    # c = 0 is exactly the unsteered model: greedy generation of the plain base gives the same texts
    base = sv.load_base_model(str(tiny_base_dir), dtype="float32").eval()
    tok = load_tokenizer(tiny_base_dir)
    questions = [r["question"] for r in make_tasks("arithmetic", n, 0, part="heldout")]
    assert [g["question"] for g in gens if g["coef"] == 0] == questions
    prompts = [get_template("qwen_math").render(q, tokenizer=tok) for q in questions]
    plain = generate(base, tok, prompts, SamplingParams(max_new_tokens=40, temperature=0.0, do_sample=False), seed=0)
    assert [g["completion"] for g in gens if g["coef"] == 0] == plain.completions
    # a large vector changes what the model writes
    assert [g["completion"] for g in gens if g["coef"] == 8] != plain.completions


def test_layer_from_attribution_result_and_errors(dm_out, tmp_path, capsys):
    attr = tmp_path / "attr.json"
    attr.write_text(json.dumps({"chosen_layer": 2}))
    out = tmp_path / "b"
    rc = analysis_main(["behavior", "--vectors", str(dm_out / "backtracking"), "--attribution", str(attr), "--coefs",
                        "0", "1", "--n", "2", "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    res, _ = check_result(out, [0.0, 1.0], 2)
    assert res["layer"] == 2
    rc = analysis_main(["behavior", "--vectors", str(dm_out), "--layer", "5", "--out", str(tmp_path / "c")])
    assert rc == 2 and "layers [0, 1, 2] only" in capsys.readouterr().err
    rc = analysis_main(["behavior", "--vectors", str(dm_out), "--layer", "1", "--task", "nope",
                        "--out", str(tmp_path / "c")])
    assert rc == 2 and "unknown" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(not DEMO_BASE.is_dir(), reason="assets/demo-base is not built")
def test_behavior_on_the_demo_base(tmp_path):
    dm = tmp_path / "dm"
    assert analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(DEMO_BASE), "--label",
                          "backtracking", "--out", str(dm)]) == 0
    out = tmp_path / "beh"
    assert analysis_main(["behavior", "--vectors", str(dm), "--layer", "1", "--n", "4", "--max-new-tokens", "24",
                          "--task", "arithmetic", "--out", str(out)]) == 0
    check_result(out, [-1.0, 0.0, 1.0], 4)
