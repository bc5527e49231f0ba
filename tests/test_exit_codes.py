"""Exit codes of the entry points: every error class of the project is one line and exit code 2 in ``python -m train``
and ``python -m analysis`` (or is listed below with the reason it is not); anything unexpected stays a traceback."""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

from steering.errors import INPUT_ERRORS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("steering", "train", "analysis")

# Error classes that are not input errors, and why; each is named with its module.
NOT_INPUT_ERRORS = {
    # the entry points' own usage errors, caught next to INPUT_ERRORS by their entry point (tested below)
    "train.config.ConfigError": "python -m train: exit 2",
    "analysis.cli.UsageError": "python -m analysis: exit 2",
    # a run that stopped: exit 3 and stopped.json (tests/test_restart_loop.py, tests/test_reliability.py)
    "train.trainer.TrainingDiverged": "python -m train: exit 3",
    "train.trainer.VLLMMismatch": "python -m train: exit 3",
    # control flow, caught where raised
    "train.trainer.RunAlreadyFinished": "caught by train.__main__.main: a finished run is validated, not trained",
    "steering.problems._BadRow": "private: a bad data row, skipped and counted by steering.problems",
    "steering.deadline_pool._WorkerDeadline": "private: a grading worker interrupting itself at its deadline",
}


def project_error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in the three packages, found by scanning the source (a class whose base is a
    builtin exception or another such class, by name), then imported."""
    defined: dict[str, tuple[str, list[str]]] = {}  # class name -> (module, base names)
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            module = f"{package}.{path.stem}"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
                    defined[node.name] = (module, bases)

    def is_builtin_exception(name: str) -> bool:
        return isinstance(getattr(builtins, name, None), type) and issubclass(getattr(builtins, name), BaseException)

    errors: set[str] = set()
    grown = True
    while grown:
        before = len(errors)
        errors |= {name for name, (_, bases) in defined.items()
                   if any(is_builtin_exception(b) or b in errors for b in bases)}
        grown = len(errors) > before
    found = {}
    for name in errors:
        module = defined[name][0]
        found[f"{module}.{name}"] = getattr(importlib.import_module(module), name)
    return found


def test_every_error_class_of_the_project_is_an_input_error_or_listed_with_its_reason():
    found = project_error_classes()
    assert len(found) >= 18, sorted(found)  # the scan finds them (18 when this test was written)
    missing = sorted(name for name, cls in found.items()
                     if not issubclass(cls, INPUT_ERRORS) and name not in NOT_INPUT_ERRORS)
    assert missing == [], "add them to steering.errors.INPUT_ERRORS, or to NOT_INPUT_ERRORS with the reason"
    assert sorted(set(NOT_INPUT_ERRORS) - set(found)) == [], "listed classes that no longer exist"
    assert not [n for n in NOT_INPUT_ERRORS if issubclass(found[n], INPUT_ERRORS)], "listed twice"


def _raiser(exc: BaseException):
    def run(*a, **k):
        raise exc
    return run


@pytest.mark.parametrize("error", [*INPUT_ERRORS, "UsageError"], ids=lambda e: getattr(e, "__name__", e))
def test_analysis_prints_every_input_error_as_one_line_exit_2(error, monkeypatch, capsys, tmp_path):
    import analysis.compare
    from analysis.__main__ import main
    from analysis.cli import UsageError

    error = UsageError if error == "UsageError" else error
    monkeypatch.setattr(analysis.compare, "run", _raiser(error("what to fix")))
    rc = main(["compare", "a", "b", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert capsys.readouterr().err == "python -m analysis compare: error: what to fix\n"


@pytest.mark.parametrize("error", [RuntimeError, KeyError, TypeError])
def test_analysis_lets_an_unexpected_exception_through_as_a_traceback(error, monkeypatch, tmp_path):
    import analysis.compare
    from analysis.__main__ import main

    monkeypatch.setattr(analysis.compare, "run", _raiser(error("a bug")))
    with pytest.raises(error, match="a bug"):  # uncaught: Python prints the traceback and exits 1
        main(["compare", "a", "b", "--out", str(tmp_path / "out")])


def _train_cli_with(monkeypatch, tmp_path, exc: BaseException) -> int:
    """``python -m train`` whose training (after the checks passed) raises ``exc``."""
    import train.__main__ as entry

    monkeypatch.setattr(entry, "prepare_inputs", lambda config: None)
    monkeypatch.setattr(entry, "main", _raiser(exc))
    return entry.cli(["--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(tmp_path / "run"),
                      "--disable_tqdm", "true"])


@pytest.mark.parametrize("error", [*INPUT_ERRORS, "ConfigError"], ids=lambda e: getattr(e, "__name__", e))
def test_train_prints_an_input_error_raised_during_training_as_one_line_exit_2(error, monkeypatch, capsys, tmp_path):
    from train.config import ConfigError

    error = ConfigError if error == "ConfigError" else error
    assert _train_cli_with(monkeypatch, tmp_path, error("what to fix")) == 2
    assert capsys.readouterr().err == "python -m train: error: what to fix\n"


@pytest.mark.parametrize("error", [RuntimeError, KeyError, TypeError])
def test_train_lets_an_unexpected_exception_through_as_a_traceback(error, monkeypatch, tmp_path):
    with pytest.raises(error, match="a bug"):
        _train_cli_with(monkeypatch, tmp_path, error("a bug"))
