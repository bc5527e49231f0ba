"""The select command: checkpoint choice on validation data, reported next to the (optimistic) test-best one."""

import json

import pytest
import torch

from analysis.__main__ import main
from conftest import spy_on_weight_loaders
from analysis.select import find_checkpoints, pick_best, read_val_metrics


@pytest.fixture(scope="module")
def run_dir(tiny_base_dir, tmp_path_factory):
    """A training run: checkpoint-10/20/30 (steering, each completed by its manifest as training completes them),
    plus an interrupted save (checkpoint-40: model files, no manifest) and a non-checkpoint dir."""
    from steering import vectors as sv
    from train import checkpointing as ckpt_io

    run = tmp_path_factory.mktemp("run")
    base = sv.load_base_model(str(tiny_base_dir), dtype="float32")
    model = sv.attach_steering(base)
    g = torch.Generator().manual_seed(1)
    for step in (10, 20, 30, 40):
        sv.set_vectors(model, {l: 0.5 * torch.randn(base.config.hidden_size, generator=g)
                               for l in sv.steered_layers(model)})
        ckpt = sv.save_checkpoint(model, run / f"checkpoint-{step}", base_model=str(tiny_base_dir), step=step)
        if step != 40:  # the save of checkpoint-40 was interrupted before its manifest
            ckpt_io.write_manifest(ckpt)
    (run / "checkpoint-50").mkdir()  # incomplete: no files
    ckpt_io.write_run_record(run, metrics_file="metrics.jsonl")  # as training writes it when it starts
    return run


def write_metrics(run, lines):
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_find_checkpoints_and_helpers(run_dir, tmp_path):
    assert [s for s, _ in find_checkpoints(run_dir)] == [10, 20, 30]
    m = tmp_path / "m.jsonl"
    m.write_text('{"step": 5, "loss": 1}\n{"step": 10, "eval_accuracy": 0.1}\n{"step": 10, "eval_accuracy": 0.3}\n'
                 '{"step": 20, "eval_accur')
    values, bad = read_val_metrics(m)
    assert values == {10: 0.3} and bad == 1  # last value at a step wins; a half-written line is skipped
    assert pick_best({"a": 0.5, "b": 0.7, "c": 0.7}, ["a", "b", "c"]) == "b"  # ties -> earliest


def test_select_validation_best_differs_from_test_best(run_dir, tmp_path, capsys):
    # validation: checkpoint-20 is best; test: checkpoint-30 is best
    write_metrics(run_dir, [
        json.dumps({"step": 10, "loss": 0.5, "reward": -0.2}),
        json.dumps({"step": 10, "eval_accuracy": 0.40}),
        json.dumps({"step": 20, "eval_accuracy": 0.70}),
        json.dumps({"step": 25, "eval_accuracy": 0.99}),  # no checkpoint at step 25: not a candidate
        json.dumps({"step": 30, "eval_accuracy": 0.55}),
    ])
    test_results = {
        "benchmarks": [{"name": "gsm8k"}],
        "rows": [
            {"label": "Base", "path": None, "avg": {"mean": 0.05}},
            {"label": "s10", "path": str(run_dir / "checkpoint-10"), "avg": {"mean": 0.30}},
            {"label": "s20", "path": str(run_dir / "checkpoint-20"), "avg": {"mean": 0.45}},
            {"label": "checkpoint-30", "path": "/elsewhere/checkpoint-30", "avg": {"mean": 0.60}},  # matched by label
        ],
    }
    tr = tmp_path / "results.json"
    tr.write_text(json.dumps(test_results))
    out = tmp_path / "sel"
    code = main(["select", "--run", str(run_dir), "--test-results", str(tr), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert ("validation-selected: checkpoint-20 (val 70.00%, test 45.00%); test-best (as the reference code picks, "
            "optimistic): checkpoint-30 (test 60.00%)") in printed
    report = json.loads((out / "select.json").read_text())
    assert report["validation_selected"]["checkpoint"] == "checkpoint-20"
    assert report["validation_selected"]["step"] == 20
    assert report["test_best"]["checkpoint"] == "checkpoint-30"
    assert report["test_best_minus_selected"] == pytest.approx(0.15)
    assert [c["checkpoint"] for c in report["candidates"]] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert report["val_source"]["kind"] == "metrics"


def test_select_without_test_scores_writes_into_run(run_dir, capsys):
    write_metrics(run_dir, [json.dumps({"step": s, "eval_accuracy": a}) for s, a in ((10, 0.2), (20, 0.2), (30, 0.1))])
    assert main(["select", "--run", str(run_dir)]) == 0
    assert "validation-selected: checkpoint-10 (val 20.00%)" in capsys.readouterr().out  # tie -> earliest
    report = json.loads((run_dir / "select.json").read_text())
    assert report["test_best"] is None and report["test_source"] is None


def test_select_evaluates_val_and_test(run_dir, tmp_path, capsys):
    """--val / --benchmarks: every checkpoint is evaluated; the choice is the argmax of the evaluated val scores."""
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(2)))
    out = tmp_path / "sel2"
    code = main(["select", "--run", str(run_dir), "--val", str(val), "--benchmarks", "procedural:arithmetic:2",
                 "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "select.json").read_text())
    val_res = json.loads((out / "select-val" / "results.json").read_text())
    test_res = json.loads((out / "select-test" / "results.json").read_text())
    val_scores = {r["label"]: r["avg"]["mean"] for r in val_res["rows"]}
    assert set(val_scores) == {"checkpoint-10", "checkpoint-20", "checkpoint-30"}
    best = max(val_scores.values())
    assert report["validation_selected"]["checkpoint"] == [n for n in sorted(val_scores, key=lambda n: int(n[11:]))
                                                           if val_scores[n] == best][0]
    assert report["val_source"]["kind"] == "evaluated" and report["test_source"]["kind"] == "evaluated"
    assert {r["label"] for r in test_res["rows"]} == set(val_scores)
    assert "test-best (as the reference code picks, optimistic)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--run", "/nonexistent/run"], "no such directory"),
    (["--run", "{run}", "--val", "gsm8k", "--benchmarks", "gsm8k"], "held out from the test benchmarks"),
    (["--run", "{run}", "--metrics", "{tmp}/none.jsonl"], "no such file"),
    (["--run", "{run}", "--val-key", "eval_nope"], "no 'eval_nope' logged"),
    (["--run", "{run}", "--test-results", "{tmp}/none.json"], "no such file"),
    (["--run", "{run}", "--val", "procedural:nope"], "unknown procedural task"),
    (["--run", "{tmp}"], "no complete checkpoint"),
])
def test_select_misuse_exits_2(argv, message, run_dir, tmp_path, capsys, monkeypatch):
    loads = spy_on_weight_loaders(monkeypatch)
    write_metrics(run_dir, [json.dumps({"step": 10, "eval_accuracy": 0.5})])
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    code = main(["select", *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("python -m analysis select: error:") and message in err, err
    assert loads == []
