"""docs/architecture.md's map of the tree names every module of the three packages, and nothing that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


MAP = (ROOT / "docs" / "architecture.md").read_text()
STEERING, TRAIN, ANALYSIS = "## The tree at a glance", "`train/` is the run", "`analysis/` is one file per command"


def named_between(start: str, end: str | None) -> set[str]:
    """The `names` the map writes between two of its landmarks (to the end when ``end`` is None)."""
    section = MAP[MAP.index(start):]
    return set(re.findall(r"`([a-z_]+)`", section[:section.index(end)] if end else section))


def modules_of(package: str) -> set[str]:
    return {p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}


def test_the_map_names_every_steering_module_and_no_missing_one():
    named, modules = named_between(STEERING, TRAIN), modules_of("steering")
    assert modules - named == set(), "modules missing from the map"
    assert named - modules == set(), "the map names modules that do not exist"
    assert f"`steering/` holds {len(modules)} modules" in MAP


def test_the_map_names_every_train_module():
    assert modules_of("train") - named_between(TRAIN, ANALYSIS) == set()


def test_the_map_names_every_analysis_module_that_is_not_a_command():
    not_commands = {m for m in modules_of("analysis") - {"__main__"}
                    if "def register(" not in (ROOT / "analysis" / f"{m}.py").read_text()}
    assert not_commands - named_between(ANALYSIS, None) == set()


def test_the_core_package_never_sees_a_command_line():
    """``steering/`` is a library: no argparse, no Namespace, no ``args.`` (the commands turn flags into values)."""
    offenders = [f"{p.name}:{i}" for p in sorted((ROOT / "steering").glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"argparse|args\.", line)]
    assert offenders == []
