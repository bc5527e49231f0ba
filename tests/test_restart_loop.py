"""The restart loop of docs/reliability.md ("Running on preemptible nodes"), run as written with bash and the real
``accelerate launch``: it stops on bad input and on a diverged run, and ends after a clean one. Also: the preflight
(``python -m train --check``) loads no weights and writes nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import spy_on_weight_loaders
from test_reliability import SUB_ENV, needs_demo_base, no_unpickling, small_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


def loop_script() -> str:
    """The bash block of the section "Running on preemptible nodes" (the one with the restart loop)."""
    section = DOC.read_text().split("### Running on preemptible nodes", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    [loop] = [b for b in blocks if "while true" in b]
    return "\n".join(line.removeprefix("  ") for line in loop.splitlines())


def run_loop(tmp_path: Path, name: str, **overrides) -> tuple[int, int, str]:
    """The loop on small_config(name, **overrides) in place of my.yaml / runs/my, without the pause; returns its exit
    code, the number of ``accelerate launch`` calls, and its stderr."""
    cfg = small_config(tmp_path, name, **overrides)
    script = loop_script()
    for doc, here in (("my.yaml", str(cfg)), ("runs/my", str(tmp_path / name)), ("sleep 30", "sleep 0")):
        assert doc in script, doc
        script = script.replace(doc, here)
    bin_dir = tmp_path / f"bin-{name}"
    bin_dir.mkdir()
    launches = tmp_path / f"launches-{name}"
    real = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    (bin_dir / "accelerate").write_text(f'#!/bin/bash\necho "$*" >> {launches}\nexec {real} "$@"\n')
    (bin_dir / "accelerate").chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')  # this venv's, as `python`
    (bin_dir / "python").chmod(0o755)
    env = {**SUB_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ACCELERATE_USE_CPU": "true"}
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    n = len(launches.read_text().splitlines()) if launches.exists() else 0
    return r.returncode, n, r.stderr


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("python -m train: error:")]


@needs_demo_base
def test_the_loop_stops_on_bad_input_before_any_launch(tmp_path):
    rc, launches, err = run_loop(tmp_path, "bad", learning_rate=-1)
    assert (rc, launches) == (2, 0), err[-3000:]
    assert error_lines(err) == ["python -m train: error: learning_rate: -1 must be a finite number > 0"]
    assert not (tmp_path / "bad").exists()


@needs_demo_base
def test_the_loop_stops_after_one_launch_when_the_run_diverges(tmp_path):
    # No reward varies over such short completions, so every gradient is exactly 0, and Adam without its epsilon
    # divides 0 by 0: the vectors are NaN after step 1.
    rc, launches, err = run_loop(tmp_path, "div", adam_epsilon=0.0)
    assert (rc, launches) == (2, 1), err[-3000:]
    assert "CalledProcessError" in err  # accelerate turned the child's exit code 3 into its own 1
    *diverged, refused = error_lines(err)  # accelerate prints its child's stderr a second time in its traceback
    assert len(set(diverged)) == 1, diverged
    [diverged] = set(diverged)
    assert diverged.startswith("python -m train: error: training diverged: non-finite values"), diverged
    assert refused.startswith(f"python -m train: error: output_dir: {tmp_path / 'div'} holds a run that stopped with "
                              "exit code 3 (training diverged: "), refused
    assert "--overwrite_output_dir true" in refused
    assert not (tmp_path / "div" / "latest").exists()  # no good checkpoint: the loop tried a new run, refused too
    assert (tmp_path / "div" / "stopped.json").is_file()


@needs_demo_base
def test_the_loop_ends_after_a_clean_run(tmp_path):
    rc, launches, err = run_loop(tmp_path, "ok")
    assert (rc, launches) == (0, 1), err[-3000:]
    assert (tmp_path / "ok" / "final").is_dir() and not (tmp_path / "ok" / "stopped.json").exists()


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@needs_demo_base
def test_check_loads_no_weights_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """``--check`` on a finished run (resume latest: 0; a new run on top: 2) and on a diverged one (2): nothing in
    output_dir changes, no weights load, nothing is unpickled."""
    import train.__main__ as entry
    from train import checkpointing as ckpt_io

    cfg = small_config(tmp_path, "run", max_steps=1)
    assert entry.cli(["--config", str(cfg)]) == 0
    run = tmp_path / "run"

    def forbidden(*a, **k):
        raise AssertionError("the trainer was built")

    loads = spy_on_weight_loaders(monkeypatch)
    monkeypatch.setattr(entry, "build_trainer", forbidden)
    no_unpickling(monkeypatch)
    before = _tree(run)
    capsys.readouterr()
    assert entry.cli(["--config", str(cfg), "--resume_from_checkpoint", "latest", "--check"]) == 0
    assert capsys.readouterr().err == ""
    assert entry.cli(["--config", str(cfg), "--check"]) == 2
    assert "already holds a run's checkpoints" in capsys.readouterr().err
    assert _tree(run) == before
    fresh = tmp_path / "fresh"
    assert entry.cli(["--config", str(cfg), "--output_dir", str(fresh), "--check"]) == 0
    assert not fresh.exists()

    ckpt_io.write_stopped(run, error="training diverged: test", step=1, last_good=ckpt_io.read_latest(run))
    before = _tree(run)
    assert entry.cli(["--config", str(cfg), "--resume_from_checkpoint", "latest", "--check"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"python -m train: error: output_dir: {run} holds a run that stopped with exit code 3 (training "
                    f"diverged: test), which a resume would repeat; start a new run in another output_dir from its "
                    f"last good vectors (--init_from {run / 'checkpoint-1'}) with a lower learning_rate or "
                    f"max_grad_norm, or start over here with --overwrite_output_dir true (or, once the cause is fixed, "
                    f"delete {run / 'stopped.json'} and resume)")
    assert _tree(run) == before and loads == []


def test_overwrite_output_dir_removes_the_stopped_marker(tmp_path):
    from train import checkpointing as ckpt_io

    run = tmp_path / "run"
    run.mkdir()
    ckpt_io.write_stopped(run, error="training diverged: test", step=1, last_good=None)
    ckpt_io.check_not_stopped(run, overwrite=True)  # allowed: the run is deleted
    ckpt_io.prepare_run_dir(run, overwrite=True, metrics_file="metrics.jsonl")
    assert not (run / ckpt_io.STOPPED).exists()
    ckpt_io.check_not_stopped(run, overwrite=False)


def test_the_documented_loop_preflights_with_plain_python_before_each_launch():
    lines = [line.strip() for line in loop_script().splitlines()]
    check = next(i for i, line in enumerate(lines) if "--check" in line)
    launch = next(i for i, line in enumerate(lines) if line.startswith("accelerate launch"))
    assert lines[check].startswith("python -m train --config my.yaml $resume --check || exit $?")
    assert check < launch
