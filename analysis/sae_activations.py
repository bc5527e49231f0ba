"""The token vectors ``analysis diffsae`` trains its SAE on, on disk, and one pass of a trained SAE over them.

- **The store** (``OUT/activations``): :func:`collect` records the SAE's input at one layer for every sampled sequence
  (ΔF = steered − unsteered residual, or the steered residual) and streams it through a :class:`ChunkWriter` per split
  (``train`` / ``heldout``) into safetensors chunks; :func:`read_chunk` reads one back, :func:`batch_stream` draws
  the SAE's training batches from them, :func:`clear_activations` removes a previous run's chunks.
- **Feature statistics**: :func:`feature_pass` encodes every stored vector once and gathers :class:`FeatureStats`
  (per-completion means, firing counts, top activations, ΔF variance shares, reconstruction metrics);
  :func:`context_activations` re-encodes the few completions shown as top-activating examples.

In ``analysis`` rather than ``steering`` because it reads the commands' sampled sequences (``analysis._common``) and
draws their progress bars; the SAE itself is ``steering/sae.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from analysis import _common, output
import steering.sae

CHUNK_GLOB = "{split}-*.safetensors"
SPLITS = ("train", "heldout")


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

