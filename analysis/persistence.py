"""``python -m analysis persistence``: how the shift caused by one layer's vector persists through later layers.

Steer only layer ``i`` (its vector from the checkpoint, every other vector off). On the same prompt+completion tokens
(sampled once, with the whole checkpoint steering), take each later layer ``j``'s output minus the unsteered one::

    Δ_j(t) = resid_post_j(steered at i only) − resid_post_j(unsteered)        for j >= i

and report, averaged over tokens ``t``:

- ``cos_to_vector[i][j]`` = mean_t cos(Δ_j(t), s_j), with ``s_j`` the checkpoint's vector at ``j`` (null if it has
  none). For ``j = i``, Δ_i(t) = s_i at every token, so the diagonal is 1 (up to float rounding).
- ``cos_to_mean[i][j]`` = mean_t cos(Δ_j(t), mean_t' Δ_j(t')): how consistent the shift is across tokens.
- ``delta_norm[i][j]`` = mean_t ‖Δ_j(t)‖, and ``mean_shift_cos_to_vector[i][j]`` = cos(mean_t Δ_j, s_j).

The paper's finding: the shift stays consistent across tokens (high ``cos_to_mean``) but is not aligned with the later
layers' own vectors (low ``cos_to_vector`` off the diagonal). Means are exact and one-pass:
mean_t cos(Δ(t), m) = (Σ_t Δ(t)/‖Δ(t)‖) · m/‖m‖ / T.

result.json::

    {"command": "persistence", "checkpoint", "base_model", "steer_layers": [i...], "target_layers": [0..L-1],
     "cos_to_vector": [[...L] per i], "cos_to_mean": [...], "delta_norm": [...], "mean_shift_cos_to_vector": [...],
     # rows follow steer_layers, columns target_layers; null where j < i (or no s_j)
     "vector_norms": {layer: norm}, "num_sequences", "num_tokens", "positions", "completions_from", "settings",
     "plots"}

Plots: ``cos_to_vector.png`` and ``cos_to_mean.png`` (heatmaps over (i, j)), ``persistence_curves.png`` (one curve per
steering layer i over target layers j, as in the paper's Figure 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from analysis import _common
from analysis import plots
from analysis import cli, output, settings
from steering import hooks
from steering.generation import pad_id_of
from steering.readout import cosine


@dataclass
class ShiftStats:
    """Running sums for one (steering layer i, target layer j) over tokens."""

    sum_delta: torch.Tensor  # Σ Δ(t)             (d,) fp64
    sum_unit: torch.Tensor  # Σ Δ(t)/‖Δ(t)‖      (d,) fp64
    sum_norm: float = 0.0
    count: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.sum_delta / max(self.count, 1)

    def mean_cos_to(self, direction: torch.Tensor) -> float:
        """mean_t cos(Δ(t), direction)."""
        d = direction.double().reshape(-1)
        n = float(d.norm())
        if self.count == 0 or n == 0.0:
            return float("nan")
        return float(self.sum_unit @ d) / n / self.count

    def cos_of_mean_to(self, direction: torch.Tensor) -> float:
        return cosine(self.mean, direction)


@torch.no_grad()
def shift_stats(model: nn.Module, seqs: _common.Sequences, vectors: Mapping[int, torch.Tensor], steer_layers: Sequence[int],
                target_layers: Sequence[int] | None = None, *, positions: str = "all", batch_size: int = 8,
                pad: int = 0, quiet: bool = False) -> dict[int, dict[int, ShiftStats]]:
    """``stats[i][j]`` for every steering layer ``i`` and target layer ``j >= i`` (``target_layers``: default all).

    ``model`` must carry a steering vector on every layer (:func:`analysis.cli.load_steerable`); it is steered
    with ``{i: vectors[i]}`` alone for each ``i``."""
    num_layers = hooks.num_layers(model)
    targets = sorted(set(range(num_layers) if target_layers is None else target_layers))
    device = next(model.parameters()).device
    hidden = int(hooks.causal_lm(model).config.hidden_size)
    stats: dict[int, dict[int, ShiftStats]] = {
        i: {j: ShiftStats(torch.zeros(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64))
            for j in targets if j >= i} for i in steer_layers}
    n_batches = -(-len(seqs) // batch_size)
    bar = output.progress(desc="persistence", total=n_batches * (1 + len(steer_layers)), quiet=quiet, unit="pass")
    for batch in seqs.batches(batch_size, device, pad):
        mask = batch.positions(positions)
        lo = min(steer_layers)
        base = _common.resid_post(model, batch, {}, [j for j in targets if j >= lo])
        bar.update(1)
        for i in steer_layers:
            steered = _common.resid_post(model, batch, {i: vectors[i]}, [j for j in targets if j >= i])
            for j, h in steered.items():
                delta = _common.resid_shift(h, base[j], mask)  # (T, d)
                norms = delta.norm(dim=-1)
                unit = delta / norms.clamp_min(1e-30).unsqueeze(-1)
                st = stats[i][j]
                st.sum_delta += delta.sum(0).cpu()
                st.sum_unit += unit.sum(0).cpu()
                st.sum_norm += float(norms.sum())
                st.count += int(delta.shape[0])
            del steered
            bar.update(1)
        del base
    bar.close()
    return stats


def _clean(x: float | None) -> float | None:
    return None if x is None or x != x else float(x)


def matrices(stats: Mapping[int, Mapping[int, ShiftStats]], vectors: Mapping[int, torch.Tensor],
             steer_layers: Sequence[int], targets: Sequence[int]) -> dict[str, list[list[float | None]]]:
    out: dict[str, list[list[float | None]]] = {"cos_to_vector": [], "cos_to_mean": [], "delta_norm": [],
                                                "mean_shift_cos_to_vector": []}
    for i in steer_layers:
        rows = {k: [] for k in out}
        for j in targets:
            st = stats[i].get(j)
            if st is None or st.count == 0:
                for k in rows:
                    rows[k].append(None)
                continue
            has_vec = j in vectors and float(vectors[j].norm()) > 0
            rows["cos_to_vector"].append(_clean(st.mean_cos_to(vectors[j])) if has_vec else None)
            rows["cos_to_mean"].append(_clean(st.mean_cos_to(st.mean)))
            rows["delta_norm"].append(st.sum_norm / st.count)
            rows["mean_shift_cos_to_vector"].append(_clean(st.cos_of_mean_to(vectors[j])) if has_vec else None)
        for k in out:
            out[k].append(rows[k])
    return out


def add_sequence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positions", choices=["all", "prompt", "completion"], default="all",
                   help="tokens averaged over (default: all prompt + completion tokens)")
    p.add_argument("--completions-from", choices=["steered", "base"], default="steered",
                   help="which model samples the completions (default: the checkpoint, all vectors on)")
    p.add_argument("--samples-per-problem", type=int, default=1, help="completions per problem (default 1)")


def sample_for_analysis(model: nn.Module, tokenizer: Any, vectors: Mapping[int, torch.Tensor], args: argparse.Namespace,
                        benches: Sequence[Any]) -> _common.Sequences:
    tmpl = cli.template(args)
    with _common.use_vectors(model, vectors if args.completions_from == "steered" else {}):
        return _common.sample_sequences(model, tokenizer, _common.problems_of(benches), tmpl,
                                        settings.from_args(args), num_samples=args.samples_per_problem,
                                        progress=not args.no_progress)


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "persistence", run, __doc__, forward_batch=True, max_new_tokens=512,
                                   help="per-token output change at later layers when steering one layer: cosine to "
                                        "the later vectors and to its own mean")
    p.add_argument("--layers", default=None,
                   help="steering layers i (default: every layer the checkpoint steers), e.g. 0,4,8-10")
    add_sequence_args(p)


def run(args: argparse.Namespace) -> int:
    cli.check_positive(args, "samples_per_problem")
    o = cli.open_checkpoint(args, layers=args.layers)
    model, tokenizer, vectors, out, steer = o.model, o.tokenizer, o.vectors, o.out, o.layers
    seqs = sample_for_analysis(model, tokenizer, vectors, args, o.benches)
    num_layers = o.num_layers
    targets = list(range(num_layers))
    stats = shift_stats(model, seqs, vectors, steer, targets, positions=args.positions,
                        batch_size=args.forward_batch_size, pad=pad_id_of(tokenizer), quiet=args.no_progress)
    mats = matrices(stats, vectors, steer, targets)
    files = []
    titles = {"cos_to_vector": "mean_t cos(Δ_j(t), s_j)", "cos_to_mean": "mean_t cos(Δ_j(t), mean Δ_j)"}
    for key, title in titles.items():
        files.append(plots.heatmap(out / f"{key}.png", mats[key], steer, targets, title=title,
                                   xlabel="target layer j", ylabel="steering layer i", cmap="RdBu_r", vmin=-1,
                                   vmax=1).name)
    fig_series = {}
    for name, key in (("vs mean", "cos_to_mean"), ("vs s_j", "cos_to_vector")):
        for row, i in enumerate(steer):
            fig_series[f"i={i} {name}"] = mats[key][row]
    files.append(plots.line_plot(out / "persistence_curves.png", targets,
                                 {k: v for k, v in fig_series.items() if "vs mean" in k},
                                 title="cos(Δ_j(t), mean_t Δ_j) per steering layer i", xlabel="target layer j",
                                 ylabel="mean cosine", cmap="coolwarm", ylim=(-1.05, 1.05)).name)
    files.append(plots.line_plot(out / "persistence_vector_curves.png", targets,
                                 {k: v for k, v in fig_series.items() if "vs s_j" in k},
                                 title="cos(Δ_j(t), s_j) per steering layer i", xlabel="target layer j",
                                 ylabel="mean cosine", cmap="coolwarm", ylim=(-1.05, 1.05)).name)
    count = next(iter(stats[steer[0]].values())).count
    result = {"command": "persistence", "checkpoint": str(args.checkpoint), "base_model": o.base_id,
              "steer_layers": steer, "target_layers": targets, **mats,
              "vector_norms": {str(k): float(v.norm()) for k, v in vectors.items()},
              "num_sequences": len(seqs), "num_tokens": count, "positions": args.positions,
              "completions_from": args.completions_from, "settings": settings.record(args), "plots": files}
    return output.finish(out, result, f"persistence: {len(steer)} steering layers x {num_layers} targets over {count} "
                                   "tokens")
