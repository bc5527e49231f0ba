"""pyproject.toml declares exactly the tested range: every lower bound is the version CI's "lowest" leg installs, and
the locked set the README installs lies inside the declared range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Declared for the GPU image (torch 2.11), but CI only has the 2.13 CPU wheel: the lowest leg runs 2.13.
UNTESTABLE_LOWER_BOUNDS = {"torch"}


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pkg, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
            out[canonicalize_name(pkg)] = version
    return out


def _lower_bound(req: Requirement) -> str:
    [bound] = [s.version for s in req.specifier if s.operator == ">="]
    return bound


def test_lower_bounds_are_the_lowest_leg():
    lowest = _pins("lowest.txt")
    for name, req in _declared().items():
        assert name in lowest, f"{name} is declared but not pinned in constraints/lowest.txt"
        if name in UNTESTABLE_LOWER_BOUNDS:
            continue
        bound, pinned = _lower_bound(req), lowest[name]
        assert [int(x) for x in pinned.split(".")][: len(bound.split("."))] == [int(x) for x in bound.split(".")] \
            and req.specifier.contains(pinned), f"{name}: pyproject says >={bound}, the lowest leg installs {pinned}"
    assert set(lowest) == set(_declared()), "constraints/lowest.txt pins something pyproject.toml does not declare"


def test_locked_set_is_inside_the_declared_range():
    locked = _pins("locked.txt")
    for name, req in _declared().items():
        assert name in locked, f"{name} is missing from constraints/locked.txt"
        assert req.specifier.contains(locked[name]), f"{name}=={locked[name]} is outside {req}"
