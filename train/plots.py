"""``training_curves.png``: reward, accuracy, completion length and per-layer vector norms over steps."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write; the rest of the file is still good
    return rows


def plot_training_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval_accuracy" in r and r.get("event") != "final"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["reward"] for r in train], marker=".")
    ax.set_title("mean reward (train rollouts)")
    ax = axes[0, 1]
    ax.plot([r["step"] for r in train], [r.get("accuracy") for r in train], marker=".", label="train rollouts")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], marker="o", label="held-out")
    base = [r["base_eval_accuracy"] for r in rows if r.get("base_eval_accuracy") is not None]
    if base:
        ax.axhline(base[0], color="gray", ls="--", label="base (held-out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot([r["step"] for r in train], [r.get("completion_length") for r in train], marker=".")
    ax.set_title("mean completion length (tokens)")
    ax = axes[1, 1]
    layers = sorted({int(k.split("/")[1]) for r in train for k in r if k.startswith("vector_norm/")})
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        ax.plot([r["step"] for r in train], [r.get(f"vector_norm/{layer}") for r in train],
                color=cmap(i / max(1, len(layers) - 1)), label=str(layer) if len(layers) <= 12 else None)
    ax.set_title("steering vector norm per layer")
    if 0 < len(layers) <= 12:
        ax.legend(fontsize=7, ncol=2, title="layer")
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
