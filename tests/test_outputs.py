"""Issue 25, "nothing is destroyed": an analysis command's --out is replaced only once the command is done.

A failed command (an error, a bug, Ctrl-C, a kill) leaves an earlier output byte-identical; a finished one replaces
it completely; a directory that is not an analysis result, or holds what the earlier result did not write, is
refused; select replaces only its own entries of a run directory; printed and recorded paths name OUT, never the
staging directory (analysis/output.py)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import analysis.evaluate as ev
import analysis.layer_ablation as la
import analysis.select as sel
from analysis import output
from analysis.__main__ import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: relative path -> sha256 (directories: "dir")."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def leftovers(out: Path) -> list[str]:
    """Staging or moved-aside directories of ``out`` left next to it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def evaluate_argv(tiny_base_dir, out, *rows):
    return ["evaluate", "--model", str(tiny_base_dir), *rows, "--benchmarks", "procedural:arithmetic:2", "-k", "1",
            "--seeds", "0", "--max-new-tokens", "4", "--out", str(out), "--no-progress"]


@pytest.fixture
def earlier_evaluation(tiny_base_dir, tiny_checkpoint, tmp_path, capsys):
    """OUT holding a finished evaluation of two rows (so with differences.png), and its snapshot."""
    out = tmp_path / "eval"
    assert main(evaluate_argv(tiny_base_dir, out, "--include-base", "--checkpoint", f"steering={tiny_checkpoint}")) == 0
    printed = capsys.readouterr().out
    assert {"results.json", "table.md", "samples.jsonl", "differences.png"} <= set(os.listdir(out))
    assert f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'samples.jsonl'}, {out / 'differences.png'}" \
        in printed and ".partial-" not in printed
    return out, snapshot(out)


