"""Reliability (CPU, offline): kill anywhere and resume, hostile outputs, bad configs, bad data, divergence, untrusted
checkpoints, two processes. What is guaranteed is written down in docs/reliability.md; these tests are its evidence.

The training tests use the offline demo base in ``assets/demo-base`` (``python -m train.demo_base``) and are skipped
with a reason when it is missing; ``STEERING_DEMO_BASE=/path`` points them at another build of it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conftest import spy_on_weight_loaders
from steering import vectors as sv
from train import checkpointing as ckpt_io

ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = Path(os.environ.get("STEERING_DEMO_BASE") or ROOT / "assets" / "demo-base")
needs_demo_base = pytest.mark.skipif(
    not (DEMO_BASE / "config.json").is_file(),
    reason=f"the offline demo base is missing at {DEMO_BASE}; build it with `python -m train.demo_base`")
# Subprocesses: one thread each (deterministic, and fair on a 2-core machine), offline, no W&B.
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)}


def small_config(tmp_path, name="run", **overrides):
    """configs/demo.yaml shrunk to about a second a step (as tests/test_train.py does)."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(model_name_or_path=str(DEMO_BASE), build_demo_base=False, procedural_size=200, val_size=0,
               val_steps=0, num_generations=4, per_device_train_batch_size=8, max_completion_length=10,
               learning_rate=0.05, max_steps=2, save_steps=1, output_dir=str(tmp_path / name), plot_curves=False)
    cfg.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("python -m train: error:")]


