"""``training_curves.png``: reward, accuracy, completion length and per-layer vector norms over steps."""

from __future__ import annotations

from pathlib import Path

from train.checkpointing import read_metrics


def plot_training_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = read_metrics(metrics_path)  # a line cut by a crash is left out
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


# ----------------------------------------------------------------------------------------------------------------------
# Probes (train/probes.py): one PNG per family


def plot_probes(metrics_path: str | Path, out_dir: str | Path, *, last_layers: int = 2, tokens: int = 6) -> list[Path]:
    """``probes_vectors.png`` (layer × step heatmaps: norm, cosine to the start, cosine to the previous probe),
    ``probes_references.png`` (cosine to ``probe_vectors`` over steps, when given) and ``probes_tokens.png`` (the lens
    top tokens of the last ``last_layers`` layers and the top gained first tokens, per probe)."""
    import matplotlib

    matplotlib.use("Agg")
    probes = [r for r in read_metrics(metrics_path)[0] if r.get("event") == "probe"]
    if not probes:
        return []
    out_dir = Path(out_dir)
    steps = [r["step"] for r in probes]
    layers = sorted({int(k.rsplit("/", 1)[1]) for k in probes[0] if k.startswith("probe/norm/")})
    files = [_probe_heatmaps(out_dir / "probes_vectors.png", probes, steps, layers)]
    if any(k.startswith("probe/cos_ref/") for k in probes[0]):
        files.append(_probe_references(out_dir / "probes_references.png", probes, steps, layers))
    n = len(probes[0]["lens"])
    grids = [(f"logit lens of the layer-{probes[0]['lens'][i]['layer']} vector: top tokens",
              [[_show(t["token"]) for t in r["lens"][i]["top"][:tokens]] for r in probes])
             for i in range(max(0, n - last_layers), n)]
    grids.append(("first token: most gained over the base", [[f"{_show(t['token'])} {t['gain']:+.3f}" for t in
                                                              r["first_token"]["top_gained"][:tokens]] for r in probes]))
    files.append(_token_grids(out_dir / "probes_tokens.png", steps, grids))
    return files


def _grid(probes: list[dict], key: str, layers: list[int]):
    import numpy as np

    return np.array([[np.nan if r.get(f"{key}/{l}") is None else r[f"{key}/{l}"] for r in probes] for l in layers],
                    dtype=float)


def _probe_heatmaps(path: Path, probes: list[dict], steps: list[int], layers: list[int]) -> Path:
    import matplotlib.pyplot as plt

    panels = (("probe/norm", "vector norm", "viridis", None), ("probe/cos_start", "cosine to the start", "RdBu_r",
              (-1, 1)), ("probe/cos_prev", "cosine to the previous probe", "RdBu_r", (-1, 1)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.6 + 0.22 * len(layers)), squeeze=False)
    for ax, (key, title, cmap, lim) in zip(axes[0], panels):
        im = ax.imshow(_grid(probes, key, layers), aspect="auto", cmap=cmap, origin="lower", interpolation="nearest",
                       vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
        ax.set_xlabel("step")
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0, 0].set_ylabel("layer")
    return _save(fig, path)


def _probe_references(path: Path, probes: list[dict], steps: list[int], layers: list[int]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    grid = _grid(probes, "probe/cos_ref", layers)
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        ax.plot(steps, grid[i], marker=".", color=cmap(i / max(1, len(layers) - 1)),
                label=str(layer) if len(layers) <= 12 else None)
    if len(layers) <= 12:
        ax.legend(fontsize=7, ncol=2, title="layer")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("cosine of each layer's vector to the reference (probe_vectors)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _token_grids(path: Path, steps: list[int], grids: list[tuple[str, list[list[str]]]]) -> Path:
    """One text table per grid: a row per probe step, a column per rank."""
    import matplotlib.pyplot as plt

    cols = max(len(row) for _, rows in grids for row in rows)
    fig, axes = plt.subplots(len(grids), 1, figsize=(1.5 * cols + 1, (0.28 * len(steps) + 0.6) * len(grids)),
                             squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], grids):
        ax.set_xlim(-0.5, cols - 0.5)
        ax.set_ylim(len(steps) - 0.5, -0.5)
        for y, row in enumerate(rows):
            for x, text in enumerate(row):
                ax.text(x, y, text, ha="center", va="center", fontsize=8, family="monospace")
        ax.set_yticks(range(len(steps)), [f"step {s}" for s in steps], fontsize=7)
        ax.set_xticks(range(cols), [f"#{i + 1}" for i in range(cols)], fontsize=7)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.2)
    return _save(fig, path)


def _show(token: str) -> str:
    """A token as text a figure can show: whitespace visible, no mathtext."""
    return token.replace("\n", "\\n").replace(" ", "·").replace("$", r"\$")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