@pytest.mark.parametrize("error", [RuntimeError("generation failed"), KeyboardInterrupt()])
def test_a_failing_evaluate_leaves_the_earlier_output_byte_identical(error, earlier_evaluation, tiny_base_dir,
                                                                      tiny_checkpoint, monkeypatch):
    out, before = earlier_evaluation
    real, calls = ev.evaluate_model, []

    def fail_on_second_row(*a, **k):  # the first row's samples and partial results.json are written first
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate_model", fail_on_second_row)
    with pytest.raises(type(error)):
        main(evaluate_argv(tiny_base_dir, out, "--include-base", "--checkpoint", f"steering={tiny_checkpoint}"))
    assert len(calls) == 2
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_a_finished_evaluate_replaces_the_earlier_output_completely(earlier_evaluation, tiny_base_dir, capsys):
    out, before = earlier_evaluation
    assert main(evaluate_argv(tiny_base_dir, out)) == 0  # one row: nothing to difference, no differences.png
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == [output.ENTRIES_FILE, "results.json", "samples.jsonl", "table.md"]
    assert [r["label"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["Base"]
    assert {json.loads(line)["row"] for line in (out / "samples.jsonl").read_text().splitlines()} == {"Base"}
    assert snapshot(out)["results.json"] != before["results.json"]
    assert f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'samples.jsonl'}\n" in printed
    assert ".partial-" not in printed and leftovers(out) == []


def test_an_unrelated_directory_is_refused_before_any_model_loads(tiny_base_dir, tmp_path, capsys, weight_loads):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my own notes")
    (mine / "sub" / "data.bin").write_bytes(b"\0\1\2")
    before = snapshot(mine)
    assert main(evaluate_argv(tiny_base_dir, mine)) == 2
    assert capsys.readouterr().err == (f"python -m analysis evaluate: error: --out {mine}: holds files that are not "
                                       "an analysis result; choose a new or empty directory\n")
    assert snapshot(mine) == before and leftovers(mine) == [] and weight_loads == []


def test_an_output_that_holds_an_input_is_refused(tiny_base_dir, tiny_checkpoint, tmp_path, capsys):
    """The swap would remove the checkpoint the command reads: --out a directory above it is refused."""
    out = tmp_path / "holds"
    shutil.copytree(tiny_checkpoint, out / "ck")
    (out / "result.json").write_text("{}")  # an analysis result, so only the input stops it
    before = snapshot(out)
    assert main(["logit-lens", "--checkpoint", str(out / "ck"), "--out", str(out), "--benchmarks",
                 "procedural:arithmetic:2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: holds {out / 'ck'}, which this command reads or refers to" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("flag", ["--benchmarks", "--template"])
def test_evaluate_refuses_an_out_that_holds_its_benchmark_or_template_file(flag, tiny_base_dir, tmp_path, capsys,
                                                                           weight_loads):
    out = tmp_path / "holds"
    out.mkdir()
    (out / "result.json").write_text("{}")
    (out / "bench.jsonl").write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    (out / "t.txt").write_text("Q: {question}\nA:")
    argv = evaluate_argv(tiny_base_dir, out)
    given = out / ("bench.jsonl" if flag == "--benchmarks" else "t.txt")
    if flag == "--benchmarks":
        argv[argv.index("--benchmarks") + 1] = f"file:{given}"
    else:
        argv += ["--template", str(given)]
    before = snapshot(out)
    assert main(argv) == 2
    assert f"--out {out}: holds {given}, which this command reads or refers to" in capsys.readouterr().err
    assert snapshot(out) == before and weight_loads == []


def test_what_a_killed_run_left_is_cleaned_by_the_next_run(earlier_evaluation, tiny_base_dir):
    """SIGKILL runs no finally: the staging directory stays until the next run into the same OUT removes it."""
    out, _ = earlier_evaluation
    script = ("import os, signal, sys; from analysis import output; s = output.prepare_out(sys.argv[1]); "
              "(s / 'samples.jsonl').write_text('half'); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    assert leftovers(out) == [f".eval.partial-{proc.pid}"]
    assert main(evaluate_argv(tiny_base_dir, out)) == 0
    assert leftovers(out) == [] and (out / "samples.jsonl").read_text() != "half"


def test_a_kill_between_the_two_renames_of_the_swap_loses_nothing(tmp_path):
    """Killed after OUT was renamed aside and before the new one took its place: the next prepare_out puts the
    earlier output back (the new one was never completed as far as anyone knows) and removes the staging dir."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    old = tmp_path / f".o.old-{proc.pid}"
    old.mkdir()
    (old / "result.json").write_text('{"earlier": 1}')
    (tmp_path / f".o.partial-{proc.pid}").mkdir()
    staging = output.prepare_out(out)
    try:
        assert (out / "result.json").read_text() == '{"earlier": 1}'
        assert leftovers(out) == [staging.name] and staging.name == f".o.partial-{os.getpid()}"
    finally:
        output.discard_unfinished()
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------------------------------
# A command that ends with output.finish: layer-ablation make (no model)


def make_argv(out, *extra):
    return ["layer-ablation", "make", "--model", "x", "--dataset", "d", "--num-layers", "3", "--schedule", "qwen",
            "--out", str(out), *extra]


def test_finish_records_and_prints_the_final_paths_and_a_failure_changes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "abl"
    runs = tmp_path / "runs"
    assert main(make_argv(out, "--runs-dir", str(runs))) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == (f"layer-ablation make: 3 configs in {out / 'configs'}; run them with bash "
                               f"{out / 'launch.sh'} or wandb sweep {out / 'sweep.yaml'}; wrote {out / 'result.json'}")
    result = json.loads((out / "result.json").read_text())
    assert [r["config"] for r in result["runs"]] == [str(out / "configs" / f"layer_0{i}.yaml") for i in range(3)]
    assert json.loads((out / "runs.json").read_text())["runs"] == result["runs"]
    assert str(out / "configs" / "layer_01.yaml") in (out / "launch.sh").read_text()
    assert ".partial-" not in "".join(p.read_text() for p in out.rglob("*") if p.suffix in (".json", ".sh", ".yaml"))
    before = snapshot(out)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(la, "_write_sweep", boom)  # after the configs and launch.sh are written
    with pytest.raises(RuntimeError):
        main(make_argv(out, "--runs-dir", str(runs), "--constant-lr", "0.01"))
    assert snapshot(out) == before and leftovers(out) == []
    monkeypatch.undo()
    (out / "configs" / "layer_02.yaml").unlink()  # one of the entries the earlier make wrote: no other is needed
    assert main(make_argv(out, "--runs-dir", str(runs), "--constant-lr", "0.01")) == 0
    assert json.loads((out / "result.json").read_text())["schedule"] == "constant"
    assert (out / "configs" / "layer_02.yaml").is_file() and leftovers(out) == []
    assert json.loads((out / output.ENTRIES_FILE).read_text()) == ["configs", "launch.sh", "lr_schedule.png",
                                                                    "result.json", "runs.json", "sweep.yaml"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_rerun_refuses_an_out_that_holds_a_nested_output(tmp_path, capsys):
    """docs/analysis.md's old example put collect's --out inside make's: rerunning make deleted the evaluation."""
    out = tmp_path / "abl"
    assert main(make_argv(out, "--runs-dir", str(tmp_path / "runs"))) == 0
    (out / "eval").mkdir()
    (out / "eval" / "result.json").write_text('{"hours": "of evaluation"}\n')
    before = snapshot(out)
    capsys.readouterr()
    assert main(make_argv(out, "--runs-dir", str(tmp_path / "runs"))) == 2
    assert one_line(capsys) == (f"python -m analysis layer-ablation: error: --out {out}: holds eval, which the earlier "
                                "result there did not write (another command's output, or your files); move them or "
                                "choose another directory\n")
    assert snapshot(out) == before and leftovers(out) == []


def test_a_rerun_refuses_an_out_that_holds_a_users_file(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(make_argv(out, "--runs-dir", str(tmp_path / "runs"))) == 0
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    capsys.readouterr()
    assert main(make_argv(out, "--runs-dir", str(tmp_path / "runs"), "--constant-lr", "0.01")) == 2
    assert f"--out {out}: holds notes.txt, which the earlier result there did not write" in one_line(capsys)
    assert snapshot(out) == before and (out / "notes.txt").read_text() == "my notes"


def test_a_legacy_out_with_a_nested_output_is_refused(tmp_path, capsys, weight_loads):
    """An OUT written before the entries file: what it wrote is unknown, so a nested checkpoint stops the rerun."""
    out = tmp_path / "old"
    (out / "vectors").mkdir(parents=True)
    (out / "result.json").write_text("{}")
    (out / "vectors" / "steering.json").write_text("{}")
    before = snapshot(out)
    assert main(make_argv(out, "--runs-dir", str(tmp_path / "runs"))) == 2
    assert f"--out {out}: holds {out / 'vectors' / 'steering.json'}, another command's output or a run" \
        in one_line(capsys)
    assert snapshot(out) == before and leftovers(out) == [] and weight_loads == []
    (out / "vectors" / "steering.json").unlink()  # nothing nested: a legacy OUT is replaced as before
    assert main(make_argv(out, "--runs-dir", str(tmp_path / "runs"))) == 0
    assert not (out / "vectors").exists() and (out / output.ENTRIES_FILE).is_file()


def test_make_refuses_a_recipe_inside_its_out(tmp_path, capsys):
    """--config OUT/configs/layer_00.yaml (written by the earlier make): the swap would delete the recipe."""
    out = tmp_path / "abl"
    assert main(make_argv(out, "--runs-dir", str(tmp_path / "runs"))) == 0
    before = snapshot(out)
    capsys.readouterr()
    recipe = out / "configs" / "layer_00.yaml"
    assert main(["layer-ablation", "make", "--config", str(recipe), "--num-layers", "3", "--schedule", "qwen",
                 "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 2
    assert f"--out {out}: holds {recipe}, which this command reads or refers to" in one_line(capsys)
    assert snapshot(out) == before and leftovers(out) == []


def test_make_refuses_training_runs_inside_its_out(tmp_path, capsys):
    """A later make into the same --out replaces it as a whole, so the runs its configs train must live elsewhere."""
    out = tmp_path / "abl"
    assert main(make_argv(out, "--runs-dir", str(out / "runs"))) == 2
    assert f"--out {out}: holds {out / 'runs'}, which this command reads or refers to" in capsys.readouterr().err
    assert not out.exists() and leftovers(out) == []


# --------------------------------------------------------------------------------------------------------------------
# select writes into the training run's directory


@pytest.fixture
def run_dir(tiny_checkpoint, tmp_path):
    from train import checkpointing as ckpt_io

    run = tmp_path / "run"
    for step in (10, 20):
        ckpt_io.write_manifest(Path(shutil.copytree(tiny_checkpoint, run / f"checkpoint-{step}")))
    ckpt_io.write_run_record(run, metrics_file="metrics.jsonl")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "eval_accuracy": a})
                                                 for s, a in ((10, 0.5), (20, 0.25))) + "\n")
    return run


def test_select_replaces_only_its_own_entries_of_the_run_directory(run_dir, tmp_path, capsys, monkeypatch):
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(2)))
    run_files = snapshot(run_dir)
    assert main(["select", "--run", str(run_dir), "--val", str(val), "--max-new-tokens", "4", "--no-progress"]) == 0
    assert f"wrote {run_dir / 'select.json'}" in capsys.readouterr().out
    report = json.loads((run_dir / "select.json").read_text())
    assert report["val_source"]["results"] == str((run_dir / "select-val" / "results.json").resolve())
    assert (run_dir / "select-val" / "results.json").is_file()
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("select")} == run_files  # the run untouched

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(sel, "pick_best", boom)  # after the staging directory is made
    with pytest.raises(RuntimeError):
        main(["select", "--run", str(run_dir)])
    assert snapshot(run_dir) == after
    monkeypatch.undo()
    assert main(["select", "--run", str(run_dir)]) == 0  # from the metrics: no select-val any more
    final = snapshot(run_dir)
    assert not (run_dir / "select-val").exists() and final["select.json"] != after["select.json"]
    assert {k: v for k, v in final.items() if not k.startswith("select")} == run_files
    assert json.loads((run_dir / "select.json").read_text())["val_source"]["kind"] == "metrics"
