"""``python -m analysis <command> …``: every module in this package that defines ``register(subparsers)`` is a command.

Exit codes: 0 done; 2 bad input, one line on stderr (a usage error, or any of ``steering.errors.INPUT_ERRORS``);
1 with a traceback for anything unexpected (a bug stays visible).

Each command lives in one file and registers its own sub-parser; this entry point only collects them.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import analysis
from analysis import output
from analysis.cli import UsageError
from steering.errors import INPUT_ERRORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Evaluate steering-vector checkpoints and run the mechanistic analyses of 'Small Vectors, Big "
        "Effects'. Every command writes OUT/result.json (or results.json for evaluate) and PNG plots.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for info in sorted(pkgutil.iter_modules(analysis.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "cli":
            continue
        module = importlib.import_module(f"analysis.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, *INPUT_ERRORS) as e:  # bad input: one line; anything else stays a traceback (exit 1)
        print(f"python -m analysis {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:  # however the command ended (an error, a bug, Ctrl-C): an output it did not complete never replaces OUT
        output.discard_unfinished()


if __name__ == "__main__":
    from steering import compat

    compat.ignore_third_party_deprecations()  # raised inside PEFT / TRL, not by our calls; the user can do nothing
    sys.exit(main())
