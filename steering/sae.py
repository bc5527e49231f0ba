"""A small sparse autoencoder (TopK or L1), trained on a stream of activation vectors, saved in SAELens's layout.

Why our own and not SAELens: ``sae-lens`` 6.x does install next to transformers 5.17 and 5.24 and its ``SAETrainer``
does take any iterator of activation tensors, but it brings 35 more packages (transformer-lens, scipy, statsmodels,
plotly, nltk, babe, py2store, ...), about a minute of install per CI leg, several seconds of import, and a
DeprecationWarning raised inside transformer-lens at import. What ``analysis diffsae`` needs is a few dozen lines, so
it lives here; the weights are written in SAELens 6's own on-disk layout (:func:`save_saelens`), so a user who has
SAELens opens them with ``sae_lens.SAE.load_from_disk(DIR)``. See docs/analysis.md, "diffsae".

The model (SAELens's ``topk`` / ``standard`` inference architectures, with ``apply_b_dec_to_input``)::

    pre  = (x − b_dec) @ W_enc + b_enc                 W_enc (d_in, d_sae), b_enc (d_sae,)
    a    = TopK_k(pre) then ReLU   |   ReLU(pre)       (sparsity "topk" | "l1")
    x̂    = a @ W_dec + b_dec                           W_dec (d_sae, d_in), rows unit-norm, b_dec (d_in,)

Training (:func:`train`), following Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") for TopK and
Bricken et al. 2023 for L1:

- inputs are scaled by one scalar ``c`` so that their mean squared distance from their mean is ``d_in`` (the learning
  rate then means the same for any layer or model); ``b_dec`` starts at the data mean, ``W_dec`` rows at random unit
  vectors and ``W_enc = W_decᵀ``; after training the scale is folded back (:meth:`SparseAutoencoder.unscale`), so the
  saved SAE reads raw activations and its activations are in the input's units (a decoder row has norm 1);
- loss = ‖x − x̂‖² / d_in (the fraction of variance unexplained, given the scaling), + ``l1_coeff`` · Σ a / √d_in for
  L1, + ``aux_coeff`` · AuxK loss for TopK (the dead latents' top-``k_aux`` reconstruction of the residual, which
  revives dead features; Gao et al.'s k_aux = d_in / 2, coefficient 1/32);
- Adam; the decoder rows are kept at unit norm (the gradient component along each row is removed before the step and
  the rows renormalised after it), so the activation size, not the row norm, carries a feature's magnitude and the
  L1 penalty cannot be dodged by growing the decoder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SPARSITIES = ("topk", "l1")
SAELENS_CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
# The SAELens version whose format we write: its loader treats cfg files of versions < 6.0 as the old format.
SAELENS_FORMAT_VERSION = "6.54.12"


class SAEError(ValueError):
    """A bad SAE setting (dictionary size, k, learning rate, ...)."""


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    sparsity: str = "topk"  # topk | l1
    k: int = 32  # active features per token (topk)
    l1_coeff: float = 0.1  # weight of the L1 penalty (l1)

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(f"d_in and d_sae must be >= 1, got {self.d_in}, {self.d_sae}")
        if self.sparsity not in SPARSITIES:
            raise SAEError(f"sparsity must be one of {SPARSITIES}, got {self.sparsity!r}")
        if self.sparsity == "topk" and not 1 <= self.k <= self.d_sae:
            raise SAEError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")
        if self.sparsity == "l1" and not (self.l1_coeff >= 0 and math.isfinite(self.l1_coeff)):
            raise SAEError(f"l1_coeff must be a finite number >= 0, got {self.l1_coeff}")


class SparseAutoencoder(nn.Module):
    """``encode`` / ``decode`` / ``forward`` of the model in the module docstring, in fp32."""

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.sparsity == "l1":
            return pre.relu()
        return _topk_relu(pre, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(x))

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂, a)``."""
        a = self.encode(x)
        return self.decode(a), a

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient along the row (it would only change the row's norm, which
        the renormalisation undoes; removing it first keeps Adam's moments from filling up with it)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec

    @torch.no_grad()
    def unscale(self, scale: float) -> None:
        """Make an SAE trained on ``scale · x`` read ``x`` itself: its activations and reconstruction become those of
        the scaled input divided by ``scale`` (exact: TopK and ReLU commute with a positive factor)."""
        self.b_enc /= scale
        self.b_dec /= scale


# --------------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 4096  # vectors per step
    lr: float = 1e-3
    seed: int = 0
    aux_coeff: float = 1 / 32  # AuxK loss weight (topk only; 0 = off)
    dead_window: int = 200  # steps without firing after which a feature counts as dead for AuxK

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "dead_window"):
            if getattr(self, name) < 1:
                raise SAEError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SAEError(f"lr must be a finite number > 0, got {self.lr}")
        if not (self.aux_coeff >= 0 and math.isfinite(self.aux_coeff)):
            raise SAEError(f"aux_coeff must be a finite number >= 0, got {self.aux_coeff}")