def no_unpickling(monkeypatch):
    """Nothing may be unpickled at all (checking a checkpoint reads JSON and hashes files)."""
    def forbidden(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def restricted_unpickling_only(monkeypatch) -> list[str]:
    """Resuming may read transformers' optimizer / scheduler / RNG files, with the restricted unpickler only
    (``torch.load(weights_only=True)``); anything else fails the test. Returns the files that were read."""
    real_load = torch.load
    seen: list[str] = []

    def restricted(f, *a, **k):
        if k.get("weights_only") is not True:
            raise AssertionError(f"torch.load({f!r}) without weights_only=True")
        seen.append(os.path.basename(str(f)))
        return real_load(f, *a, **k)

    def forbidden(*a, **k):
        raise AssertionError("something was unpickled with pickle")

    monkeypatch.setattr(torch, "load", restricted)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    return seen


# ------------------------------------------------------------------------------------------------------------------
# Bad configuration: one line naming the key (and the fix), exit code 2, before any model loads
# ------------------------------------------------------------------------------------------------------------------


def _vectors_checkpoint(path: Path, *, num_layers: int, hidden: int) -> Path:
    from steering.tiny import tiny_model

    model = sv.attach_steering(tiny_model("qwen2", num_hidden_layers=num_layers, hidden_size=hidden,
                                          intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2))
    sv.set_vectors(model, {l: torch.ones(hidden) for l in sv.steered_layers(model)})
    return sv.save_checkpoint(model, path, base_model="elsewhere", step=1)


BAD_CONFIGS = {
    # name: (YAML additions or a function of (tmp_path, base) returning them, words the error must contain)
    "unknown key": ("bogus_key: 1\n", ["bogus_key", "--help"]),
    "layer out of range": ("layers: [0, 7]\n", ["layers", "0..2"]),
    "init_from wrong hidden size": (lambda tmp, base: f"init_from: {_vectors_checkpoint(tmp / 'h48', num_layers=3, hidden=48)}\n",
                                    ["init_from", "hidden size [48]", "this base model"]),
    "init_from wrong layer count": (lambda tmp, base: f"init_from: {_vectors_checkpoint(tmp / 'l5', num_layers=5, hidden=32)}\n",
                                    ["init_from", "[0, 1, 2, 3, 4]", "3 layers"]),
    "init_from whose steering.json disagrees with its tensors": (lambda tmp, base: f"init_from: "
                                                                  f"{_disagreeing_checkpoint(tmp / 'dis')}\n",
                                                                  ["init_from", "lists layers [0, 1]", "[0, 1, 2]"]),
    "init_from not a checkpoint": (lambda tmp, base: f"init_from: {tmp}\n", ["init_from", "no steering vectors"]),
    "missing dataset columns": (lambda tmp, base: (tmp / "d.jsonl").write_text('{"problem": "1+1", "solution": "2"}\n')
                                and f"dataset: {tmp / 'd.jsonl'}\n", ["question_column", "answer_column"]),
    "missing dataset file": ("dataset: /nonexistent/data.jsonl\n", ["dataset", "does not exist"]),
    "num_generations does not divide the batch": ("num_generations: 3\nper_device_train_batch_size: 8\n",
                                                 ["num_generations", "divisible"]),
    "zero learning rate": ("learning_rate: 0\n", ["learning_rate", "> 0"]),
    "negative learning rate": ("learning_rate: -0.01\n", ["learning_rate", "> 0"]),
    "nan learning rate": ("learning_rate: .nan\n", ["learning_rate", "> 0"]),
    "template without {question}": (lambda tmp, base: (tmp / "t.txt").write_text("Solve it.\n")
                                    and f"template: {tmp / 't.txt'}\n", ["{question}"]),
    "resume from a missing checkpoint": ("resume_from_checkpoint: /nonexistent/checkpoint-3\n",
                                         ["resume_from_checkpoint", "does not exist"]),
    "resume from an incomplete checkpoint": (lambda tmp, base: "resume_from_checkpoint: "
                                             f"{_incomplete_checkpoint(tmp)}\n",
                                             ["resume_from_checkpoint", "not a complete checkpoint", "checksums.json"]),
    "resume from a tampered checkpoint": (lambda tmp, base: f"resume_from_checkpoint: {_tampered_checkpoint(tmp)}\n",
                                          ["resume_from_checkpoint", "optimizer.pt", "tampered"]),
    "save_total_limit 1": ("save_total_limit: 1\n", ["save_total_limit", "2 or more"]),
    "rloo with reward_weights": ("preset: paper\nreward_weights: [2.0]\n", ["reward_weights", "rloo"]),
    "static rollouts with vLLM": ("rollout_backend: static\nuse_vllm: true\n", ["static", "use_vllm", "exclusive"]),
    "a new run over another run's checkpoints": (lambda tmp, base: (tmp / "o").mkdir() or (tmp / "o" / "latest")
                                                 .write_text('{"checkpoint": "checkpoint-3"}') and "",
                                                 ["output_dir", "already holds", "--resume_from_checkpoint latest",
                                                  "--overwrite_output_dir true"]),
    "a new run over a finished run without checkpoints": (lambda tmp, base: (tmp / "o" / "final").mkdir(parents=True)
                                                          or "", ["output_dir", "finished run (final/)",
                                                                  "--overwrite_output_dir true"]),
    "infinite learning rate": ("learning_rate: .inf\n", ["learning_rate", "finite", "> 0"]),
    "infinite reward timeout": ("reward_timeout: .inf\n", ["reward_timeout", "finite"]),
    "zero batch size": ("per_device_train_batch_size: 0\n", ["per_device_train_batch_size", ">= 1"]),
    "no generations": ("num_generations: 0\n", ["num_generations", ">= 1"]),
    "negative max_steps": ("max_steps: -5\n", ["max_steps", "-1"]),
    "overwrite and resume": ("overwrite_output_dir: true\nresume_from_checkpoint: latest\n",
                             ["overwrite_output_dir", "resume_from_checkpoint"]),
    "resume latest before any checkpoint": ("resume_from_checkpoint: latest\n",
                                            ["resume_from_checkpoint", "latest", "no `latest` marker",
                                             "drop --resume_from_checkpoint"]),
}


def _disagreeing_checkpoint(tmp: Path) -> Path:
    ck = _vectors_checkpoint(tmp, num_layers=3, hidden=32)
    meta = json.loads((ck / sv.META_FILE).read_text())
    (ck / sv.META_FILE).write_text(json.dumps({**meta, "layers": [0, 1]}))  # the file still holds layers 0, 1, 2
    return ck


def _tampered_checkpoint(tmp: Path) -> Path:
    ck = _add_training_state(_vectors_checkpoint(tmp / "checkpoint-1", num_layers=3, hidden=32), 1)
    _flip_last_byte(ck / "optimizer.pt")
    return ck


def _incomplete_checkpoint(tmp: Path) -> Path:
    ck = _add_training_state(_vectors_checkpoint(tmp / "checkpoint-1", num_layers=3, hidden=32), 1)
    (ck / ckpt_io.MANIFEST).unlink()
    return ck


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_2_before_any_model_loads(case, tmp_path, tiny_base_dir, monkeypatch, capsys):
    from train.__main__ import cli as main

    extra, needles = BAD_CONFIGS[case]
    if callable(extra):
        extra = extra(tmp_path, tiny_base_dir)
    text = (f"model_name_or_path: {tiny_base_dir}\ndataset: procedural:arithmetic\noutput_dir: {tmp_path}/o\n"
            "use_cpu: true\nbf16: false\nprocedural_size: 50\nval_size: 4\nreport_to: none\n")
    lines = {line.split(":", 1)[0]: line for line in text.splitlines()}
    for line in extra.splitlines():  # the case's keys replace the defaults
        lines[line.split(":", 1)[0]] = line
    cfg = tmp_path / "c.yaml"
    cfg.write_text("\n".join(lines.values()) + "\n")
    loads = spy_on_weight_loaders(monkeypatch)  # after the case's own checkpoints are built
    no_unpickling(monkeypatch)
    start = time.monotonic()
    rc = main(["--config", str(cfg)])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    [line] = error_lines(err)
    assert err.strip() == line, f"more than the one error line on stderr: {err!r}"
    for needle in needles:
        assert needle in line, (needle, line)
    assert elapsed < 30, f"the check took {elapsed:.1f} s"
    assert not (tmp_path / "o" / "metrics.jsonl").exists() and loads == []


def test_bad_init_from_on_the_command_line_exits_2_fast(tmp_path, tiny_base_dir):
    """The same through ``python -m train``: exit code 2 and one line on stderr, nothing else written."""
    ck = _vectors_checkpoint(tmp_path / "h48", num_layers=3, hidden=48)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_base_dir}\ndataset: procedural:arithmetic\noutput_dir: {tmp_path}/o\n"
                   f"use_cpu: true\nbf16: false\ninit_from: {ck}\nprocedural_size: 50\nreport_to: none\n")
    r = subprocess.run([sys.executable, "-m", "train", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, env=SUB_ENV, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "init_from" in r.stderr and "hidden size [48]" in r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------------------------
# Untrusted checkpoints and the `latest` marker (files only: no model)
# ------------------------------------------------------------------------------------------------------------------


def _fake_training_checkpoint(path: Path, tiny_checkpoint: Path, step: int) -> Path:
    """A complete training checkpoint directory: the core fixture plus the training-state files transformers writes
    (optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json), then the manifest."""
    shutil.copytree(tiny_checkpoint, path)
    return _add_training_state(path, step)


def _add_training_state(path: Path, step: int) -> Path:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict(), path / "scheduler.pt")
    torch.save({"python": random.getstate(), "cpu": torch.random.get_rng_state()}, path / "rng_state.pth")
    (path / ckpt_io.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    ckpt_io.write_manifest(path)
    return path


def test_latest_marker_decides_and_never_a_fresh_start(tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(sv.CheckpointError, match="no `latest` marker"):  # nothing to resume: an error, not a restart
        ckpt_io.resolve_resume("latest", str(run))
    good = _fake_training_checkpoint(run / "checkpoint-2", tiny_checkpoint, 2)
    ckpt_io.write_latest(run, good)
    # A newer complete checkpoint whose marker was never written (killed in between), and an interrupted save.
    _fake_training_checkpoint(run / "checkpoint-3", tiny_checkpoint, 3)
    half = shutil.copytree(tiny_checkpoint, run / "checkpoint-4")
    assert ckpt_io.resolve_resume("latest", str(run)) == str(good)
    assert ckpt_io.run_checkpoints(run) == [run / "checkpoint-2", run / "checkpoint-3"]  # never checkpoint-4
    # A marker naming an incomplete directory is an error, never a silent fresh start.
    ckpt_io.write_latest(run, half)
    with pytest.raises(sv.CheckpointError, match="not a complete checkpoint"):
        ckpt_io.resolve_resume("latest", str(run))
    (run / ckpt_io.LATEST).write_text('{"checkpoint": "checkp')  # a torn marker (cannot happen: it is renamed)
    with pytest.raises(sv.CheckpointError, match="not valid JSON"):
        ckpt_io.resolve_resume("latest", str(run))


def test_manifest_lists_every_file_and_a_redo_starts_incomplete(tmp_path, tiny_checkpoint):
    ck = _fake_training_checkpoint(tmp_path / "checkpoint-3", tiny_checkpoint, 3)
    listed = json.loads((ck / ckpt_io.MANIFEST).read_text())["files"]
    assert set(listed) == {p.name for p in ck.iterdir() if p.name != ckpt_io.MANIFEST}
    ckpt_io.verify_checkpoint(ck)
    ckpt_io.remove_manifest(ck)  # what CheckpointCallback does before a step is saved again into this directory
    assert not ckpt_io.is_complete(ck) and ckpt_io.run_checkpoints(tmp_path) == []
    (ck / "extra.txt").write_text("x")
    ckpt_io.write_manifest(ck)
    ckpt_io.verify_checkpoint(ck)
    (ck / "extra.txt").unlink()
    with pytest.raises(sv.CheckpointError, match="extra.txt is missing"):
        ckpt_io.verify_checkpoint(ck)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TAMPERINGS = {
    "vectors flipped": ("adapter_model.safetensors", _flip_last_byte, "tampered"),
    "vectors truncated": ("adapter_model.safetensors", _truncate, "adapter_model.safetensors"),
    "optimizer flipped": ("optimizer.pt", _flip_last_byte, "tampered"),
    "optimizer truncated": ("optimizer.pt", _truncate, "optimizer.pt"),
    # the analysis rows accept a checkpoint without its training state (train.checkpointing.TRAINING_STATE); a resume
    # needs it all
    "optimizer deleted": ("optimizer.pt", Path.unlink, "optimizer.pt is missing from the checkpoint"),
    "rng flipped": ("rng_state.pth", _flip_last_byte, "tampered"),
    "rng truncated": ("rng_state.pth", _truncate, "rng_state.pth"),
    "trainer state truncated": (ckpt_io.TRAINER_STATE, _truncate, ckpt_io.TRAINER_STATE),
    "manifest truncated": (ckpt_io.MANIFEST, _truncate, "not valid JSON"),
    # issue 25: a manifest that lists nothing passed, and its entries were joined to the checkpoint unchecked
    "manifest emptied": (ckpt_io.MANIFEST, lambda p: p.write_text('{"files": {}}'), "does not list trainer_state.json"),
    "manifest without the vectors": (ckpt_io.MANIFEST, lambda p: p.write_text(json.dumps(
        {"files": {k: v for k, v in json.loads(p.read_text())["files"].items() if "safetensors" not in k}})),
        "does not list adapter_model.safetensors"),
    "manifest pointing outside": (ckpt_io.MANIFEST, lambda p: p.write_text(json.dumps({"files": {
        **json.loads(p.read_text())["files"], "../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}})),
        "a path outside the checkpoint"),
}


@pytest.mark.parametrize("content", ['["checkpoint-1"]', "null", '"checkpoint-1"', '{"checkpoint": 3}'])
def test_a_hostile_latest_marker_is_one_line(content, tmp_path):
    (tmp_path / ckpt_io.LATEST).write_text(content)
    with pytest.raises(sv.CheckpointError) as err:
        ckpt_io.resolve_resume("latest", str(tmp_path))
    assert str(tmp_path / ckpt_io.LATEST) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_tampered_checkpoint_fails_clearly_and_never_unpickles(case, tmp_path, tiny_checkpoint, monkeypatch):
    name, damage, needle = TAMPERINGS[case]
    ck = _fake_training_checkpoint(tmp_path / "checkpoint-1", tiny_checkpoint, 1)
    ckpt_io.verify_checkpoint(ck)  # intact: fine
    damage(ck / name)
    no_unpickling(monkeypatch)
    with pytest.raises(sv.CheckpointError) as err:
        ckpt_io.resolve_resume(str(ck), str(tmp_path))
    message = str(err.value)
    assert needle in message and "\n" not in message and message.startswith("resume_from_checkpoint:"), message


# ------------------------------------------------------------------------------------------------------------------
# Bad data rows, a stale temp dir of our own pid, and the reward under hostile completions, inside a real trainer
# ------------------------------------------------------------------------------------------------------------------

GOOD_ROWS = [{"question": f"What is {a} + {b}?", "answer": f"{a} plus {b} #### {a + b}"}
             for a in range(10, 16) for b in range(20, 26)]
BAD_ROWS = [
    {"question": "", "answer": "#### 1"},                 # empty question
    {"question": "   \n", "answer": "#### 2"},            # blank question
    {"question": "What is 1 + 1?"},                       # missing answer
    {"question": "What is 2 + 2?", "answer": None},       # null answer
    {"question": "What is 3 + 3?", "answer": "six"},      # unparsable answer (no ####)
    {"question": "What is 4 + 4?", "answer": "#### "},    # empty after ####
    {"question": 5, "answer": "#### 5"},                  # not a string
    {"answer": "#### 6"},                                 # missing question
]


@pytest.fixture(scope="module")
def bad_rows_run(tmp_path_factory):
    """One real training step on a JSONL file with bad rows mixed in, with a stale, half-written checkpoint-1 (an
    interrupted save of an earlier attempt: no manifest) in the way of the first save."""
    if not (DEMO_BASE / "config.json").is_file():
        pytest.skip(f"the offline demo base is missing at {DEMO_BASE}; build it with `python -m train.demo_base`")
    from train.__main__ import main, parse_config

    tmp = tmp_path_factory.mktemp("badrows")
    rows = list(GOOD_ROWS)
    for i, bad in enumerate(BAD_ROWS):
        rows.insert(3 + 4 * i, bad)  # the first row is good (see test_bad_first_row_is_skipped_too)
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stale = tmp / "run" / "checkpoint-1"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half-written")
    (stale / "optimizer.pt.partial").write_bytes(b"half-written")  # a file the new save does not write
    cfg = small_config(tmp, dataset=str(data), answer_parser="gsm8k", max_steps=1, reward_timeout=1.0)
    trainer = main(parse_config(["--config", str(cfg)]))
    return trainer, tmp / "run"


@needs_demo_base
def test_bad_rows_are_skipped_counted_and_training_goes_on(bad_rows_run, caplog):
    from steering.problems import load_problems

    trainer, run = bad_rows_run
    with caplog.at_level("WARNING", logger="steering.problems"):
        load_problems(str(run.parent / "data.jsonl"), answer_parser="gsm8k")
    assert f"skipped {len(BAD_ROWS)} bad rows" in caplog.text
    [data_line] = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "data"]
    assert data_line["step"] == 0 and data_line["skipped_rows"] == len(BAD_ROWS)
    assert data_line["train_rows"] == len(GOOD_ROWS)
    assert trainer.state.global_step == 1
    assert json.loads((run / "latest").read_text()) == {"checkpoint": "checkpoint-1"}
    ckpt_io.verify_checkpoint(run / "checkpoint-1")
    saved = sv.load_vectors(run / "checkpoint-1")
    for layer, v in sv.get_vectors(trainer.model).items():
        assert torch.equal(saved[layer], v)
    assert not (run / "checkpoint-1" / "optimizer.pt.partial").exists(), "the interrupted save was not cleaned up"


@needs_demo_base
def test_overwrite_output_dir_starts_over_and_removes_the_old_run(bad_rows_run, tmp_path):
    """Without --resume_from_checkpoint a run directory that holds a run is refused (tests above); with
    --overwrite_output_dir true the new run starts from scratch and nothing of the old one is left to mix with it."""
    from train.__main__ import main, parse_config

    _, done = bad_rows_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    (run / "checkpoint-9").mkdir()
    cfg = yaml.safe_load((done.parent / "run.yaml").read_text())
    cfg.update(output_dir=str(run), max_steps=2, save_steps=2)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(cfg))
    trainer = main(parse_config(["--config", str(tmp_path / "again.yaml"), "--overwrite_output_dir", "true"]))
    assert trainer.state.global_step == 2
    assert [d.name for d in ckpt_io.checkpoint_dirs(run)] == ["checkpoint-2"] and _marker(run) == "checkpoint-2"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "reward" in r] == [1, 2]


@needs_demo_base
def test_resuming_a_finished_run_trains_no_further_with_the_restricted_unpickler(bad_rows_run, tmp_path, monkeypatch):
    """A requeued job (or a restart loop) that resumes a run which already reached max_steps must not take another
    step: transformers would take one before it checks max_steps. The resume reads transformers' training-state files
    with ``torch.load(weights_only=True)`` only."""
    from train.__main__ import main, parse_config

    _, done = bad_rows_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    cfg = yaml.safe_load((done.parent / "run.yaml").read_text())
    cfg["output_dir"] = str(run)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(cfg))
    loaded = restricted_unpickling_only(monkeypatch)
    trainer = main(parse_config(["--config", str(tmp_path / "again.yaml"), "--resume_from_checkpoint", "latest"]))
    assert "optimizer.pt" in loaded and "rng_state.pth" not in loaded  # (RNG is read when a step follows)
    assert trainer.state.global_step == 1
    assert not (run / "checkpoint-2").exists() and _marker(run) == "checkpoint-1"
    saved = sv.load_vectors(run / "checkpoint-1")
    for layer, v in sv.get_vectors(trainer.model).items():
        assert torch.equal(v, saved[layer])
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "reward" in r] == [1], "a step was trained"


def test_bad_first_row_is_skipped_too(tmp_path):
    from steering.problems import load_problems

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "What is 1 + 1?"}] + GOOD_ROWS[:3]))
    problems = load_problems(str(data), answer_parser="gsm8k")
    assert problems.skipped == 1 and len(problems.rows) == 3


