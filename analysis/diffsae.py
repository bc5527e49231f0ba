"""``python -m analysis diffsae``: sparse features of the steering-induced activation shift, and which of them separate
correct from incorrect generations (the paper's "DiffSAE" analysis; its design is ours, see docs/analysis.md).

1. **Data.** Sample ``--samples-per-problem`` completions per benchmark problem from the steered model (the whole
   checkpoint; the shared generation path, T = 1 by default) and label each by the reward's verdict. On the same
   prompt+completion tokens (teacher-forced), record at layer ``L`` (``blocks.L.hook_resid_post``)::

       ΔF_L(t) = h_L(t; the --steer-layers vectors on) − h_L(t; no vectors)

   (``--input diff``, the default; ``--input steered`` records the steered residual itself). The vectors are streamed
   to ``OUT/activations`` in safetensors chunks of ``--chunk-size`` tokens; a seeded ``--heldout-fraction`` of the
   *problems* (all their completions) goes to a held-out stream.
2. **SAE.** A TopK (or L1) sparse autoencoder (``steering.sae``) of ``--dict-size`` features is trained for ``--steps``
   Adam steps of ``--sae-batch-size`` vectors drawn from the training chunks; a progress bar shows loss, L0 and
   explained variance. The weights go to ``OUT/sae`` in SAELens's layout (``sae_lens.SAE.load_from_disk`` opens it).
3. **Separation.** For every feature, its mean activation over each completion's completion tokens; its AUROC
   against correctness (Mann–Whitney, ties counted half); a two-sided permutation p-value from ``--permutations``
   label shuffles (within each problem by default: k samples of one problem share it, so a feature that only tells
   problems apart cannot pass); corrected for the number of features by Westfall–Young maxT (default; FWER), Holm
   (FWER) or Benjamini–Hochberg (FDR) (``--correction``). Features are ranked by effect, ``|AUROC − 0.5|``.
4. **Top features** (``--top-features``): the cosine of the decoder direction with every steering vector of the
   checkpoint and with mean ΔF; its logit lens (the ``logit-lens`` command's lens); its top-activating tokens in
   context; the share of ΔF's variance along its direction, and (``--input diff``) the share its own reconstruction
   term explains.

result.json::

    {"command": "diffsae", "checkpoint", "base_model", "layer", "hook_name", "input", "steer_layers",
     "settings": {...every flag...},
     "data": {"num_completions", "num_correct", "accuracy", "num_problems", "heldout_problems", "train_tokens",
              "heldout_tokens", "chunks", "activations_dir", "delta_mean_norm", "delta_total_variance"},
     "sae": {"dir", "d_in", "d_sae", "sparsity", "k", "l1_coeff", "input_scale", "training": {...last step...},
             "train": {"num_vectors", "mse", "explained_variance", "l0"}, "heldout": {...same...},
             "dead_features", "dead_fraction"},
     "separation": null | {"correction", "alpha", "permutations", "permutation", "num_tested", "num_significant",
                           "threshold": {"effect", "auroc_low", "auroc_high"}},
     "separation_skipped": null | "why",
     "features": [{"rank", "feature", "auroc", "effect", "direction", "p_value", "p_maxt", "p_holm", "q_bh",
                   "significant", "mean_correct", "mean_incorrect", "firing_rate"}, ...every tested feature, ranked],
     "top_features": [{...the row above..., "cos_to_vectors": {layer: cos}, "cos_to_mean_delta",
                       "delta_variance_along", "delta_variance_explained", "lens": {"top", "bottom", ...},
                       "examples": [{"row", "problem", "correct", "position", "token", "activation",
                                     "context"}]}, ...],
     "plots", "files"}

Plots: ``auroc_hist.png`` (AUROC of every tested feature, the significance threshold), ``sae_training.png`` (loss and
explained variance of the training batches), ``top_features_cos.png`` (cosine of the top features' directions with
each layer's vector), ``cards/feature_R_F.png`` (one card per top feature: its numbers, lens tokens and top-activating
tokens in distinct contexts, each token coloured by the feature's activation, like ``first-token``'s highlight
figure).
Files: ``sae/`` (cfg.json + sae_weights.safetensors), ``activations/`` (the chunks, unless ``--delete-activations``),
``completion_features.safetensors`` (per-completion mean activation of every feature, the labels, the problems).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis import _common
from analysis import cli, output, plots, settings
from analysis.cli import UsageError
import steering.sae
from steering import separation
from steering.readout import cosine
from steering import vectors as sv

INPUTS = ("diff", "steered")
CORRECTIONS = ("maxt", "holm", "bh")
PERMUTATIONS = ("within-problem", "global")
CHUNK_GLOB = "{split}-*.safetensors"
SPLITS = ("train", "heldout")
# Top-activating tokens kept per feature, per example shown: k samples of one problem are often the same text, so the
# cards skip repeated contexts and need more candidates than they show.
EXAMPLE_POOL = 4


# --------------------------------------------------------------------------------------------------------------------
# Arguments, checked before any model loads


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "diffsae", run, __doc__, forward_batch=True,
                                   help="an SAE on the steering-induced shift ΔF at one layer, and the features whose "
                                        "activation separates correct from incorrect completions")
    p.add_argument("--layer", type=int, required=True, metavar="L",
                   help="layer whose output (blocks.L.hook_resid_post) is recorded; negative counts from the end")
    g = p.add_argument_group("data")
    g.add_argument("--input", choices=INPUTS, default="diff",
                   help="diff: ΔF = steered − unsteered residual (default); steered: the steered residual itself")
    g.add_argument("--steer-layers", default=None, metavar="LAYERS",
                   help="vectors on for the steered residual (default: every vector of the checkpoint); sampling "
                        "always uses the whole checkpoint")
    g.add_argument("--samples-per-problem", type=int, default=8, metavar="K",
                   help="completions sampled per problem (default 8)")
    g.add_argument("--positions", choices=["completion", "all"], default="completion",
                   help="tokens the SAE is trained on: completion tokens (default) or prompt + completion; feature "
                        "means per completion always use completion tokens")
    g.add_argument("--chunk-size", type=int, default=65536, metavar="N",
                   help="tokens per safetensors chunk on disk (default 65536); the SAE shuffles within a chunk")
    g.add_argument("--heldout-fraction", type=float, default=0.1, metavar="F",
                   help="share of problems whose completions are held out of SAE training for its reconstruction "
                        "metrics (default 0.1; 0 = none)")
    g.add_argument("--delete-activations", action="store_true", help="remove OUT/activations at the end")
    g = p.add_argument_group("SAE")
    g.add_argument("--dict-size", type=int, default=None, metavar="N",
                   help="features in the dictionary (default 8 x hidden size)")
    g.add_argument("--sparsity", choices=steering.sae.SPARSITIES, default="topk",
                   help="topk: keep the --topk largest pre-activations per token (default); l1: ReLU + L1 penalty")
    g.add_argument("--topk", type=int, default=32, metavar="K", help="active features per token for topk (default 32)")
    g.add_argument("--l1-coeff", type=float, default=0.1, help="L1 penalty weight for l1 (default 0.1)")
    g.add_argument("--steps", type=int, default=2000, help="Adam steps (default 2000)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--sae-batch-size", type=int, default=4096, metavar="N",
                   help="vectors per SAE step (default 4096)")
    g.add_argument("--aux-coeff", type=float, default=1 / 32,
                   help="AuxK loss weight reviving dead features, topk only (default 1/32, Gao et al.; 0 = off)")
    g.add_argument("--dead-window", type=int, default=200, metavar="STEPS",
                   help="steps without firing after which a feature counts as dead for AuxK (default 200)")
    g.add_argument("--sae-seed", type=int, default=0,
                   help="seed of the SAE's initialisation, batch order, held-out split and permutations (default 0)")
    g = p.add_argument_group("separation and top features")
    g.add_argument("--permutations", type=int, default=1000, help="label permutations of the test (default 1000)")
    g.add_argument("--permutation", choices=PERMUTATIONS, default="within-problem",
                   help="shuffle labels among one problem's samples (default) or among all completions")
    g.add_argument("--correction", choices=CORRECTIONS, default="maxt",
                   help="multiple-comparison correction deciding significance: maxt (Westfall-Young, FWER; "
                        "default), holm (FWER) or bh (Benjamini-Hochberg, FDR); all three are reported")
    g.add_argument("--alpha", type=float, default=0.05, help="significance level after correction (default 0.05)")
    g.add_argument("--top-features", type=int, default=10, metavar="N",
                   help="features described in detail and drawn as cards (default 10)")
    g.add_argument("--examples", type=int, default=6, metavar="N",
                   help="top-activating tokens shown per top feature, in distinct contexts (default 6)")
    g.add_argument("--context", type=int, default=24, metavar="N",
                   help="tokens of context before a top-activating token (default 24; 4 after)")
    g.add_argument("--lens", choices=("norm", "raw", "cosine"), default="norm",
                   help="logit lens of the decoder directions (the logit-lens command's; default norm)")
    g.add_argument("--lens-k", type=int, default=10, metavar="K", help="lens tokens listed per feature (default 10)")


@dataclass
class Plan:
    """What the checks derived from the arguments and the checkpoint's steering.json."""

    layer: int
    num_layers: int
    hidden: int
    checkpoint_layers: list[int]
    steer_layers: list[int]
    dict_size: int


