"""docs/architecture.md's map of the tree names every module of the three packages, and nothing that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_map_names_every_steering_module_and_no_missing_one():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## The tree at a glance"):]
    table = section[:section.index("`train/` is the run")]
    named = set(re.findall(r"`([a-z_]+)`", table))
    modules = {p.stem for p in (ROOT / "steering").glob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), "modules missing from the map"
    assert named - modules == set(), "the map names modules that do not exist"
    assert f"`steering/` holds {len(modules)} modules" in text


def test_the_map_names_every_train_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("`train/` is the run"):]
    paragraph = section[:section.index("`analysis/` is one file per command")]
    named = set(re.findall(r"`([a-z_]+)`", paragraph))
    modules = {p.stem for p in (ROOT / "train").glob("*.py") if p.stem != "__init__"}
    assert modules - named == set()


def test_the_map_names_every_analysis_module_that_is_not_a_command():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paragraph = text[text.index("`analysis/` is one file per command"):]
    named = set(re.findall(r"`([a-z_]+)`", paragraph))
    not_commands = {p.stem for p in (ROOT / "analysis").glob("*.py")
                    if p.stem not in ("__init__", "__main__") and "def register(" not in p.read_text()}
    assert not_commands - named == set()


def test_the_core_package_never_sees_a_command_line():
    """``steering/`` is a library: no argparse, no Namespace, no ``args.`` (the commands turn flags into values)."""
    offenders = [f"{p.name}:{i}" for p in sorted((ROOT / "steering").glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"argparse|args\.", line)]
    assert offenders == []
