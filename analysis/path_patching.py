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
bit-identical to an unsteered run; Q/K/V come from ``T``'s own projections on it, and per-head attention outputs from
a second ("shadow") evaluation of ``T``'s attention with its own KV cache. So the same patching works in a
teacher-forced pass and inside generation (KV cache) -- which is how accuracy is measured. It needs ``--backend hf``.

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
from typing import Any

import torch
from torch import nn

from analysis import _common as C
from analysis import plots
from analysis.cli import UsageError, prepare_out, write_json
from steering import hooks as H

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


class _ShadowKV:
    """The minimal KV cache the shadow attention call needs (``update`` only), for one layer."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pad_to: int | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        self.k = key if self.k is None else torch.cat([self.k, key], dim=-2)
        self.v = value if self.v is None else torch.cat([self.v, value], dim=-2)
        k, v = self.k, self.v
        if self.pad_to is not None and k.shape[-2] < self.pad_to:  # a preallocated live cache: match its mask width
            pad = self.pad_to - k.shape[-2]
            k = torch.cat([k, k.new_zeros(*k.shape[:-2], pad, k.shape[-1])], dim=-2)
            v = torch.cat([v, v.new_zeros(*v.shape[:-2], pad, v.shape[-1])], dim=-2)
        return k, v


class Patcher:
    """Applies the path-patching variants of the vector ``vector`` at layer ``layer`` to the block after it.

    ``model`` is the plain base (or a steered model whose vectors are all zero): the vector is added through the hook
    vocabulary at ``blocks.{layer}.hook_mlp_out`` with BEFT's exact arithmetic, so ``full`` is bit-identical to the
    checkpoint's vector loaded as a real parameter."""

    def __init__(self, model: nn.Module, layer: int, vector: torch.Tensor):
        num = H.num_layers(model)
        if not 0 <= layer <= num - 2:
            raise UsageError(f"path patching needs a block after the vector: --layer must be in 0..{num - 2} "
                             f"(the model has {num} layers), got {layer}")
        self.model = model
        self.layer = layer
        self.target = layer + 1
        self.vector = vector.detach().float().reshape(-1)
        self.n_heads, self.n_kv, self.d_head = H.attention_shape(model)
        block = H.causal_lm(model).model.layers[self.target]
        self.block = block
        self._state: dict[str, Any] = {}
        self._in_shadow = False
        self._shadow_live: Any = None
        self._shadow_cache: _ShadowKV | None = None

    # ------------------------------------------------------------------------------------------------ online values
    def _clean_ln1(self) -> torch.Tensor:
        st = self._state
        if "clean_ln1" not in st:
            st["clean_ln1"] = self.block.input_layernorm.forward(st["clean_pre"])
        return st["clean_ln1"]

    def _hooks(self, v: Variant) -> list[tuple[str, H.HookFn]]:
        L, T = self.layer, self.target
        st = self._state
        s = self.vector

        def mid(t: torch.Tensor, name: str) -> None:
            st.clear()
            st["mid"] = t

        def mlp_out(t: torch.Tensor, name: str) -> torch.Tensor:
            st["clean_pre"] = st["mid"] + t  # exactly the unsteered residual entering block T
            return (t + s.to(t.device)).to(t.dtype)  # BEFT: (down_proj(x) + bias) cast back

        out: list[tuple[str, H.HookFn]] = []
        if not v.steer:
            return out
        out += [(f"blocks.{L}.hook_resid_mid", mid), (f"blocks.{L}.hook_mlp_out", mlp_out)]
        if v.skip_layer:
            out.append((f"blocks.{T}.hook_resid_pre", lambda t, n: st["clean_pre"]))
            out.append((f"blocks.{T}.hook_resid_post", lambda t, n: (t + s.to(t.device)).to(t.dtype)))
            return out

        def ln1(t: torch.Tensor, name: str) -> torch.Tensor | None:
            if self._in_shadow:
                return None
            st["steered_ln1"] = t
            return self._clean_ln1() if v.skip_attn else None

        out.append((f"blocks.{T}.ln1.hook_normalized", ln1))
        for p in PROJECTIONS:
            heads = v.clean_heads.get(p)
            if heads:
                proj = getattr(self.block.self_attn, f"{p}_proj")

                def fn(t: torch.Tensor, name: str, _proj=proj, _heads=heads) -> torch.Tensor | None:
                    if self._in_shadow:
                        return None
                    clean = _proj.forward(self._clean_ln1())
                    return H.patch_heads(clean, _heads, self.d_head)(t, name)

                out.append((f"blocks.{T}.attn.hook_{p}", fn))
        if v.z_mode:
            def z(t: torch.Tensor, name: str) -> torch.Tensor | None:
                if self._in_shadow:
                    st["shadow_z"] = t
                    return None
                return H.patch_heads(st["shadow_z"], v.z_heads, self.d_head)(t, name)

            out.append((f"blocks.{T}.attn.hook_z", z))
        return out

    def _shadow_pre_hook(self, v: Variant):
        """Forward pre-hook on block T's self_attn: evaluate it once more on the other input (unsteered for remove-z,
        steered for inject-z), with its own KV cache, to get that run's per-head outputs (captured at hook_z)."""

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._in_shadow:
                return None
            st = self._state
            other = self._clean_ln1() if v.z_mode == "remove" else st["steered_ln1"]
            live = kwargs.get("past_key_values")
            cache = None
            if live is not None:
                restart = live is not self._shadow_live
                try:
                    restart = restart or live.get_seq_length(self.target) == 0
                except Exception:  # a cache type without per-layer lengths
                    pass
                if restart or self._shadow_cache is None:
                    self._shadow_cache, self._shadow_live = _ShadowKV(), live
                cache = self._shadow_cache
                mask = kwargs.get("attention_mask")
                cache.pad_to = int(mask.shape[-1]) if isinstance(mask, torch.Tensor) and mask.dim() == 4 else None
            kw = {k: val for k, val in kwargs.items() if k not in ("hidden_states", "past_key_values")}
            self._in_shadow = True
            try:
                mod.forward(other, past_key_values=cache, **kw)
            finally:
                self._in_shadow = False
            return None

        return pre

    @contextmanager
    def apply(self, v: Variant) -> Iterator[None]:
        """Inside the block, every forward pass of the model (teacher-forced or generating) runs variant ``v``."""
        handle = None
        self._state.clear()
        self._shadow_live, self._shadow_cache = None, None
        try:
            if v.z_mode:
                handle = self.block.self_attn.register_forward_pre_hook(self._shadow_pre_hook(v), with_kwargs=True)
            with H.hooks(self.model, self._hooks(v)):
                yield
        finally:
            if handle is not None:
                handle.remove()
            self._state.clear()
            self._shadow_live, self._shadow_cache = None, None

    @torch.no_grad()
    def logits(self, v: Variant, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with self.apply(v):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


# --------------------------------------------------------------------------------------------------------------------
# Command


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "path-patching", help="patch a layer's steering into the next block's attention / Q / K / V / heads / MLP "
                              "paths: accuracy and KL against full steering",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_args(p, forward_batch=True)
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose vector is patched (default L-2; negative counts from the end)")
    p.add_argument("--head-accuracy", action="store_true",
                   help="also measure accuracy for every per-head variant (one evaluation each: slow on big models)")
    p.add_argument("--no-accuracy", action="store_true", help="KL only (no generation-based evaluation)")
    p.add_argument("--no-heads", action="store_true", help="summary variants only")
    p.add_argument("--samples-per-problem", type=int, default=1, help="completions per problem for the KL (default 1)")
    p.set_defaults(func=run)


def kl_to_full(patcher: Patcher, variants: list[Variant], seqs: C.Sequences, args: argparse.Namespace,
               pad: int) -> tuple[dict[str, float], int]:
    device = next(patcher.model.parameters()).device
    sums = {v.name: 0.0 for v in variants}
    count = 0
    full = Variant("full")
    n_batches = -(-len(seqs) // args.forward_batch_size)
    bar = C.progress(total=n_batches * len(variants), desc="path patching (KL)", args=args, unit="pass")
    for batch in seqs.batches(args.forward_batch_size, device, pad):
        mask = batch.positions("predict")
        ref = patcher.logits(full, batch.input_ids, batch.attention_mask)[mask]
        count += int(mask.sum())
        for v in variants:
            if v.name == "full":
                bar.update(1)
                continue
            got = patcher.logits(v, batch.input_ids, batch.attention_mask)[mask]
            sums[v.name] += float(C.kl_per_token(ref, got).double().sum())
            bar.update(1)
    bar.close()
    return {k: (val / count if count else float("nan")) for k, val in sums.items()}, count


def run(args: argparse.Namespace) -> int:
    C.check_args(args)
    if args.backend != "hf":
        raise UsageError("path-patching patches through module hooks, which the 'static' generation backend bypasses; "
                         "use --backend hf")
    if args.samples_per_problem < 1:
        raise UsageError(f"--samples-per-problem must be >= 1, got {args.samples_per_problem}")
    base_id = C.base_model_id(args)
    num_layers, _ = C.model_num_layers(base_id)
    layer = num_layers - 2 if args.layer is None else (args.layer + num_layers if args.layer < 0 else args.layer)
    if not 0 <= layer <= num_layers - 2:
        raise UsageError(f"--layer {args.layer}: must name a layer with a block after it, 0..{num_layers - 2}")
    benches = C.load_benchmarks(args)
    out = prepare_out(args.out)
    model, tokenizer = C.load_plain(base_id, args)
    vectors = C.checkpoint_vectors(args.checkpoint, model)
    if layer not in vectors:
        raise UsageError(f"the checkpoint has no vector at layer {layer} (it has {sorted(vectors)}); pass --layer")
    patcher = Patcher(model, layer, vectors[layer].to(next(model.parameters()).device))
    summary, per_head = build_variants(patcher.n_heads, patcher.n_kv)
    variants = summary + ([] if args.no_heads else per_head)

    tmpl = C.template(args)
    with patcher.apply(Variant("full")):
        seqs = C.sample_sequences(model, tokenizer, C.problems_of(benches), tmpl, args,
                                  num_samples=args.samples_per_problem)
    kl, count = kl_to_full(patcher, variants, seqs, args, C.pad_id(tokenizer))
    kl["full"] = 0.0

    acc: dict[str, Any] = {}
    if not args.no_accuracy:
        todo = summary + (per_head if (args.head_accuracy and not args.no_heads) else [])
        for v in C.progress(todo, desc="path patching (accuracy)", args=args):
            with patcher.apply(v):
                acc[v.name] = C.accuracy(model, tokenizer, benches, args, tmpl)

    rows = []
    for v in variants:
        a = acc.get(v.name)
        rows.append({**v.describe(), "kl_to_full": kl[v.name], "accuracy": None if a is None else a.accuracy,
                     "accuracy_detail": None if a is None else a.per_benchmark})
    by_name = {r["name"]: r for r in rows}
    heads = heads_acc = None
    n_for = {"q": patcher.n_heads, "k": patcher.n_kv, "v": patcher.n_kv, "z": patcher.n_heads}
    if not args.no_heads:
        heads = {act: {p: [by_name[f"{act}-{p}-h{h}"]["kl_to_full"] for h in range(n_for[p])] for p in n_for}
                 for act in ("remove", "inject")}
        if args.head_accuracy and not args.no_accuracy:
            heads_acc = {act: {p: [by_name[f"{act}-{p}-h{h}"]["accuracy"] for h in range(n_for[p])] for p in n_for}
                         for act in ("remove", "inject")}

    files = []
    names = [v.name for v in summary]
    if acc:
        files.append(plots.bar_plot(out / "summary.png", names, [by_name[n]["accuracy"] for n in names],
                                    title=f"accuracy, vector of layer {layer} patched into block {layer + 1}",
                                    ylabel="accuracy",
                                    hlines={"base": by_name["base"]["accuracy"],
                                            "full": by_name["full"]["accuracy"]}).name)
    files.append(plots.bar_plot(out / "summary_kl.png", names, [by_name[n]["kl_to_full"] for n in names],
                                title="mean per-token KL(full ‖ variant)", ylabel="KL (nats)").name)
    width = max(n_for.values())
    for data, fname, label in ((heads, "heads_kl.png", "KL(full ‖ variant)"),
                               (heads_acc, "heads_accuracy.png", "accuracy")):
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
    result = {"command": "path-patching", "checkpoint": str(args.checkpoint), "base_model": base_id, "layer": layer,
              "target_layer": layer + 1, "vector_norm": float(vectors[layer].norm()),
              "attention": {"n_heads": patcher.n_heads, "n_kv_heads": patcher.n_kv, "head_dim": patcher.d_head},
              "variants": rows, "heads": heads, "heads_accuracy": heads_acc, "num_sequences": len(seqs),
              "num_tokens": count, "settings": C.sampling_settings(args), "plots": files}
    write_json(out / "result.json", result)
    print(f"path-patching: {len(variants)} variants (layer {layer} -> block {layer + 1}); wrote {out / 'result.json'}")
    return 0