HOSTILE = [  # (completion, reward) for the ground truth 35
    ("\\boxed{9^{9^{9^{9}}}}", -1.0),                  # math-verify would never finish
    ("\\boxed{" * 100_000, -1.0),                      # unbalanced, deep
    ("y" * 1_000_000 + "\\boxed{35}", 1.0),            # huge, and right
    ("\\boxed{\\frac{1}{0}}", -1.0),
    ("\\boxed{" + "{}" * 50_000 + "}", -1.0),
    ("", -1.0),
    ("\x00\x1b[2J\\boxed{\ud800}", -1.0),             # control characters and a lone surrogate
    ("\\boxed{35}", 1.0),
]


@needs_demo_base
@pytest.mark.parametrize("where", ["training thread", "worker thread"])
def test_reward_inside_the_trainer_never_hangs_or_raises(bad_rows_run, where):
    trainer, _ = bad_rows_run
    timeout = trainer.args.reward_timeout
    inputs = [{"prompt": "p", "question": "What is 10 + 25?", "answer": "35"} for _ in HOSTILE]
    ids = [[1, 2, 3] for _ in HOSTILE]
    trainer.reward_fn.pop_stats()

    def call():  # as GRPOTrainer calls a reward function: prompts, completions, completion_ids and the columns
        start = time.monotonic()
        out = trainer.reward_fn(prompts=["p"] * len(HOSTILE), completions=[c for c, _ in HOSTILE], completion_ids=ids,
                                question=[x["question"] for x in inputs], answer=[x["answer"] for x in inputs],
                                trainer_state=trainer.state)
        return out, time.monotonic() - start

    if where == "worker thread":
        with ThreadPoolExecutor(1) as ex:
            out, elapsed = ex.submit(call).result(timeout=120)
    else:
        out, elapsed = call()
    assert out == [r for _, r in HOSTILE]
    # Each answer is checked within the reward's deadline (plus scheduling slack on a loaded machine).
    assert elapsed < len(HOSTILE) * timeout + 15, elapsed
    assert trainer.reward_fn.pop_stats()["reward/num"] == len(HOSTILE)


