"""The offline demo learns: `python -m train --config configs/demo.yaml` lifts held-out accuracy by >= 10 points."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_learns(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "train", "--config", "configs/demo.yaml", "--output_dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    final = [r for r in rows if r.get("event") == "final"][-1]
    base, steered = final["base_eval_accuracy"], final["eval_accuracy"]
    print(f"demo: base {base:.3f} -> steered {steered:.3f}")
    assert steered - base >= 0.10, (base, steered)
    # the printed summary is the same pair of numbers, on the same held-out problems
    assert f"base {100 * base:.1f}% -> trained {100 * steered:.1f}%" in r.stdout
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "final" / "adapter_model.safetensors").is_file()