def _finite(args: argparse.Namespace, name: str, *, low: float, low_ok: bool, high: float | None = None,
            high_ok: bool = False) -> None:
    v = vars(args)[name]
    flag = f"--{name.replace('_', '-')}"
    ok = math.isfinite(v) and (v >= low if low_ok else v > low)
    if high is not None:
        ok = ok and (v <= high if high_ok else v < high)
    if not ok:
        lo = f"{'[' if low_ok else '('}{low:g}"
        hi = f"{high:g}{']' if high_ok else ')'}" if high is not None else "inf)"
        raise UsageError(f"{flag} must be in {lo}, {hi}, got {v}")


def check(args: argparse.Namespace) -> Plan:
    """Every check that needs no model (numbers, layers against the checkpoint's steering.json, benchmark specs)."""
    cli.check_args(args)
    if args.num_samples is not None:
        raise UsageError("--num-samples is not used by diffsae: give the samples per problem with "
                         "--samples-per-problem")
    if args.max_length is not None:
        raise UsageError("--max-length is not used by diffsae: limit the completions with --max-new-tokens")
    if len(args.seeds) != 1:
        raise UsageError(f"diffsae samples once: give one --seeds value, got {args.seeds}")
    if args.pass_k:
        raise UsageError("--pass-k is not used by diffsae (it reports no accuracy metric)")
    cli.check_positive(args, "samples_per_problem", "chunk_size", "steps", "sae_batch_size", "dead_window",
                       "permutations", "top_features", "examples", "lens_k", "topk")
    if args.context < 0:
        raise UsageError(f"--context must be >= 0, got {args.context}")
    _finite(args, "lr", low=0, low_ok=False)
    _finite(args, "l1_coeff", low=0, low_ok=True)
    _finite(args, "aux_coeff", low=0, low_ok=True)
    _finite(args, "alpha", low=0, low_ok=False, high=1)
    _finite(args, "heldout_fraction", low=0, low_ok=True, high=1)
    if (args.permutations + 1) * args.alpha < 1:
        raise UsageError(f"--permutations {args.permutations} cannot reach --alpha {args.alpha}: the smallest "
                         f"permutation p-value is 1/(permutations + 1); use at least {math.ceil(1 / args.alpha) - 1}")
    try:
        meta = sv.read_meta(args.checkpoint)
        num_layers, hidden = int(meta["num_hidden_layers"]), int(meta["hidden_size"])
        ck_layers = sorted(int(x) for x in meta["layers"])
    except (sv.CheckpointError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--checkpoint {args.checkpoint}: unreadable steering.json ({e})") from None
    layer = args.layer + num_layers if args.layer < 0 else args.layer
    if not 0 <= layer < num_layers:
        raise UsageError(f"--layer {args.layer}: out of range; the model has {num_layers} layers (0..{num_layers - 1})")
    steer = cli.parse_layers(args.steer_layers, num_layers, "--steer-layers") or ck_layers
    missing = [x for x in steer if x not in ck_layers]
    if missing:
        raise UsageError(f"--steer-layers {args.steer_layers}: the checkpoint has no vector at layers {missing} "
                         f"(it has {ck_layers})")
    upstream = [x for x in steer if x <= layer]
    if not upstream:
        raise UsageError(f"--layer {layer}: no steered layer at or before it (steered: {steer}), so ΔF is zero there")
    if args.input == "diff" and upstream == [layer]:
        raise UsageError(f"--layer {layer} is the only steered layer at or before it: ΔF is its own vector s_{layer} "
                         "at every token (nothing for an SAE to learn); choose a later layer or --input steered")
    dict_size = args.dict_size if args.dict_size is not None else 8 * hidden
    if dict_size < 1:
        raise UsageError(f"--dict-size must be >= 1, got {dict_size}")
    if args.sparsity == "topk" and args.topk > dict_size:
        raise UsageError(f"--topk {args.topk} is larger than the dictionary (--dict-size {dict_size})")
    return Plan(layer, num_layers, hidden, ck_layers, steer, dict_size)


# --------------------------------------------------------------------------------------------------------------------
# Activations on disk


class ChunkWriter:
    """Token vectors streamed to ``DIR/{split}-NNNNN.safetensors``, ``chunk_size`` tokens per file; each file holds
    ``x`` (T, d) fp32 (the SAE's input), ``row`` (the completion), ``pos`` (position in the completion; < 0 in the
    prompt) and ``token`` (its id), and with ``--input steered`` also ``delta`` (ΔF, for its variance shares)."""

    def __init__(self, directory: Path, split: str, chunk_size: int):
        self.directory, self.split, self.chunk_size = directory, split, chunk_size
        self.parts: list[dict[str, torch.Tensor]] = []
        self.pending = 0
        self.files: list[Path] = []
        self.tokens = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        n = int(next(iter(tensors.values())).shape[0])
        start = 0
        while start < n:
            take = min(n - start, self.chunk_size - self.pending)
            self.parts.append({k: v[start:start + take] for k, v in tensors.items()})
            self.pending += take
            start += take
            if self.pending == self.chunk_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        from steering.files import write_file_atomic

        data = {k: torch.cat([p[k] for p in self.parts]).contiguous() for k in self.parts[0]}
        path = self.directory / f"{self.split}-{len(self.files):05d}.safetensors"
        write_file_atomic(path, lambda tmp: save_file(data, str(tmp)))
        self.files.append(path)
        self.tokens += self.pending
        self.parts, self.pending = [], 0


def read_chunk(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def clear_activations(directory: Path) -> None:
    """Remove a previous run's chunks (they would be mixed into this run's data), nothing else."""
    for split in SPLITS:
        for f in directory.glob(CHUNK_GLOB.format(split=split)):
            f.unlink()
    (directory / "index.json").unlink(missing_ok=True)


@torch.no_grad()
def collect(model: nn.Module, seqs: _common.Sequences, vectors: Mapping[int, torch.Tensor], layer: int, *,
            input_kind: str, positions: str, writers: Mapping[str, ChunkWriter], split_of_row: Sequence[str],
            batch_size: int, pad: int, quiet: bool = False) -> None:
    """Record the SAE's input vectors of every sequence at ``layer`` into the writers (ΔF with ``input_kind``
    "diff": :func:`analysis._common.resid_shift` of the steered and the unsteered residual, exactly ``persistence``'s
    shift)."""
    device = next(model.parameters()).device
    bar = output.progress(desc="ΔF", total=-(-len(seqs) // batch_size), quiet=quiet, unit="batch")
    for batch in seqs.batches(batch_size, device, pad):
        mask = batch.positions(positions)
        base = _common.resid_post(model, batch, {}, [layer])[layer]
        steered = _common.resid_post(model, batch, vectors, [layer])[layer]
        delta = _common.resid_shift(steered, base, mask).float()
        local = torch.arange(mask.shape[0], device=device)[:, None].expand_as(mask)[mask].cpu()  # batch row per token
        rows = torch.tensor(batch.rows)[local]
        pos = (torch.arange(mask.shape[1], device=device)[None, :] - batch.prompt_len[:, None])[mask].cpu()
        tensors = {"x": (delta if input_kind == "diff" else steered[mask].float()).cpu(), "row": rows,
                   "pos": pos.to(torch.int64), "token": batch.input_ids[mask].cpu()}
        if input_kind == "steered":
            tensors["delta"] = delta.cpu()
        for split, writer in writers.items():
            keep = torch.tensor([split_of_row[r] == split for r in batch.rows], dtype=torch.bool)[local]
            if keep.any():
                writer.add({k: v[keep] for k, v in tensors.items()})
        bar.update(1)
    bar.close()
    for writer in writers.values():
        writer.flush()


def batch_stream(files: Sequence[Path], batch_size: int, generator: torch.Generator
                 ) -> Callable[[], Iterator[torch.Tensor]]:
    """One epoch per call: the chunks in a random order, each chunk's vectors shuffled, ``batch_size`` at a time (a
    batch may span two chunks; the last partial batch of the epoch is dropped)."""

    def epoch() -> Iterator[torch.Tensor]:
        carry = None
        for i in torch.randperm(len(files), generator=generator).tolist():
            x = read_chunk(files[i])["x"]
            x = x[torch.randperm(x.shape[0], generator=generator)]
            if carry is not None:
                x = torch.cat([carry, x])
            n = (x.shape[0] // batch_size) * batch_size
            for start in range(0, n, batch_size):
                yield x[start:start + batch_size]
            carry = x[n:] if n < x.shape[0] else None

    return epoch


# --------------------------------------------------------------------------------------------------------------------
# Feature statistics: one pass over every chunk


@dataclass
class FeatureStats:
    """Per-completion activation sums and token counts, firing counts, top activations, ΔF projections."""

    d_in: int
    d_sae: int
    num_rows: int
    top_m: int
    device: torch.device = torch.device("cpu")
    row_sum: torch.Tensor = field(init=False)  # (rows, d_sae) Σ over completion tokens of the activation
    row_tokens: torch.Tensor = field(init=False)  # (rows,) completion tokens
    fires: torch.Tensor = field(init=False)  # (d_sae,) tokens on which the feature is active
    top_val: torch.Tensor = field(init=False)  # (d_sae, m) largest activations (completion tokens)
    top_row: torch.Tensor = field(init=False)
    top_pos: torch.Tensor = field(init=False)
    # ΔF sums over the SAE's tokens: Σ proj, Σ proj², Σ a, Σ a², Σ a·proj (proj = ΔF · d_f), Σ ΔF, Σ ‖ΔF‖², count
    s_proj: torch.Tensor = field(init=False)
    s_proj2: torch.Tensor = field(init=False)
    s_a: torch.Tensor = field(init=False)
    s_a2: torch.Tensor = field(init=False)
    s_aproj: torch.Tensor = field(init=False)
    s_delta: torch.Tensor = field(init=False)
    s_delta2: float = 0.0
    count: int = 0
    recon: dict[str, steering.sae.ReconstructionStats] = field(init=False)

    def __post_init__(self) -> None:
        f64, dev = torch.float64, self.device
        self.row_sum = torch.zeros(self.num_rows, self.d_sae, device=dev)
        self.row_tokens = torch.zeros(self.num_rows, dtype=torch.long, device=dev)
        self.fires = torch.zeros(self.d_sae, dtype=torch.long, device=dev)
        self.top_val = torch.full((self.d_sae, self.top_m), -1.0, device=dev)
        self.top_row = torch.full((self.d_sae, self.top_m), -1, dtype=torch.long, device=dev)
        self.top_pos = torch.full((self.d_sae, self.top_m), -1, dtype=torch.long, device=dev)
        for name in ("s_proj", "s_proj2", "s_a", "s_a2", "s_aproj"):
            setattr(self, name, torch.zeros(self.d_sae, dtype=f64, device=dev))
        self.s_delta = torch.zeros(self.d_in, dtype=f64, device=dev)
        self.recon = {split: steering.sae.ReconstructionStats(self.d_in, self.d_sae) for split in SPLITS}

    @property
    def alive(self) -> torch.Tensor:
        return self.fires > 0

    def row_means(self) -> torch.Tensor:
        return self.row_sum / self.row_tokens.clamp_min(1)[:, None].float()

    def delta_shares(self, contribution: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(along, explained)`` per feature: the share of ΔF's variance (about its mean) along the decoder
        direction, and (``contribution``) the share the feature's own centred term ``(a_f − ā_f) d_f`` removes."""
        n = max(self.count, 1)
        total = self.s_delta2 - float(self.s_delta @ self.s_delta) / n
        if not total > 0:
            return torch.full((self.d_sae,), float("nan")), None
        along = (self.s_proj2 - self.s_proj ** 2 / n) / total
        if not contribution:
            return along, None
        cov = self.s_aproj - self.s_a * self.s_proj / n
        var_a = self.s_a2 - self.s_a ** 2 / n
        return along, (2 * cov - var_a) / total

    def to_cpu(self) -> "FeatureStats":
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.cpu())
        self.device = torch.device("cpu")
        return self


@torch.no_grad()
def feature_pass(sae: steering.sae.SparseAutoencoder, files: Mapping[str, Sequence[Path]], num_rows: int, *, top_m: int,
                 input_kind: str, sub_batch: int = 4096, quiet: bool = False) -> FeatureStats:
    """Encode every stored vector once and gather :class:`FeatureStats` (reconstruction metrics per split)."""
    device = sae.W_dec.device
    st = FeatureStats(sae.cfg.d_in, sae.cfg.d_sae, num_rows, top_m, device)
    w_dec = sae.W_dec.detach().double()
    every = [(split, f) for split in SPLITS for f in files.get(split, [])]
    for split, path in output.progress(every, desc="features", quiet=quiet, unit="chunk"):
        chunk = read_chunk(path)
        for start in range(0, chunk["x"].shape[0], sub_batch):
            part = {k: v[start:start + sub_batch].to(device) for k, v in chunk.items()}
            x = part["x"]
            x_hat, a = sae(x)
            st.recon[split].add(x, x_hat, a)
            delta = (part["delta"] if input_kind == "steered" else x).double()
            ad = a.double()
            proj = delta @ w_dec.T
            st.s_proj += proj.sum(0)
            st.s_proj2 += (proj ** 2).sum(0)
            st.s_a += ad.sum(0)
            st.s_a2 += (ad ** 2).sum(0)
            st.s_aproj += (ad * proj).sum(0)
            st.s_delta += delta.sum(0)
            st.s_delta2 += float((delta ** 2).sum())
            st.count += int(x.shape[0])
            st.fires += (a > 0).sum(0)
            comp = part["pos"] >= 0
            if comp.any():
                rows = part["row"][comp]
                ac = a[comp]
                st.row_sum.index_add_(0, rows, ac)
                st.row_tokens.index_add_(0, rows, torch.ones_like(rows))
                m = min(top_m, int(ac.shape[0]))
                val, idx = torch.topk(ac.T, m, dim=1)
                cat_val = torch.cat([st.top_val, val], 1)
                cat_row = torch.cat([st.top_row, rows[idx]], 1)
                cat_pos = torch.cat([st.top_pos, part["pos"][comp][idx]], 1)
                best = torch.topk(cat_val, top_m, dim=1).indices
                st.top_val = cat_val.gather(1, best)
                st.top_row = cat_row.gather(1, best)
                st.top_pos = cat_pos.gather(1, best)
    return st.to_cpu()


def ranked_table(sep: Mapping[str, Any], tested: torch.Tensor, means: torch.Tensor, correct: torch.Tensor,
                 firing_rate: torch.Tensor) -> list[dict[str, Any]]:
    """One row per tested feature (``tested``: the feature ids of :func:`separation`'s columns), ranked by effect
    ``|AUROC − ½|`` (ties: smaller p first). ``means`` (completions, all features) and ``correct`` give each feature's
    mean activation among correct and incorrect completions; ``firing_rate`` (all features) its share of tokens."""
    m_pos = means[correct][:, tested].mean(0)
    m_neg = means[~correct][:, tested].mean(0)
    order = sorted(range(tested.numel()), key=lambda i: (-float(sep["effect"][i]), float(sep["p_value"][i])))
    rows = []
    for rank, i in enumerate(order, 1):
        f, a = int(tested[i]), float(sep["auroc"][i])
        rows.append({"rank": rank, "feature": f, "auroc": a, "effect": float(sep["effect"][i]),
                     "direction": "correct" if a > 0.5 else "incorrect" if a < 0.5 else "none",
                     "p_value": float(sep["p_value"][i]), "p_maxt": float(sep["p_maxt"][i]),
                     "p_holm": float(sep["p_holm"][i]), "q_bh": float(sep["q_bh"][i]),
                     "significant": bool(sep["significant"][i]), "mean_correct": float(m_pos[i]),
                     "mean_incorrect": float(m_neg[i]), "firing_rate": float(firing_rate[f])})
    return rows


# --------------------------------------------------------------------------------------------------------------------
# What a top feature is


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    return _num(cosine(a, b))  # None where a direction is zero


@torch.no_grad()
def context_activations(sae: steering.sae.SparseAutoencoder, files: Mapping[str, Sequence[Path]], rows: set[int],
                        features: Sequence[int]) -> dict[int, dict[int, torch.Tensor]]:
    """``{row: {pos: activations of `features`}}`` for the stored tokens of ``rows`` (second pass, few rows)."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    feats = torch.tensor(list(features), dtype=torch.long)
    wanted = torch.tensor(sorted(rows), dtype=torch.long)
    for split in SPLITS:
        for path in files.get(split, []):
            chunk = read_chunk(path)
            keep = torch.isin(chunk["row"], wanted)
            if not keep.any():
                continue
            a = sae.encode(chunk["x"][keep].to(sae.W_dec.device))[:, feats.to(sae.W_dec.device)].cpu()
            for r, pos, act in zip(chunk["row"][keep].tolist(), chunk["pos"][keep].tolist(), a):
                out.setdefault(r, {})[pos] = act
    return out


def token_texts(tokenizer: Any, seqs: _common.Sequences, row: int) -> tuple[list[str], int]:
    """The decoded tokens of row ``row`` (prompt + completion) and its prompt length."""
    ids = list(seqs.prompt_ids[row]) + list(seqs.completion_ids[row])
    return _common.decode_tokens(tokenizer, ids), len(seqs.prompt_ids[row])


# --------------------------------------------------------------------------------------------------------------------
# The command


def split_problems(num_problems: int, fraction: float, seed: int) -> set[int]:
    """The held-out problems: a seeded ``fraction`` of them (at least one when fraction > 0), never all."""
    if fraction <= 0:
        return set()
    n = min(num_problems - 1, max(1, round(fraction * num_problems)))
    perm = torch.randperm(num_problems, generator=torch.Generator().manual_seed(seed)).tolist()
    return set(perm[:n])


def settings_of(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    return {**settings.record(args), "samples_per_problem": args.samples_per_problem, "input": args.input,
            "positions": args.positions, "chunk_size": args.chunk_size, "heldout_fraction": args.heldout_fraction,
            "dict_size": plan.dict_size, "sparsity": args.sparsity, "topk": args.topk, "l1_coeff": args.l1_coeff,
            "steps": args.steps, "lr": args.lr, "sae_batch_size": args.sae_batch_size, "aux_coeff": args.aux_coeff,
            "dead_window": args.dead_window, "sae_seed": args.sae_seed, "permutations": args.permutations,
            "permutation": args.permutation, "correction": args.correction, "alpha": args.alpha,
            "top_features": args.top_features, "examples": args.examples, "context": args.context,
            "lens": args.lens, "lens_k": args.lens_k, "forward_batch_size": args.forward_batch_size,
            "template": cli.template(args).name}


def run(args: argparse.Namespace) -> int:
    from steering.generation import pad_id_of
    from steering.rewards import score_batch

    plan = check(args)
    base_id = cli.base_model_id(args.model, args.checkpoint)
    benches = cli.load_benchmarks(cli.benchmark_specs(args), args)
    problems = _common.problems_of(benches)
    if not problems:
        raise UsageError(f"--benchmarks {' '.join(cli.benchmark_specs(args))}: no problems")
    if args.heldout_fraction > 0 and len(problems) < 2:
        raise UsageError(f"--heldout-fraction {args.heldout_fraction} needs at least 2 problems (a held-out one and "
                         f"a training one); there is {len(problems)}; use --heldout-fraction 0")
    tmpl = cli.template(args)
    run_settings = settings_of(args, plan)
    out = output.prepare_out(args.out)
    model, tokenizer = cli.load_steerable(base_id, args)
    vectors = cli.checkpoint_vectors(args.checkpoint, model)
    steer = {layer: vectors[layer] for layer in plan.steer_layers}
    pad = pad_id_of(tokenizer)

    # 1. completions of the steered model, their verdicts, and the vectors at layer L on their tokens
    with _common.use_vectors(model, vectors):
        seqs = _common.sample_sequences(model, tokenizer, problems, tmpl, settings.from_args(args),
                                        progress=not args.no_progress, num_samples=args.samples_per_problem)
    verdicts = score_batch(seqs.completions, [problems[i]["answer"] for i in seqs.problem],
                           answer_format=tmpl.answer_format, timeout_s=args.reward_timeout,
                           options=settings.from_args(args).grading)
    correct = torch.tensor([bool(v.correct) for v in verdicts])
    heldout = split_problems(len(problems), args.heldout_fraction, args.sae_seed)
    split_of_row = ["heldout" if seqs.problem[r] in heldout else "train" for r in range(len(seqs))]
    act_dir = out / "activations"
    act_dir.mkdir(exist_ok=True)
    clear_activations(act_dir)
    writers = {split: ChunkWriter(act_dir, split, args.chunk_size) for split in SPLITS}
    collect(model, seqs, steer, plan.layer, input_kind=args.input, positions=args.positions, writers=writers,
            split_of_row=split_of_row, batch_size=args.forward_batch_size, pad=pad, quiet=args.no_progress)
    files = {split: list(w.files) for split, w in writers.items()}
    hook_name = f"blocks.{plan.layer}.hook_resid_post"
    if not files["train"]:
        raise UsageError("no training tokens were recorded (every problem is held out?)")
    output.write_json(act_dir / "index.json", {
        "layer": plan.layer, "hook_name": hook_name, "input": args.input,
        "steer_layers": plan.steer_layers, "positions": args.positions, "d": plan.hidden,
        "chunks": {s: [f.name for f in fs] for s, fs in files.items()},
        "tokens": {s: w.tokens for s, w in writers.items()}})

    # 2. the SAE
    gen = torch.Generator().manual_seed(args.sae_seed)
    cfg = steering.sae.SAEConfig(plan.hidden, plan.dict_size, args.sparsity, k=args.topk, l1_coeff=args.l1_coeff)
    tc = steering.sae.TrainConfig(steps=args.steps, batch_size=args.sae_batch_size, lr=args.lr, seed=args.sae_seed,
                                  aux_coeff=args.aux_coeff, dead_window=args.dead_window)
    if writers["train"].tokens < args.sae_batch_size:
        raise UsageError(f"--sae-batch-size {args.sae_batch_size} is more than the {writers['train'].tokens} "
                         "training vectors recorded; lower it or sample more")
    init = read_chunk(files["train"][0])["x"][:65536]
    curve: dict[str, list[float]] = {"step": [], "loss": [], "explained_variance": []}
    bar = output.progress(desc="SAE", total=args.steps, quiet=args.no_progress, unit="step")
    log_every = max(1, args.steps // 200)

    def on_step(s: steering.sae.StepStats) -> None:
        bar.update(1)
        if s.step % log_every == 0 or s.step == args.steps:
            curve["step"].append(s.step)
            curve["loss"].append(s.loss)
            curve["explained_variance"].append(1 - s.fvu)
            bar.set_postfix(loss=f"{s.loss:.4f}", L0=f"{s.l0:.1f}", EV=f"{1 - s.fvu:.3f}", dead=s.dead)

    try:
        sae, info = steering.sae.train(cfg, tc, batch_stream(files["train"], args.sae_batch_size, gen),
                                       init_sample=init, device=next(model.parameters()).device, on_step=on_step)
    except steering.sae.SAEError as e:
        raise UsageError(f"SAE training: {e}") from None
    finally:
        bar.close()
    sae_dir = steering.sae.save_saelens(sae, out / "sae", hook_name=hook_name, model_name=base_id,
                                        extra={"input": args.input, "steer_layers": plan.steer_layers,
                                               "checkpoint": str(args.checkpoint), "steering_analysis": "diffsae"})

    # 3. feature statistics and separation
    st = feature_pass(sae, files, len(seqs), top_m=args.examples * EXAMPLE_POOL, input_kind=args.input,
                      quiet=args.no_progress)
    means = st.row_means()
    has_tokens = st.row_tokens > 0
    alive = st.alive
    tested = torch.nonzero(alive).reshape(-1)
    save_completion_features(out / "completion_features.safetensors", means, correct, seqs, st.row_tokens)
    n_pos, n_neg = int(correct[has_tokens].sum()), int((~correct[has_tokens]).sum())
    sep = None
    skipped = None
    if n_pos == 0 or n_neg == 0:
        skipped = (f"all {n_pos + n_neg} completions are {'correct' if n_neg == 0 else 'incorrect'}: AUROC needs both "
                   "(sample more, or a harder benchmark)")
    elif tested.numel() == 0:
        skipped = "every feature is dead"
    else:
        groups = torch.tensor(seqs.problem)[has_tokens] if args.permutation == "within-problem" else None
        sep = separation.separation(means[has_tokens][:, tested], correct[has_tokens], groups,
                                    permutations=args.permutations, correction=args.correction, alpha=args.alpha,
                                    generator=gen)
    if skipped:
        print(f"diffsae: no separation test: {skipped}", file=sys.stderr)

    along, explained = st.delta_shares(args.input == "diff")
    rows = [] if sep is None else ranked_table(sep, tested, means[has_tokens], correct[has_tokens],
                                               st.fires.double() / max(st.count, 1))

    # 4. the top features
    top = describe_top(rows[:args.top_features], sae, model, tokenizer, vectors, seqs, correct, st, files, along,
                       explained, args)

    # 5. plots and result
    plot_files = [plots.line_plot(out / "sae_training.png", curve["step"],
                                  {"loss": curve["loss"], "explained variance": curve["explained_variance"]},
                                  title=f"SAE training at {hook_name} (batch statistics)", xlabel="step",
                                  ylabel="").name]
    if sep is not None:
        plot_files.append(auroc_histogram(out / "auroc_hist.png", [r["auroc"] for r in rows], sep["threshold"],
                                          args, sum(r["significant"] for r in rows)).name)
    if top:
        plot_files.append(plots.heatmap(out / "top_features_cos.png",
                                        [[t["cos_to_vectors"].get(str(layer)) for layer in range(plan.num_layers)]
                                         for t in top],
                                        [f"#{t['rank']} f{t['feature']}" for t in top], list(range(plan.num_layers)),
                                        title="cos(decoder direction, s_l)", xlabel="layer l", ylabel="feature",
                                        cmap="RdBu_r", vmin=-1, vmax=1).name)
        plot_files += feature_cards(out / "cards", top, tokenizer, seqs, correct, args)
    if args.delete_activations:
        shutil.rmtree(act_dir)
    recon = {split: st.recon[split].metrics() for split in SPLITS}
    dead = int((~alive).sum())
    delta_n = max(st.count, 1)
    result = {
        "command": "diffsae", "checkpoint": str(args.checkpoint), "base_model": base_id, "layer": plan.layer,
        "hook_name": hook_name, "input": args.input, "steer_layers": plan.steer_layers, "settings": run_settings,
        "data": {"num_completions": len(seqs), "num_correct": int(correct.sum()),
                 "accuracy": float(correct.double().mean()), "num_problems": len(problems),
                 "heldout_problems": sorted(heldout), "train_tokens": writers["train"].tokens,
                 "heldout_tokens": writers["heldout"].tokens,
                 "chunks": {s: len(fs) for s, fs in files.items()},
                 "activations_dir": None if args.delete_activations else "activations",
                 "delta_mean_norm": float((st.s_delta / delta_n).norm()),
                 "delta_total_variance": (st.s_delta2 - float(st.s_delta @ st.s_delta) / delta_n) / delta_n},
        "sae": {"dir": sae_dir.name, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "sparsity": cfg.sparsity,
                "k": cfg.k if cfg.sparsity == "topk" else None,
                "l1_coeff": cfg.l1_coeff if cfg.sparsity == "l1" else None, "input_scale": info["input_scale"],
                "training": {**(info["last_step"] or {}), "vectors_seen": info["vectors_seen"],
                             "epochs_completed": info["epochs_completed"]},
                "train": recon["train"], "heldout": recon["heldout"], "dead_features": dead,
                "dead_fraction": dead / cfg.d_sae},
        "separation": None if sep is None else {
            "correction": args.correction, "alpha": args.alpha, "permutations": args.permutations,
            "permutation": args.permutation, "num_tested": int(tested.numel()),
            "num_significant": sum(r["significant"] for r in rows),
            "threshold": threshold_json(sep["threshold"])},
        "separation_skipped": skipped, "features": rows, "top_features": top, "plots": plot_files,
        "files": [sae_dir.name, "completion_features.safetensors"]
        + ([] if args.delete_activations else ["activations"])}
    ev = recon["heldout"]["explained_variance"] if recon["heldout"]["num_vectors"] else recon["train"][
        "explained_variance"]
    best = f", top feature {rows[0]['feature']} AUROC {rows[0]['auroc']:.3f}" if rows else ""
    return output.finish(out, result, f"diffsae: {len(seqs)} completions, SAE EV {ev:.3f}, {dead} dead{best}")


def threshold_json(effect: float | None) -> dict[str, Any] | None:
    if effect is None or not math.isfinite(effect):
        return None
    return {"effect": effect, "auroc_low": 0.5 - effect, "auroc_high": 0.5 + effect}


def save_completion_features(path: Path, means: torch.Tensor, correct: torch.Tensor, seqs: _common.Sequences,
                             tokens: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from steering.files import write_file_atomic

    data = {"mean_activation": means.contiguous(), "correct": correct.to(torch.uint8),
            "problem": torch.tensor(seqs.problem, dtype=torch.long), "completion_tokens": tokens}
    write_file_atomic(path, lambda tmp: save_file(data, str(tmp)))


def describe_top(rows: Sequence[dict[str, Any]], sae: steering.sae.SparseAutoencoder, model: nn.Module, tokenizer: Any,
                 vectors: Mapping[int, torch.Tensor], seqs: _common.Sequences, correct: torch.Tensor, st: FeatureStats,
                 files: Mapping[str, Sequence[Path]], along: torch.Tensor, explained: torch.Tensor | None,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ranked rows of the top features, each with its cosines, lens, ΔF shares and top-activating tokens."""
    from analysis.logit_lens import Vocab, lens, readout
    from steering import hooks

    if not rows:
        return []
    feats = [r["feature"] for r in rows]
    vocab = Vocab(tokenizer, hooks.causal_lm(model).lm_head.weight.shape[0])
    device = next(model.parameters()).device
    mean_delta = st.s_delta / max(st.count, 1)
    need = {int(r) for f in feats for r in st.top_row[f].tolist() if r >= 0}
    acts = context_activations(sae, files, need, feats)
    out = []
    for j, row in enumerate(rows):
        f = row["feature"]
        d = sae.W_dec[f].detach().cpu()
        with torch.no_grad():
            scores = lens(model, d.to(device), args.lens)
        examples, seen = [], set()
        for val, r, pos in zip(st.top_val[f].tolist(), st.top_row[f].tolist(), st.top_pos[f].tolist()):
            if r < 0 or val <= 0 or len(examples) == args.examples:
                continue
            texts, p_len = token_texts(tokenizer, seqs, r)
            at = p_len + pos
            lo, hi = max(0, at - args.context), min(len(texts), at + 5)
            key = (tuple(texts[lo:hi]), at - lo)
            if key in seen:  # the same text around the same token (another sample of the same problem)
                continue
            seen.add(key)
            row_acts = acts.get(r, {})
            ctx = [{"token": texts[t], "activation": _act(row_acts.get(t - p_len), j)} for t in range(lo, hi)]
            examples.append({"row": r, "problem": seqs.problem[r], "correct": bool(correct[r]), "position": pos,
                             "token": texts[at], "activation": val, "context_start": lo - p_len, "context": ctx})
        out.append({**row, "cos_to_vectors": {str(layer): _cos(d, v) for layer, v in sorted(vectors.items())},
                    "cos_to_mean_delta": _cos(d, mean_delta),
                    "delta_variance_along": _num(along[f]),
                    "delta_variance_explained": None if explained is None else _num(explained[f]),
                    "lens": readout(scores, vocab, args.lens_k), "examples": examples})
    return out


def _act(values: torch.Tensor | None, j: int) -> float | None:
    return None if values is None else float(values[j])


def _num(x: float | torch.Tensor) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def auroc_histogram(path: Path, aurocs: Sequence[float], threshold: float | None, args: argparse.Namespace,
                    significant: int) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    ax.hist(aurocs, bins=min(60, max(10, len(aurocs) // 10)), range=(0, 1), color="C0")
    ax.axvline(0.5, color="grey", linestyle=":", label="0.5 (no separation)")
    if threshold is not None and math.isfinite(threshold):
        for k, x in enumerate((0.5 - threshold, 0.5 + threshold)):
            ax.axvline(x, color="C3", linestyle="--",
                       label=f"{args.correction} threshold, α={args.alpha:g}" if k == 0 else None)
    ax.set_xlabel("AUROC of the feature's mean activation per completion vs. correct")
    ax.set_ylabel("features")
    ax.set_title(f"{len(aurocs)} live features, {significant} significant ({args.correction}, "
                 f"{args.permutations} {args.permutation} permutations)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return plots.save(fig, path)


def feature_cards(directory: Path, top: Sequence[dict[str, Any]], tokenizer: Any, seqs: _common.Sequences,
                  correct: torch.Tensor, args: argparse.Namespace) -> list[str]:
    """One PNG per top feature: a header block (AUROC, p, cosines, ΔF shares, lens tokens) and its top-activating
    tokens in context, each token coloured by the feature's activation (blank: not recorded, e.g. prompt tokens)."""
    directory.mkdir(exist_ok=True)
    names = []
    for t in top:
        cos_l = t["cos_to_vectors"]
        best_layer = max(cos_l, key=lambda k: abs(cos_l[k] or 0.0)) if cos_l else None
        lens_top = " ".join(plots.show_token(x["token"], 10) for x in t["lens"]["top"][:6])
        lens_bottom = " ".join(plots.show_token(x["token"], 10) for x in t["lens"]["bottom"][:6])
        along = t["delta_variance_along"]
        adjusted = t["q_bh"] if args.correction == "bh" else t[f"p_{args.correction}"]
        header = (f"feature {t['feature']} (rank {t['rank']}): AUROC {t['auroc']:.3f} -> {t['direction']}, "
                  f"p {t['p_value']:.3g}, {args.correction} {adjusted:.3g}{' *' if t['significant'] else ''}; "
                  f"cos with s_{best_layer} {cos_l[best_layer] or 0:.2f}; ΔF variance along it "
                  + ("n/a" if along is None else f"{along:.3f}"))
        blocks = [(header, [f"lens top: {lens_top}\nlens bottom: {lens_bottom}"], [None], None)]
        for ex in t["examples"]:
            title = (f"completion {ex['row']} ({'correct' if ex['correct'] else 'incorrect'}), token "
                     f"{ex['position']} {plots.show_token(ex['token'])!r}: {ex['activation']:.3g}")
            blocks.append((title, [c["token"] for c in ex["context"]], [c["activation"] for c in ex["context"]],
                           None))
        vmax = max((c["activation"] or 0.0 for ex in t["examples"] for c in ex["context"]), default=1.0) or 1.0
        path = plots.token_highlight(directory / f"feature_{t['rank']:02d}_{t['feature']}.png", [], [], blocks=blocks,
                                     cmap="Reds", vmin=0.0, vmax=vmax, value_label="feature activation")
        names.append(f"{directory.name}/{path.name}")
    return names
