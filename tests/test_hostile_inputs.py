"""Issue 25, "Hostile input, nothing lost": the committed corpus of bad input (``hostile_corpus.py``,
``hostile_flags.py``), each case run in-process through ``python -m train`` or ``python -m analysis <command>``.

Every refused case must end with exit code 2 and exactly one line on stderr (``python -m train: error: …`` /
``python -m analysis <command>: error: …``, holding the case's ``message``), without any weights loading (a spy on
every loader: transformers', PEFT's and the project's), with every earlier output byte-identical (the world's run
directory, evaluation directory and export, and the case's own files, hashed before and after) and ``{new}`` (the
``--out`` / ``output_dir`` that did not exist) still absent. The ``accept`` cases are valid but odd input: they must
get past every check (as far as a loader, or to exit code 0).

A case that fails today is a strict xfail naming what is wrong: when a fix lands it turns red until its mark goes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import WeightsLoaded, spy_on_weight_loaders
from hostile_corpus import CASES, Case
from hostile_flags import FLAG_CASES

ALL = CASES + FLAG_CASES


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (and the set of directories): a byte-level picture of earlier outputs."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# --------------------------------------------------------------------------------------------------------------------
# The world: built once per module from the session's tiny base and checkpoint


@pytest.fixture(scope="module")
def world(tiny_base_dir, tiny_checkpoint, tmp_path_factory):
    from steering.tiny import build_char_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("hostile-world")
    ck = Path(shutil.copytree(tiny_checkpoint, root / "ck"))
    wide = root / "wide-base"  # a base of another shape: hidden size 48
    tiny_model("qwen2", seed=1, hidden_size=48).save_pretrained(wide)
    build_char_tokenizer().save_pretrained(wide)
    tsck = root / "ts-ck"  # a token-scaling checkpoint (token_gates.safetensors): what token-scaling reads
    _save_token_scaling(tiny_base_dir, ck, tsck)
    run = _earlier_run(ck, root / "earlier-run")  # an earlier run: a complete checkpoint, latest, final/, metrics
    layer0 = root / "layer0-ck"  # a single-layer checkpoint (layer 0): what a layer-ablation run holds
    _save_layer0(tiny_base_dir, ck, layer0)
    run1 = _earlier_run(layer0, root / "earlier-layer0-run")
    evaldir = root / "earlier-eval"
    evaldir.mkdir()
    (evaldir / "results.json").write_text(json.dumps({"rows": [{"label": "rl", "accuracy": 0.5}]}))
    (evaldir / "table.png").write_bytes(b"\x89PNG earlier plot")
    from analysis.__main__ import main

    export = root / "earlier.gguf"
    assert main(["export", "--checkpoint", str(ck), "--to", "gguf", "--drop-layer-0", "--out", str(export)]) == 0
    (root / "a-file.txt").write_text("a plain file\n")
    (root / "data.jsonl").write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n"
                                             for i in range(8)))
    (root / "traces.jsonl").write_text(json.dumps({"text": "Wait, 1+1=2.", "prompt": "1+1?",
                                                   "spans": [{"start": 0, "end": 5, "label": "backtracking"}]}) + "\n")
    subs = {"base": tiny_base_dir, "wide": wide, "ck": ck, "tsck": tsck, "run": run, "run1": run1, "evaldir": evaldir,
            "export": export, "file": root / "a-file.txt", "data": root / "data.jsonl", "traces": root / "traces.jsonl"}
    return SimpleNamespace(root=root, subs={k: str(v) for k, v in subs.items()}, **subs)


def _earlier_run(ck: Path, run: Path) -> Path:
    """A finished run of checkpoint ``ck``: a complete ``checkpoint-1``, ``latest``, ``final/``, metrics."""
    from train import checkpointing as ckpt_io

    step = shutil.copytree(ck, run / "checkpoint-1")
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    (step / "optimizer.pt").write_bytes(b"optimizer state")
    ckpt_io.write_manifest(step)
    ckpt_io.write_latest(run, step)
    shutil.copytree(ck, run / "final")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_accuracy": 0.5}) + "\n")
    ckpt_io.write_run_record(run, metrics_file="metrics.jsonl")
    return run


def _save_layer0(base_dir, ck, out):
    from steering import vectors as sv

    model = sv.attach_steering(sv.load_base_model(str(base_dir), dtype="float32"), layers=[0],
                               init={0: sv.load_vectors(ck)[0]})
    sv.save_checkpoint(model, out, base_model=str(base_dir), step=1)


def _save_token_scaling(base_dir, ck, out):
    from steering import token_scaling as ts
    from steering import vectors as sv

    model = sv.attach_steering(sv.load_base_model(str(base_dir), dtype="float32"), init=sv.load_vectors(ck))
    ts.attach_token_scaling(model)
    sv.save_checkpoint(model, out, base_model=str(base_dir), step=1, extra=ts.checkpoint_extra(model))
    ts.save_token_gates(model, out)


def fill(token: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        token = token.replace("{" + key + "}", value)
    return token


@dataclass
class Outcome:
    rc: object  # the exit code, or None when a loader was reached
    err_lines: list[str]
    loads: list[str]
    changed: list[str]
    new_exists: bool


def run_case(case: Case, world, tmp: Path, monkeypatch, capsys) -> Outcome:
    from analysis.__main__ import main as analysis_main
    from train.__main__ import cli as train_cli

    subs = {**world.subs, "tmp": str(tmp), "new": str(tmp / "new-out")}
    if case.setup is not None:
        subs.update({k: str(v) for k, v in (case.setup(world, tmp, subs) or {}).items()})
    argv = [fill(a, subs) for a in case.argv]
    roots = (world.root, world.base, tmp)
    before = snapshot(*roots)
    loads = spy_on_weight_loaders(monkeypatch)
    # An accepted training case gets as far as build_trainer's logging.basicConfig, whose handler would keep writing
    # to this case's captured stderr in later cases: the root logger's handlers are restored after each case.
    root_logger = logging.getLogger()
    monkeypatch.setattr(root_logger, "handlers", list(root_logger.handlers))
    capsys.readouterr()
    try:
        rc = (train_cli if case.prog == "train" else analysis_main)(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    except WeightsLoaded:
        rc = None
    err = capsys.readouterr().err
    after = snapshot(*roots)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(rc, error_lines(err), loads, changed, Path(subs["new"]).exists())


def error_lines(err: str) -> list[str]:
    """The non-empty lines of stderr, less argparse's usage banner: argparse prints ``usage: …`` (and its indented
    continuation lines) before its own one error line, for every parse error; what the banner says is the command's
    synopsis, not a second error."""
    lines = [line for line in err.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage: "):
        lines = lines[1:]
        while lines and lines[0].startswith(" "):
            lines = lines[1:]
    return lines


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [c.id for c in ALL]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(ALL) >= 150
    assert all(c.why for c in ALL)


@pytest.mark.parametrize("case", [_param(c) for c in ALL])
def test_hostile_input(case, world, tmp_path, monkeypatch, capsys):
    got = run_case(case, world, tmp_path, monkeypatch, capsys)
    if case.accept == "load":
        assert got.rc is None and got.loads, (got.rc, got.err_lines)
        return
    if case.accept == "ok":
        assert got.rc == 0, got.err_lines
        return
    prefix = "python -m train: error: " if case.prog == "train" else f"python -m analysis {case.prog}"
    assert got.loads == [], f"weights loaded before the input was refused: {got.loads}; stderr {got.err_lines}"
    assert got.rc == 2, (got.rc, got.err_lines)
    assert len(got.err_lines) == 1 and got.err_lines[0].startswith(prefix), got.err_lines
    assert case.message in got.err_lines[0], got.err_lines
    assert got.changed == [], f"the failed command changed {got.changed}"
    assert not got.new_exists, "the failed command made its output"


def test_every_command_is_in_the_corpus():
    from analysis.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    asked = {c.prog for c in ALL}
    assert set(sub.choices) | {"train"} <= asked, sorted(set(sub.choices) - asked)


def test_the_harness_sees_a_load_a_write_and_a_second_line(world, tmp_path, monkeypatch, capsys):
    """The properties above can fail: a loader call, a file written and stray stderr are each seen."""
    loads = Case("probe", "evaluate", ("evaluate", "--checkpoint", "{ck}", "--out", "{new}",
                                       "--benchmarks", "procedural:arithmetic:2"), "a good command line")
    (tmp_path / "a").mkdir()
    got = run_case(loads, world, tmp_path / "a", monkeypatch, capsys)
    assert got.rc is None and got.loads
    writes = Case("probe", "export", ("export", "--checkpoint", "{ck}", "--to", "gguf", "--drop-layer-0", "--out",
                                      "{tmp}/v.gguf"), "a good export")
    (tmp_path / "b").mkdir()
    got = run_case(writes, world, tmp_path / "b", monkeypatch, capsys)
    assert got.rc == 0 and got.changed == [str(tmp_path / "b" / "v.gguf")]
    assert error_lines("usage: x [-h]\n       [--y Y]\nx: error: bad\n") == ["x: error: bad"]
    assert error_lines("a warning\nx: error: bad\n") == ["a warning", "x: error: bad"]