# ------------------------------------------------------------------------------------------------------------------
# NaN / Inf: stop with a message naming the step; the last good checkpoint stays intact and loadable
# ------------------------------------------------------------------------------------------------------------------


@needs_demo_base
@pytest.mark.parametrize("poison", ["loss", "gradient", "vector", "vector, logged rarely", "vector, before step"])
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(poison, tmp_path, monkeypatch, capsys):
    """Poison step 3 of a run that saves every step: ``python -m train`` prints one line naming step 3 and the
    last good checkpoint, exits 3, and checkpoint-2 (what `latest` names) loads, with the vectors of step 2."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    import train.__main__ as entry

    good: dict[int, dict[int, torch.Tensor]] = {}
    original = GRPOTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step == 2:  # the step being taken is step 3
            if poison == "loss":
                return loss * float("nan")
            if poison == "gradient":
                next(iter(sv.vector_parameters(self.model).values())).grad[..., 0] = float("inf")
        return loss

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if poison == "vector, before step" and state.global_step == 2:
                with torch.no_grad():
                    next(iter(sv.vector_parameters(model).values()))[..., 0] = float("inf")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            good[state.global_step] = sv.get_vectors(model)
            if poison in ("vector", "vector, logged rarely") and state.global_step == 3:
                with torch.no_grad():
                    next(iter(sv.vector_parameters(model).values()))[..., 0] = float("nan")

    build_trainer = entry.build_trainer

    def with_poison(*a, **k):
        trainer = build_trainer(*a, **k)
        trainer.add_callback(Poison())
        return trainer

    monkeypatch.setattr(GRPOTrainer, "training_step", training_step)
    monkeypatch.setattr(entry, "build_trainer", with_poison)
    # Logging rarely, the check before the save (not the one at each log line) must catch it.
    logging_steps = 50 if poison in ("vector, logged rarely", "vector, before step") else 1
    cfg = small_config(tmp_path, max_steps=5, logging_steps=logging_steps)
    rc = entry.cli(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]
    assert len(error_lines(err)) == 1, repr(err[-3000:])
    [line] = error_lines(err)
    assert "diverged" in line and "at step 3" in line and "non-finite" in line, line
    run = tmp_path / "run"
    assert line.endswith(f"last good checkpoint: {run / 'checkpoint-2'}"), line
    assert ckpt_io.resolve_resume("latest", str(run)) == str(run / "checkpoint-2")
    assert not (run / "checkpoint-3").exists()
    saved = sv.load_vectors(run / "checkpoint-2")
    for layer, v in good[2].items():
        assert torch.equal(saved[layer], v)
    optimizer = torch.load(run / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.isfinite(t).all() for s in optimizer.values() for t in s.values() if torch.is_tensor(t))
    model = sv.load_steered_model(run / "checkpoint-2", base=str(DEMO_BASE), dtype="float32")
    assert sorted(sv.get_vectors(model)) == sorted(saved)


# ------------------------------------------------------------------------------------------------------------------
# Kill anywhere (SIGKILL, also inside a save) and resume: the same vectors, optimizer state and data order
# ------------------------------------------------------------------------------------------------------------------

# Runs `python -m train` with two observation / fault-injection hooks, both driven by environment variables:
# REL_ORDER_LOG: append, per optimizer step, the questions of its batch and a digest of the sampled completions (read
#   off the reward function's arguments, as GRPOTrainer passes them);
# REL_KILL_PHASE / REL_KILL_STEP: SIGKILL this process at a precise point of the save of checkpoint-<step>:
#   "after_model" (the model files are written, the optimizer / RNG / trainer state and the manifest are not),
#   "before_marker" (the checkpoint is complete, with its manifest; `latest` still names the one before).
DRIVER = textwrap.dedent('''
    import hashlib, json, os, signal, sys, time
    import train.checkpointing as ck
    import train.trainer as tr
    from train.__main__ import cli

    LOG = os.environ.get("REL_ORDER_LOG")
    PHASE, STEP = os.environ.get("REL_KILL_PHASE"), int(os.environ.get("REL_KILL_STEP", "-1"))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    save_model = tr.SteeringGRPOTrainer.save_model
    def save_model_maybe_die(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if PHASE == "after_model" and os.path.basename(str(output_dir)) == f"checkpoint-{STEP}":
            die()
    tr.SteeringGRPOTrainer.save_model = save_model_maybe_die

    write_latest = ck.write_latest
    def write_latest_maybe_die(run_dir, ckpt):
        if PHASE == "before_marker" and ckpt.name == f"checkpoint-{STEP}":
            die()
        write_latest(run_dir, ckpt)
    ck.write_latest = write_latest_maybe_die

    # Resume exactness, not learning, is under test here: the real reward runs, plus a term that depends on the
    # completion's length, so that rewards vary and the vectors move whatever the base model writes.
    import steering.rewards as rw
    reward_call = rw.MathReward.__call__
    def shaped_reward(self, prompts, completions, **kwargs):
        if LOG:
            digest = hashlib.sha256(json.dumps([list(map(int, c)) for c in kwargs["completion_ids"]]).encode())
            with open(LOG, "a") as f:
                f.write(json.dumps({"step": kwargs["trainer_state"].global_step + 1, "pid": os.getpid(),
                                    "time": time.time(), "questions": list(kwargs["question"]),
                                    "completions": digest.hexdigest()}) + "\\n")
        rewards = reward_call(self, prompts, completions, **kwargs)
        return [r + 0.5 * (len(str(c)) % 2) for r, c in zip(rewards, completions)]
    rw.MathReward.__call__ = shaped_reward

    sys.exit(cli())
''')

KILL_STEPS = 7


def _spawn(driver, cfg, log_dir, tag, *, resume, env=None):
    args = [sys.executable, str(driver), "--config", str(cfg)] + (["--resume_from_checkpoint", "latest"] if resume else [])
    out = open(log_dir / f"{tag}.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env={**SUB_ENV, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def _finish(proc, timeout=240):
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        try:  # its reward workers, orphaned when it was killed (the process group is the one it was started in)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.log_file.close()


def _check_run_dir_invariants(run: Path) -> str | None:
    """What any kill must leave: `latest` absent or naming a complete checkpoint that verifies; every checkpoint with
    a manifest verifies (a directory without one is an interrupted save, never used). Returns what `latest` names."""
    for d in run.glob("checkpoint-*"):
        if ckpt_io.is_complete(d):
            ckpt_io.verify_checkpoint(d)
    if not (run / ckpt_io.LATEST).exists():
        return None
    return Path(ckpt_io.resolve_resume("latest", str(run))).name  # raises if the marker names anything broken


def _order(log: Path) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for rec in read_jsonl(log) if log.exists() else []:
        by_step.setdefault(rec["step"], []).append(rec)
    return by_step


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint: the steering vectors, the LoRA adapter or the full model."""
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (ckpt / name).is_file():
            return load_file(str(ckpt / name))
    raise AssertionError(f"no weights in {ckpt}")


