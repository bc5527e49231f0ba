"""Every entry point's ``--help`` works and explains: a new user's first command must never crash (argparse formats
help strings with %, so one stray "3%" in a help text breaks it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["train", "analysis", "train.benchmark", "train.demo_base"]


def _analysis_commands() -> list[str]:
    """Every command and sub-command (``layer-ablation make``) of ``python -m analysis``."""
    import argparse

    from analysis.__main__ import build_parser

    def walk(parser, prefix):
        out = []
        for action in parser._actions:  # argparse has no public list of sub-parsers
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in sorted(action.choices.items()):
                    out += [f"{prefix}{name}"] + walk(sub, f"{prefix}{name} ")
        return out

    return walk(build_parser(), "")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_point_help_as_a_user_runs_it(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)}
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("usage: python -m " + module), r.stdout[:200]
    assert "Traceback" not in r.stderr and len(r.stdout.splitlines()) > 5


def test_train_help_lists_our_keys_and_trls():
    import contextlib
    import io

    from train.__main__ import cli as main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--help"]) == 0
    text = out.getvalue()
    for key in ("--preset", "3% warmup", "--layers", "--learning_rate", "--num_generations", "--loss_type"):
        assert key in text, key


@pytest.mark.parametrize("command", _analysis_commands())
def test_every_analysis_command_has_help(command, capsys):
    from analysis.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(command.split() + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m analysis {command}") and "--help" in text
