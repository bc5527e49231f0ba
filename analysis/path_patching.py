"""``python -m analysis path-patching``: through which path of the next block does a layer's vector act?

Take the vector ``s`` of one layer ``ℓ`` (default ``L−2``, the penultimate layer; its checkpoint vector alone) and the
block right after it, ``T = ℓ + 1`` (for ``ℓ = L−2``: the last layer). Feed ``T`` two versions of its input, the
steered residual and the unsteered one, and mix them per path:

- ``base``: no steering.  ``full``: ``s`` added at ``ℓ``, nothing patched.
- ``skip-attn``: ``T``'s attention reads the unsteered residual (``blocks.T.ln1.hook_normalized`` gets the unsteered
  run's value) while the residual stream and ``T``'s MLP keep the vector.
- ``skip-layer``: ``T`` runs on the unsteered residual (``blocks.T.hook_resid_pre`` gets the unsteered value) and
  ``s`` is added after it (at ``blocks.T.hook_resid_post``).
- ``remove-{q,k,v}-h{h}`` / ``-all``: in ``full``, head ``h`` (or every head) of ``T``'s Q, K or V projection gets
  the unsteered value. GQA-aware: K/V heads are the key/value heads (``n_kv_heads``), Q heads the query heads.
  Removing Q, K and V of every head at once is exactly ``skip-attn``.
- ``inject-{q,k,v}-h{h}`` / ``-all``: in ``skip-attn``, head ``h`` (or every head) of one projection gets the
  steered value back (``inject-v-all`` = "the vector only in V").
- ``remove-z-h{h}``: in ``full``, head ``h``'s attention output (``hook_z``, the input of ``o_proj``) gets its
  unsteered value; ``inject-z-h{h}``: in ``skip-attn``, head ``h``'s output gets its steered value.

The unsteered values are computed *online*, in the same forward pass: layers before ``T`` are the same in both runs
except for ``s`` itself, so the unsteered input of ``T`` is ``hook_resid_mid_ℓ + (MLP output of ℓ without s)``,
bit-identical to an unsteered run; Q/K/V come from ``T``'s own projections on it. Per-head attention outputs of the
other run come from a second ("shadow") forward of the decoder under that run's variant, with its own
``transformers.DynamicCache`` during generation. Everything goes through the model's own forward and the hook
vocabulary, so the same patching works in a teacher-forced pass and inside generation (KV cache) -- which is how
accuracy is measured. It needs ``--backend hf``.

Metrics per variant: ``kl_to_full``, the mean per-token KL(p_full ‖ p_variant) over the positions that predict the
completion tokens of completions sampled from ``full``; and ``accuracy`` (via ``analysis.evaluate``) for the summary
variants (``base``, ``full``, ``skip-attn``, ``skip-layer``, ``remove/inject-{q,k,v}-all``), and for every per-head
variant with ``--head-accuracy``. The paper's finding: ``skip-attn`` ≈ ``full``; the effect flows through V→O and the
MLP, not through the attention pattern.

result.json::

    {"command": "path-patching", "checkpoint", "base_model", "layer": ℓ, "target_layer": T, "vector_norm",
     "attention": {"n_heads", "n_kv_heads", "head_dim"},
     "variants": [{"name", "family": "summary"|"head", "projection": q|k|v|z|null, "action": remove|inject|null,
                   "heads": [..] | "all" | null, "kl_to_full", "accuracy": null | number,
                   "accuracy_detail": null | {per benchmark}}, ...],
     "heads": {"remove": {"q": [kl per head], "k": [...], "v": [...], "z": [...]}, "inject": {...}},
     "heads_accuracy": same shape or null,
     "num_sequences", "num_tokens", "settings", "plots"}

Plots: ``summary.png`` (accuracy and KL of the summary variants), ``heads_kl.png`` (per-head KL, one row per
projection × action), ``heads_accuracy.png`` with ``--head-accuracy``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from analysis import _common
from analysis import plots
from analysis import cli, output, settings
from analysis.cli import UsageError
from steering import compat
from steering import hooks
from steering import vectors as sv
from steering.generation import pad_id_of

PROJECTIONS = ("q", "k", "v")


@dataclass
class Variant:
    name: str
    steer: bool = True
    skip_attn: bool = False
    skip_layer: bool = False
    clean_heads: dict[str, list[int]] = field(default_factory=dict)  # projection -> heads given unsteered values
    z_mode: str | None = None  # "remove" (clean z in full) / "inject" (steered z in skip-attn)
    z_heads: list[int] = field(default_factory=list)
    family: str = "summary"
    projection: str | None = None
    action: str | None = None
    heads: Any = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "projection": self.projection, "action": self.action,
                "heads": self.heads}


def build_variants(n_heads: int, n_kv: int) -> tuple[list[Variant], list[Variant]]:
    """(summary variants, per-head variants)."""
    heads = {"q": list(range(n_heads)), "k": list(range(n_kv)), "v": list(range(n_kv))}
    summary = [Variant("base", steer=False), Variant("full"), Variant("skip-attn", skip_attn=True),
               Variant("skip-layer", skip_layer=True)]
    for p in PROJECTIONS:
        summary.append(Variant(f"remove-{p}-all", clean_heads={p: heads[p]}, projection=p, action="remove",
                               heads="all"))
    for p in PROJECTIONS:
        summary.append(Variant(f"inject-{p}-all", clean_heads={o: heads[o] for o in PROJECTIONS if o != p},
                               projection=p, action="inject", heads="all"))
    per_head = []
    for p in PROJECTIONS:
        for h in heads[p]:
            per_head.append(Variant(f"remove-{p}-h{h}", clean_heads={p: [h]}, family="head", projection=p,
                                    action="remove", heads=[h]))
        for h in heads[p]:
            clean = {o: list(heads[o]) for o in PROJECTIONS}
            clean[p] = [x for x in heads[p] if x != h]
            per_head.append(Variant(f"inject-{p}-h{h}", clean_heads=clean, family="head", projection=p,
                                    action="inject", heads=[h]))
    for h in range(n_heads):
        per_head.append(Variant(f"remove-z-h{h}", z_mode="remove", z_heads=[h], family="head", projection="z",
                                action="remove", heads=[h]))
        per_head.append(Variant(f"inject-z-h{h}", skip_attn=True, z_mode="inject", z_heads=[h], family="head",
                                projection="z", action="inject", heads=[h]))
    return summary, per_head


class Patcher:
    """Applies the path-patching variants of the vector ``vector`` at layer ``layer`` to the block after it.

    ``model`` is the plain base (or a steered model whose vectors are all zero): the vector is added through the hook
    vocabulary at ``blocks.{layer}.hook_mlp_out`` with BEFT's exact arithmetic, so ``full`` is bit-identical to the
    checkpoint's vector loaded as a real parameter.

    Everything goes through the model's own forward: hooks of the hook vocabulary read and replace activations, and
    the per-head ``z`` variants get the other run's attention outputs from a second ("shadow") forward of the decoder
    under the other variant (``skip-attn`` for remove-z, ``full`` for inject-z), started from a forward pre-hook on the
    decoder with the same inputs and, during generation, its own ``transformers.DynamicCache``. No attention module is
    ever called by hand, so nothing depends on the keyword names of its forward."""

    def __init__(self, model: nn.Module, layer: int, vector: torch.Tensor):
        check_layer(layer, hooks.num_layers(model))
        self.model = model
        self.layer = layer
        self.target = layer + 1
        self.vector = vector.detach().float().reshape(-1)
        self.n_heads, self.n_kv, self.d_head = hooks.attention_shape(model)
        self.decoder = hooks.causal_lm(model).model
        self.block = self.decoder.layers[self.target]
        self._in_shadow = False
        self._shadow_cache: Any = None
        self._live_cache: Any = None

    # ------------------------------------------------------------------------------------------------ online values
    def _clean_ln1(self, st: dict[str, Any]) -> torch.Tensor:
        if "clean_ln1" not in st:
            # .forward, not __call__: this is a second evaluation of the norm, and must not fire its hook point again
            st["clean_ln1"] = self.block.input_layernorm.forward(st["clean_pre"])
        return st["clean_ln1"]

    def _hooks(self, v: Variant, st: dict[str, Any], shadow: dict[str, Any]) -> list[tuple[str, hooks.HookFn]]:
        """The hooks of variant ``v``; ``st`` is this run's state, ``shadow`` the state of the shadow run (``z``)."""
        L, T = self.layer, self.target
        s = self.vector

        def mid(t: torch.Tensor, name: str) -> None:
            st.clear()
            st["mid"] = t

        def mlp_out(t: torch.Tensor, name: str) -> torch.Tensor:
            st["clean_pre"] = st["mid"] + t  # exactly the unsteered residual entering block T
            return sv.add_to_hidden(t, s)  # what BEFT does: (down_proj(x) + bias) in fp32, cast back

        out: list[tuple[str, hooks.HookFn]] = []
        if not v.steer:
            return out
        out += [(f"blocks.{L}.hook_resid_mid", mid), (f"blocks.{L}.hook_mlp_out", mlp_out)]
        if v.skip_layer:
            out.append((f"blocks.{T}.hook_resid_pre", lambda t, n: st["clean_pre"]))
            out.append((f"blocks.{T}.hook_resid_post", lambda t, n: sv.add_to_hidden(t, s)))
            return out
        if v.skip_attn:
            out.append((f"blocks.{T}.ln1.hook_normalized", lambda t, n: self._clean_ln1(st)))
        for p in PROJECTIONS:
            heads = v.clean_heads.get(p)
            if heads:
                proj = getattr(self.block.self_attn, f"{p}_proj")

                def fn(t: torch.Tensor, name: str, _proj=proj, _heads=heads) -> torch.Tensor:
                    clean = _proj.forward(self._clean_ln1(st))  # .forward: no second firing of this hook point
                    return hooks.patch_heads(clean, _heads, self.d_head)(t, name)

                out.append((f"blocks.{T}.attn.hook_{p}", fn))
        if v.z_mode:
            out.append((f"blocks.{T}.attn.hook_z", lambda t, n: hooks.patch_heads(shadow["z"], v.z_heads, self.d_head)(t, n)))
        return out

    def _run_shadow(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the decoder: run it once more, under the shadow variant, on the same inputs."""
        if self._in_shadow:
            return None
        key = compat.cache_kwarg(decoder)
        live = kwargs.get(key)
        cache = None
        if live is not None:
            if not isinstance(live, DynamicCache):
                raise UsageError(f"path patching of per-head outputs needs a dynamic KV cache during generation, got "
                                 f"{type(live).__name__}; generate with the default cache (--backend hf)")
            if live is not self._live_cache or live.get_seq_length() == 0:  # a new generation: a new shadow cache
                self._live_cache, self._shadow_cache = live, DynamicCache(config=hooks.causal_lm(self.model).config)
            cache = self._shadow_cache
        self._in_shadow = True
        try:
            decoder(*args, **{**kwargs, key: cache})
        finally:
            self._in_shadow = False
        return None

    @contextmanager
    def apply(self, v: Variant) -> Iterator[None]:
        """Inside the block, every forward pass of the model (teacher-forced or generating) runs variant ``v``."""
        state: dict[str, Any] = {}
        shadow: dict[str, Any] = {}
        patches = _only_when(self._hooks(v, state, shadow), lambda: not self._in_shadow)
        handle = None
        if v.z_mode:
            other = Variant("full") if v.z_mode == "inject" else Variant("skip-attn", skip_attn=True)
            capture = (f"blocks.{self.target}.attn.hook_z", lambda t, n: shadow.__setitem__("z", t))
            patches += _only_when(self._hooks(other, {}, {}) + [capture], lambda: self._in_shadow)
        self._shadow_cache = self._live_cache = None
        try:
            if v.z_mode:
                handle = self.decoder.register_forward_pre_hook(self._run_shadow, with_kwargs=True)
            with hooks.hooks(self.model, patches):
                yield
        finally:
            if handle is not None:
                handle.remove()
            self._shadow_cache = self._live_cache = None

    @torch.no_grad()
    def logits(self, v: Variant, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with self.apply(v):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def check_layer(layer: int, num_layers: int, given: int | None = None) -> None:
    """The patched layer needs a block after it: ``0 <= layer <= num_layers - 2`` (``given``: the ``--layer`` the
    user typed, which may count from the end)."""
    if not 0 <= layer <= num_layers - 2:
        raise UsageError(f"--layer {layer if given is None else given}: must name a layer with a block after it, "
                         f"0..{num_layers - 2}")


def _only_when(patches: list[tuple[str, hooks.HookFn]], active) -> list[tuple[str, hooks.HookFn]]:
    """The same hooks, acting only while ``active()`` is true (the main run's hooks stay out of the shadow run's way,
    and the other way round)."""
    return [(name, (lambda t, n, _fn=fn: _fn(t, n) if active() else None)) for name, fn in patches]


# --------------------------------------------------------------------------------------------------------------------
# Command


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "path-patching", run, __doc__, forward_batch=True,
                                   help="patch a layer's steering into the next block's attention / Q / K / V / "
                                        "heads / MLP paths: accuracy and KL against full steering")
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose vector is patched (default L-2; negative counts from the end)")
    p.add_argument("--head-accuracy", action="store_true",
                   help="also measure accuracy for every per-head variant (one evaluation each: slow on big models)")
    p.add_argument("--no-accuracy", action="store_true", help="KL only (no generation-based evaluation)")
    p.add_argument("--no-heads", action="store_true", help="summary variants only")
    p.add_argument("--samples-per-problem", type=int, default=1, help="completions per problem for the KL (default 1)")


def kl_to_full(patcher: Patcher, variants: list[Variant], seqs: _common.Sequences, *, batch_size: int, pad: int,
               quiet: bool = False) -> tuple[dict[str, float], int]:
    """Each variant's mean per-token KL(full ‖ variant) over the positions that predict completion tokens, and the
    number of those positions."""
    device = next(patcher.model.parameters()).device
    sums = {v.name: 0.0 for v in variants}
    count = 0
    full = Variant("full")
    n_batches = -(-len(seqs) // batch_size)
    bar = output.progress(total=n_batches * len(variants), desc="path patching (KL)", quiet=quiet, unit="pass")
    for batch in seqs.batches(batch_size, device, pad):
        mask = batch.positions("predict")
        ref = patcher.logits(full, batch.input_ids, batch.attention_mask)[mask]
        count += int(mask.sum())
        for v in variants:
            if v.name == "full":
                bar.update(1)
                continue
            got = patcher.logits(v, batch.input_ids, batch.attention_mask)[mask]
            sums[v.name] += float(_common.kl_per_token(ref, got).double().sum())
            bar.update(1)
    bar.close()
    return {k: (val / count if count else float("nan")) for k, val in sums.items()}, count


def run(args: argparse.Namespace) -> int:
    layer, checked = _checked_layer(args)
    ck = cli.load_checkpoint(args, checked, plain=True)
    patcher = Patcher(ck.model, layer, ck.vectors[layer].to(next(ck.model.parameters()).device))
    summary, per_head = build_variants(patcher.n_heads, patcher.n_kv)
    variants = summary + ([] if args.no_heads else per_head)

    tmpl = cli.template(args)
    evals = settings.from_args(args)
    with patcher.apply(Variant("full")):
        seqs = _common.sample_sequences(ck.model, ck.tokenizer, _common.problems_of(ck.benches), tmpl, evals,
                                        num_samples=args.samples_per_problem, progress=not args.no_progress)
    kl, count = kl_to_full(patcher, variants, seqs, batch_size=args.forward_batch_size, pad=pad_id_of(ck.tokenizer),
                           quiet=args.no_progress)
    kl["full"] = 0.0
    acc: dict[str, Any] = {}
    if not args.no_accuracy:
        todo = summary + (per_head if (args.head_accuracy and not args.no_heads) else [])
        for v in output.progress(todo, desc="path patching (accuracy)", quiet=args.no_progress):
            with patcher.apply(v):
                acc[v.name] = _common.accuracy(ck.model, ck.tokenizer, ck.benches, evals, tmpl)

    rows = [{**v.describe(), "kl_to_full": kl[v.name],
             "accuracy": None if v.name not in acc else acc[v.name].accuracy,
             "accuracy_detail": None if v.name not in acc else acc[v.name].per_benchmark} for v in variants]
    heads, heads_acc = _head_tables(patcher, rows, args)
    files = _plots(ck.out, layer, [v.name for v in summary], rows, (heads, heads_acc), max(_heads_of(patcher).values()),
                   with_accuracy=bool(acc))
    result = {"command": "path-patching", "checkpoint": str(args.checkpoint), "base_model": ck.base_id, "layer": layer,
              "target_layer": layer + 1, "vector_norm": float(ck.vectors[layer].norm()),
              "attention": {"n_heads": patcher.n_heads, "n_kv_heads": patcher.n_kv, "head_dim": patcher.d_head},
              "variants": rows, "heads": heads, "heads_accuracy": heads_acc, "num_sequences": len(seqs),
              "num_tokens": count, "settings": settings.record(args), "plots": files}
    summary_line = f"path-patching: {len(variants)} variants (layer {layer} -> block {layer + 1})"
    return output.finish(ck.out, result, summary_line)


def _checked_layer(args: argparse.Namespace) -> tuple[int, cli.CheckedCheckpoint]:
    """Every check before anything loads; the patched layer (default L-2, negative counts from the end) and the
    checked checkpoint."""
    cli.check_args(args)
    if args.backend != "hf":
        raise UsageError(f"path-patching patches through module hooks, which the {args.backend!r} generation backend "
                         "bypasses (the static cache replays a compiled forward on CUDA; vLLM runs its own model); use "
                         "--backend hf")
    cli.check_positive(args, "samples_per_problem")
    checked = cli.check_checkpoint(args)
    num_layers = checked.num_layers
    layer = num_layers - 2 if args.layer is None else (args.layer + num_layers if args.layer < 0 else args.layer)
    check_layer(layer, num_layers, given=args.layer)
    if layer not in checked.vectors:
        raise UsageError(f"the checkpoint has no vector at layer {layer} (it has {sorted(checked.vectors)}); pass "
                         "--layer")
    return layer, checked


def _head_tables(patcher: Patcher, rows: list[dict[str, Any]], args: argparse.Namespace):
    """``(heads, heads_accuracy)``: per action and projection, each head's KL (and accuracy, with
    ``--head-accuracy``); None without per-head variants."""
    if args.no_heads:
        return None, None
    by_name = {r["name"]: r for r in rows}

    def table(key: str) -> dict[str, dict[str, list[Any]]]:
        return {act: {p: [by_name[f"{act}-{p}-h{h}"][key] for h in range(n)] for p, n in _heads_of(patcher).items()}
                for act in ("remove", "inject")}

    return table("kl_to_full"), (table("accuracy") if args.head_accuracy and not args.no_accuracy else None)


def _heads_of(patcher: Patcher) -> dict[str, int]:
    """Heads per patched projection: query heads for Q and the attention output, key/value heads for K and V."""
    return {"q": patcher.n_heads, "k": patcher.n_kv, "v": patcher.n_kv, "z": patcher.n_heads}


def _plots(out: Path, layer: int, names: list[str], rows: list[dict[str, Any]], head_tables: tuple[Any, Any],
           width: int, *, with_accuracy: bool) -> list[str]:
    """summary.png (accuracy), summary_kl.png, and the per-head heatmaps (``width``: the most heads of a
    projection); their file names."""
    by_name = {r["name"]: r for r in rows}
    files = []
    if with_accuracy:
        files.append(plots.bar_plot(out / "summary.png", names, [by_name[n]["accuracy"] for n in names],
                                    title=f"accuracy, vector of layer {layer} patched into block {layer + 1}",
                                    ylabel="accuracy",
                                    hlines={"base": by_name["base"]["accuracy"],
                                            "full": by_name["full"]["accuracy"]}).name)
    files.append(plots.bar_plot(out / "summary_kl.png", names, [by_name[n]["kl_to_full"] for n in names],
                                title="mean per-token KL(full ‖ variant)", ylabel="KL (nats)").name)
    for data, fname, label in zip(head_tables, ("heads_kl.png", "heads_accuracy.png"),
                                  ("KL(full ‖ variant)", "accuracy")):
        if data is None:
            continue
        row_labels, matrix = [], []
        for act in ("remove", "inject"):
            for p in ("q", "k", "v", "z"):
                row_labels.append(f"{act} {p}")
                vals = list(data[act][p])
                matrix.append(vals + [None] * (width - len(vals)))
        files.append(plots.heatmap(out / fname, matrix, row_labels, list(range(width)), title=f"per-head {label}",
                                   xlabel="head (K/V: key-value head)", ylabel="variant", cmap="viridis").name)
    return files