def _newest_mtime(d: Path) -> float:
    """The newest file time under ``d``; 0.0 while ``d`` is absent or changes under the scan (a resumed run first
    removes an interrupted save, and a save renames its directory into place)."""
    try:
        return max((f.stat().st_mtime for f in d.rglob("*") if f.is_file()), default=0.0)
    except FileNotFoundError:
        return 0.0


# The learning rate each adapter trains the demo base with here (the test is about resuming, not learning).
KILL_LR = {"steering": 0.05, "lora": 0.01, "full": 0.001}


@needs_demo_base
@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["steering", "lora", "full"])
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, adapter):
    """One run killed six times — three times inside a save at fixed points, once from outside the moment the next
    save starts, twice after seeded random delays — and resumed with ``--resume_from_checkpoint latest`` each time,
    ends with the trained weights (steering vectors, LoRA adapter or full model), optimizer state, data order and
    sampled completions of a run never killed. Eight short processes: about 30 s on two cores."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    common = dict(max_steps=KILL_STEPS, save_steps=1, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                  val_size=4, val_steps=2, seed=7, adapter=adapter, learning_rate=KILL_LR[adapter])
    ref_cfg = small_config(tmp_path, "reference", **common)
    cfg = small_config(tmp_path, "killed", **common)
    ref_log, log = tmp_path / "reference-order.jsonl", tmp_path / "killed-order.jsonl"
    rng = random.Random(1234)

    ref = _spawn(driver, ref_cfg, tmp_path, "reference", resume=False, env={"REL_ORDER_LOG": str(ref_log)})
    assert _finish(ref) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    ref_order = _order(ref_log)
    assert sorted(ref_order) == list(range(1, KILL_STEPS + 1))
    # One train line per step in metrics.jsonl, also at the steps that validate (val_steps=2).
    ref_metrics = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    assert [r["step"] for r in ref_metrics if "reward" in r] == list(range(1, KILL_STEPS + 1))
    step_s = _median_step_seconds(ref_log)
    run = tmp_path / "killed"

    def segment(tag, phase=None, step=None, resume=True):
        env = {"REL_ORDER_LOG": str(log)}
        if phase:
            env.update(REL_KILL_PHASE=phase, REL_KILL_STEP=str(step))
        return _spawn(driver, cfg, tmp_path, tag, resume=resume, env=env)

    def killed(p, tag):
        assert _finish(p) == -signal.SIGKILL, (tmp_path / f"{tag}.log").read_text()[-3000:]
        return _check_run_dir_invariants(run)

    # 1. The first start (no --resume_from_checkpoint: there is nothing to resume yet), killed inside the save of
    #    checkpoint-2, after its model files and before its optimizer state and manifest.
    assert killed(segment("seg1", "after_model", 2, resume=False), "seg1") == "checkpoint-1"
    assert _weights(run / "checkpoint-2") and not ckpt_io.is_complete(run / "checkpoint-2")

    # 2. Killed once checkpoint-3 is complete (manifest written) but before `latest` names it: the marker decides.
    assert killed(segment("seg2", "before_marker", 3), "seg2") == "checkpoint-2"
    assert ckpt_io.is_complete(run / "checkpoint-3")
    assert ckpt_io.is_complete(run / "checkpoint-2"), "the interrupted save of step 2 was redone"

    # 3. Killed while step 3 is saved again into that complete directory: it is incomplete from the start of the redo.
    assert killed(segment("seg3", "after_model", 3), "seg3") == "checkpoint-2"
    assert (run / "checkpoint-3").is_dir() and not ckpt_io.is_complete(run / "checkpoint-3")

    # 4. Killed from outside the moment the next save starts (polling for its directory's new files; if the save is
    #    too quick to see, right after it).
    started = _newest_mtime(run / "checkpoint-3")
    p = segment("seg4")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if _newest_mtime(run / "checkpoint-3") > started or _marker(run) not in (None, "checkpoint-2"):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    killed(p, "seg4")
    assert [r["pid"] for r in read_jsonl(log)].count(p.pid) == 1, "segment 4 redoes step 3, then is killed"

    # 5, 6. Killed from outside after a seeded random delay of at most one step, once the segment has started
    #    stepping: at least three steps are left each time, so the kill normally lands inside one (possibly in its
    #    save). On a badly overloaded machine this process may be scheduled too late and the segment may finish
    #    first; then the next segments resume a finished run, which must not train any further. Either is fine.
    for tag in ("seg5", "seg6"):
        before = _marker(run)
        p = segment(tag)
        seen = log.read_text().count("\n")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None and log.read_text().count("\n") == seen:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, step_s))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        rc = _finish(p)
        assert rc in (-signal.SIGKILL, 0), (tmp_path / f"{tag}.log").read_text()[-3000:]
        assert _step_of(_check_run_dir_invariants(run)) >= _step_of(before)

    # 7. Resume to the end.
    p = segment("seg7")
    assert _finish(p) == 0, (tmp_path / "seg7.log").read_text()[-3000:]
    assert all(ckpt_io.is_complete(d) for d in run.glob("checkpoint-*")), "an interrupted save was never redone"

    # Same trained weights and optimizer state as the uninterrupted run.
    last = f"checkpoint-{KILL_STEPS}"
    assert _marker(run) == last
    ref_first, ref_last = _weights(tmp_path / "reference" / "checkpoint-1"), _weights(tmp_path / "reference" / last)
    assert any(not torch.equal(ref_last[k], ref_first[k]) for k in ref_last), "nothing moved: the check is vacuous"
    for weights in (_weights(run / last), _weights(run / "final")):
        assert weights.keys() == ref_last.keys()
        for k in ref_last:
            torch.testing.assert_close(weights[k], ref_last[k], rtol=1e-5, atol=1e-6)
    a = torch.load(tmp_path / "reference" / last / "optimizer.pt", weights_only=True)["state"]
    b = torch.load(run / last / "optimizer.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and a
    for i in a:
        for k in a[i]:
            torch.testing.assert_close(b[i][k], a[i][k], rtol=1e-5, atol=1e-7)
    assert (json.loads((run / last / ckpt_io.TRAINER_STATE).read_text())["global_step"] == KILL_STEPS)
    # Same data order and the same samples, for every step any segment took (steps lost to a kill were redone).
    order = _order(log)
    assert sorted(order) == list(range(1, KILL_STEPS + 1))
    for step, records in order.items():
        for rec in records:
            assert rec["questions"] == ref_order[step][0]["questions"], f"step {step}: different prompts"
            assert rec["completions"] == ref_order[step][0]["completions"], f"step {step}: different samples"
    assert len({r["pid"] for rs in order.values() for r in rs}) >= 4, "segments 1-4 each train a step"
    # metrics.jsonl keeps the lines of lost steps and logs redone steps again: every step is there.
    assert {r["step"] for r in read_jsonl(run / "metrics.jsonl") if "reward" in r} == set(range(1, KILL_STEPS + 1))


def _marker(run: Path) -> str | None:
    marker = run / ckpt_io.LATEST
    return json.loads(marker.read_text())["checkpoint"] if marker.is_file() else None


def _step_of(name: str | None) -> int:
    return int(name.rsplit("-", 1)[1]) if name else 0


def _median_step_seconds(order_log: Path) -> float:
    times = [r["time"] for r in read_jsonl(order_log)]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2] if gaps else 2.0


# ------------------------------------------------------------------------------------------------------------------
# Two processes: identical vectors after every step; only rank 0 writes checkpoints and talks to W&B
# ------------------------------------------------------------------------------------------------------------------

DDP_DRIVER = textwrap.dedent('''
    import json, os, sys
    import steering.vectors as sv
    import train.checkpointing as ck
    LOG = os.environ["REL_WRITES_LOG"]
    RANK = os.environ.get("RANK", "?")

    def record(what):
        with open(LOG, "a") as f:
            f.write(json.dumps({"rank": RANK, "what": what}) + "\\n")

    write_meta = sv.write_meta
    def logged_meta(out_dir, *a, **k):
        record(f"steering.json {os.path.basename(str(out_dir))}")
        return write_meta(out_dir, *a, **k)
    sv.write_meta = logged_meta
    write_manifest = ck.write_manifest
    def logged_manifest(ckpt):
        record(f"manifest {ckpt.name}")
        return write_manifest(ckpt)
    ck.write_manifest = logged_manifest
    write_latest = ck.write_latest
    def logged_latest(run_dir, ckpt):
        record(f"latest {ckpt.name}")
        return write_latest(run_dir, ckpt)
    ck.write_latest = logged_latest
    import wandb
    init = wandb.init
    def logged_init(*a, **k):
        record("wandb.init")
        return init(*a, **k)
    wandb.init = logged_init

    # Resume exactness, not learning, is under test here: the real reward runs, plus a term that depends on the
    # completion's length, so that rewards vary and the vectors move whatever the base model writes.
    import steering.rewards as rw
    reward_call = rw.MathReward.__call__
    def shaped_reward(self, prompts, completions, **kwargs):
        rewards = reward_call(self, prompts, completions, **kwargs)
        return [r + 0.5 * (len(str(c)) % 2) for r, c in zip(rewards, completions)]
    rw.MathReward.__call__ = shaped_reward

    from train.__main__ import cli
    sys.exit(cli())
''')


@needs_demo_base
@pytest.mark.slow
def test_two_processes_identical_vectors_every_step_and_rank0_writes(tmp_path):
    pytest.importorskip("wandb")
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    writes = tmp_path / "writes.jsonl"
    cfg = small_config(tmp_path, "ddp", max_steps=3, per_device_train_batch_size=4, report_to="wandb",
                       run_name="reliability")
    env = {**SUB_ENV, "REL_WRITES_LOG": str(writes), "WANDB_MODE": "disabled", "WANDB_DIR": str(tmp_path)}
    # `--multi_gpu` is accelerate's torchrun launcher; the run config's `use_cpu: true` makes it DDP on CPU (gloo).
    # (`--cpu --num_processes 2` would start a single process: accelerate's simple launcher ignores num_processes.)
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(driver), "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ddp"
    train_rows = [row for row in read_jsonl(run / "metrics.jsonl") if "reward" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3], "one metrics line per step, from rank 0 only"
    assert all("vector_rank_max_abs_diff" in row for row in train_rows), "not two processes"
    assert all(row["vector_rank_max_abs_diff"] == 0.0 for row in train_rows), train_rows
    records = read_jsonl(writes)
    assert {rec["rank"] for rec in records} == {"0"}, records
    assert [rec["what"] for rec in records if rec["what"].startswith("latest")] == \
        [f"latest checkpoint-{s}" for s in (1, 2, 3)]
    assert [rec["what"] for rec in records if rec["what"].startswith("manifest")] == \
        [f"manifest checkpoint-{s}" for s in (1, 2, 3)]
    assert [rec["what"] for rec in records].count("wandb.init") == 1
    for s in (1, 2, 3):
        ckpt_io.verify_checkpoint(run / f"checkpoint-{s}")
    assert any(v.abs().max() > 0 for v in sv.load_vectors(run / "checkpoint-3").values()), "vacuous: nothing moved"
    assert (run / "checkpoint-3" / "rng_state_0.pth").is_file() and (run / "checkpoint-3" / "rng_state_1.pth").is_file()