@dataclass
class StepStats:
    step: int
    loss: float
    fvu: float  # fraction of variance unexplained on this batch (1 − explained variance)
    l0: float  # mean active features per vector
    dead: int  # features that have not fired within the dead window


def input_scale(sample: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(c, mean)``: the scalar that makes the mean squared distance of ``c · x`` from its mean ``d_in``, and the
    mean of ``sample`` (n, d_in)."""
    x = sample.double()
    mean = x.mean(0)
    msd = float(((x - mean) ** 2).sum(-1).mean())
    if not msd > 0:
        raise SAEError("the SAE's training vectors are all the same (zero variance): there is nothing to learn")
    return math.sqrt(x.shape[1] / msd), mean.float()


def _topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest pre-activations of each row, ReLU'd, in place; zeros elsewhere."""
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def _aux_loss(sae: SparseAutoencoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK: reconstruct the main reconstruction's error from the top ``k_aux`` *dead* latents' pre-activations,
    normalised by the error's own variance (Gao et al. 2024, section A.2)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(sae.cfg.d_in // 2 or 1, n_dead)
    acts = _topk_relu(pre.masked_fill(~dead, float("-inf")), k_aux)
    recon = acts @ sae.W_dec  # the error has no bias: b_dec is in the main reconstruction already
    denom = ((residual - residual.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-12)
    return ((recon - residual) ** 2).sum(-1).mean() / denom


def train(cfg: SAEConfig, tc: TrainConfig, batches: Callable[[], Iterator[torch.Tensor]], *,
          init_sample: torch.Tensor, device: str | torch.device = "cpu",
          on_step: Callable[[StepStats], None] | None = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train an SAE for ``tc.steps`` steps on ``batches()`` (an iterator of ``(n, d_in)`` tensors; it is called again
    whenever it runs out, i.e. once per epoch). ``init_sample`` (vectors from the same data) sets the input scale and
    ``b_dec``. ``on_step`` sees every step's statistics (for a progress bar).

    Returns the SAE (already :meth:`~SparseAutoencoder.unscale`\\ d: it reads raw vectors) and a summary: the scale,
    the last step's statistics, the number of vectors seen."""
    gen = torch.Generator().manual_seed(tc.seed)
    scale, mean = input_scale(init_sample)
    sae = SparseAutoencoder(cfg, generator=gen)
    with torch.no_grad():
        sae.b_dec.copy_(mean * scale)
    sae.to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=tc.lr)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
    stream = batches()
    seen = 0
    epochs = 0
    last: StepStats | None = None
    for step in range(1, tc.steps + 1):
        x = next(stream, None)
        if x is None:
            epochs += 1
            stream = batches()
            x = next(stream, None)
            if x is None:
                raise SAEError("the SAE's training data is empty")
        x = x.to(device, torch.float32) * scale
        pre = sae.pre_activation(x)
        a = sae.activate(pre)
        x_hat = sae.decode(a)
        err = ((x_hat - x) ** 2).sum(-1).mean()
        loss = err / cfg.d_in
        if cfg.sparsity == "l1":
            loss = loss + cfg.l1_coeff * a.sum(-1).mean() / math.sqrt(cfg.d_in)
        fired = (a > 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + 1)
        dead = since_fired >= tc.dead_window
        if cfg.sparsity == "topk" and tc.aux_coeff > 0:
            loss = loss + tc.aux_coeff * _aux_loss(sae, pre, (x - x_hat).detach(), dead)
        if not torch.isfinite(loss):
            raise SAEError(f"the SAE's loss is not finite at step {step} (lower the learning rate)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_gradient()
        opt.step()
        sae.normalize_decoder()
        seen += int(x.shape[0])
        with torch.no_grad():
            var = ((x - x.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-12)
            last = StepStats(step, float(loss), float(err / var), float((a > 0).sum(-1).float().mean()),
                             int(dead.sum()))
        if on_step is not None:
            on_step(last)
    sae.eval()
    sae.unscale(scale)
    return sae, {"input_scale": scale, "vectors_seen": seen, "epochs_completed": epochs,
                 "last_step": asdict(last) if last else None}


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


class ReconstructionStats:
    """Running sums over vectors for MSE, explained variance and L0 (fp64)."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.sq_err = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = 0.0
        self.active = 0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, a: torch.Tensor) -> None:
        xd = x.double()
        self.n += int(x.shape[0])
        self.sq_err += float(((x_hat.double() - xd) ** 2).sum())
        self.sum_x += xd.sum(0).cpu()
        self.sum_sq += float((xd ** 2).sum())
        nz = a > 0
        self.active += int(nz.sum())
        self.fired |= nz.any(0).cpu()

    def metrics(self) -> dict[str, Any]:
        if self.n == 0:
            return {"num_vectors": 0, "mse": None, "explained_variance": None, "l0": None}
        d = int(self.sum_x.shape[0])
        total_var = self.sum_sq - float(self.sum_x @ self.sum_x) / self.n  # Σ‖x − x̄‖²
        return {"num_vectors": self.n, "mse": self.sq_err / (self.n * d),
                "explained_variance": 1 - self.sq_err / total_var if total_var > 0 else None,
                "l0": self.active / self.n}


# --------------------------------------------------------------------------------------------------------------------
# SAELens on-disk layout


def saelens_cfg(sae: SparseAutoencoder, *, hook_name: str, model_name: str | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` SAELens 6's ``SAE.load_from_disk`` reads: the fields of its ``TopKSAEConfig`` (architecture
    ``topk``) or ``StandardSAEConfig`` (``standard``), and a ``metadata`` block (``sae_lens_version`` >= 6 tells its
    loader this is the 6.x format). ``rescale_acts_by_decoder_norm`` is false: our decoder rows are unit-norm
    already."""
    cfg = {"architecture": "topk" if sae.cfg.sparsity == "topk" else "standard", "d_in": sae.cfg.d_in,
           "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                        "hook_name": hook_name, "model_name": model_name, **(extra or {})}}
    if sae.cfg.sparsity == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    return cfg


def save_saelens(sae: SparseAutoencoder, directory: str | os.PathLike, *, hook_name: str,
                 model_name: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``DIR/cfg.json`` + ``DIR/sae_weights.safetensors`` (W_enc, b_enc, W_dec, b_dec), atomically
    (``steering.files.publish_dir``)."""
    from safetensors.torch import save_file

    from steering.files import publish_dir

    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with publish_dir(directory) as tmp:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS_FILE))
        (tmp / SAELENS_CFG_FILE).write_text(
            json.dumps(saelens_cfg(sae, hook_name=hook_name, model_name=model_name, extra=extra), indent=2) + "\n")
    return Path(directory)


def load_saelens(directory: str | os.PathLike) -> SparseAutoencoder:
    """Read back what :func:`save_saelens` wrote (safetensors + JSON only)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        cfg = json.loads((directory / SAELENS_CFG_FILE).read_text())
        arch = cfg["architecture"]
        if arch not in ("topk", "standard"):
            raise SAEError(f"{directory}: architecture {arch!r} is not one this module writes (topk, standard)")
        sae = SparseAutoencoder(SAEConfig(int(cfg["d_in"]), int(cfg["d_sae"]),
                                          "topk" if arch == "topk" else "l1", int(cfg.get("k", 1))))
    except SAEError:
        raise  # already says what is wrong (it is a ValueError: keep it out of the clause below)
    except (OSError, KeyError, ValueError) as e:
        raise SAEError(f"{directory}: not an SAE in SAELens layout ({e})") from None
    sae.load_state_dict(load_file(str(directory / SAELENS_WEIGHTS_FILE)))
    return sae.eval()
