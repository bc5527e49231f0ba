"""Every analysis command on the offline demo checkpoint, when one exists (skipped otherwise).

The demo checkpoint is ``assets/demo-checkpoint`` (committed; made by ``python -m train --config configs/demo.yaml``). The problems are
the demo's own procedural task (recorded in the checkpoint), 16 of them, so each command takes seconds on CPU.
"""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo-checkpoint"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DEMO / "steering.json").is_file(), reason=f"no demo checkpoint at {DEMO}")]

COMMANDS = [
    ["logit-lens"], ["persistence"], ["unembed-similarity"], ["first-token", "--layers", "all"],
    ["path-patching", "--no-heads"], ["compose"], ["transfer"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_command_on_demo_checkpoint(command, tmp_path):
    from analysis.__main__ import main
    from steering import vectors as sv

    meta = sv.read_meta(DEMO)
    if command[0] in ("persistence", "unembed-similarity", "compose") and len(meta["layers"]) < 2:
        pytest.skip("needs a checkpoint with at least two steered layers")
    if command[0] == "path-patching" and meta["num_hidden_layers"] - 2 not in meta["layers"]:
        pytest.skip("the demo checkpoint has no vector at layer L-2")
    if command[0] == "first-token" and len(meta["layers"]) == 1:
        command = ["first-token"]
    out = tmp_path / command[0]
    assert main([*command, "--checkpoint", str(DEMO), "--out", str(out), "--limit", "16", "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["command"] == command[0]
    for name in result["plots"]:
        assert (out / name).stat().st_size > 1000
