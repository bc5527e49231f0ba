"""``python -m analysis transfer``: copy trained vectors, unchanged, into other base models of the same shape.

Every donor checkpoint's vectors (same layer indices, same values) are set on every recipient base and evaluated.
For donor ``d`` and recipient ``r``::

    score(d, r) = (acc(d's vectors on r) − acc(r)) / (acc(r's self-trained vectors on r) − acc(r))

1 = as good as the recipient's own steering, 0 = no gain over the recipient base (null without a self-trained
checkpoint for ``r``, or when it gives no gain). Donors are ``--checkpoint`` and ``--donors``; recipients are
``--recipients`` (default: the donors' own base models); the self-trained checkpoint of a recipient is given with
``--self-trained BASE=DIR`` (default: the first donor trained on that base). A donor whose vectors do not fit a
recipient (other hidden size, or a layer the recipient lacks) is a clear error, found before any model loads, unless
``--skip-incompatible`` (then its cells are null). A donor evaluated on its own base reproduces its own evaluation
exactly (zero vectors on the other layers are bit-identical to none). Accuracy comes from ``analysis.evaluate``.

result.json::

    {"command": "transfer", "donors": [{"label", "path", "base_model", "layers", "hidden_size"}],
     "recipients": [{"label", "model", "num_hidden_layers", "hidden_size", "base_accuracy", "self_trained",
                     "self_trained_accuracy"}],
     "accuracy": [[...recipients] per donor],      # null where incompatible
     "score": [[...recipients] per donor],
     "incompatible": [{"donor", "recipient", "reason"}],
     "detail": {"donor|recipient": per-benchmark accuracies}, "settings", "plots"}

Plots: ``score.png`` (donors × recipients), ``accuracy.png`` (with the recipient base and self-trained rows).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
from pathlib import Path
from typing import Any

from analysis import _common
from analysis import cli, output, plots, settings
from analysis.cli import UsageError
from analysis.table import relative_improvement
from steering import vectors as sv


def _label(path_or_id: str) -> str:
    from train.checkpointing import CHECKPOINT_PREFIX

    p = Path(path_or_id)
    if p.name.startswith(CHECKPOINT_PREFIX) and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or str(path_or_id)


def fits(meta: dict[str, Any], num_layers: int, hidden: int) -> str | None:
    """None if a checkpoint's vectors fit a model of this shape, else the reason. Unlike
    ``steering.vectors.check_fits`` (which raises on loaded vectors) it reads only steering.json and returns the
    reason, because ``--skip-incompatible`` records it in result.json's ``incompatible`` and goes on."""
    if int(meta["hidden_size"]) != hidden:
        return f"hidden size {meta['hidden_size']} != {hidden}"
    if max(meta["layers"]) >= num_layers:
        return f"layers {meta['layers']} need >= {max(meta['layers']) + 1} layers, the recipient has {num_layers}"
    return None


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "transfer", run, __doc__, checkpoint="optional",
                                   help="copy vectors from donor checkpoints into recipient bases of the same shape "
                                        "and evaluate")
    p.add_argument("--donors", nargs="+", default=[], metavar="DIR", help="donor steering checkpoints")
    p.add_argument("--recipients", nargs="+", default=None, metavar="BASE",
                   help="recipient base models (Hub ids or dirs); default: the donors' base models")
    p.add_argument("--self-trained", nargs="+", default=[], metavar="BASE=DIR",
                   help="each recipient's own steering checkpoint (for the score's denominator)")
    p.add_argument("--skip-incompatible", action="store_true",
                   help="leave donor/recipient pairs of different shapes empty instead of failing")


def run(args: argparse.Namespace) -> int:
    donors = ([args.checkpoint] if args.checkpoint else []) + list(args.donors)
    if not donors:
        raise UsageError("no donors: give --checkpoint DIR and/or --donors DIR ...")
    # ---- check everything before any model loads
    donor_meta = _read_donors(donors)
    cli.check_args(args, donors)
    recipients = _recipients(args.recipients or ([args.model] if args.model else None), donor_meta)
    self_trained = _self_trained(args.self_trained, recipients, donors, donor_meta)
    shapes = {r: _shape(cli.model_config(r, "--recipients")) for r in recipients}
    incompatible = _check_shapes(donors, donor_meta, recipients, self_trained, shapes, args.skip_incompatible)
    bad = {(x["donor"], x["recipient"]) for x in incompatible}
    benches = cli.load_benchmarks(cli.benchmark_specs(args, donors), args)
    local_recipients = [r for r in recipients if os.path.isdir(r)]  # a Hub id names nothing the swap could remove
    out = output.prepare_out(args.out, inputs=[*donors, *self_trained.values(), *local_recipients])

    # ---- evaluate every donor on every recipient
    acc_m: list[list[float | None]] = [[None] * len(recipients) for _ in donors]
    score_m: list[list[float | None]] = [[None] * len(recipients) for _ in donors]
    rec_rows, detail = [], {}
    bar = output.progress(total=len(recipients) * (len(donors) + 2), desc="transfer", quiet=args.no_progress)
    for c, r in enumerate(recipients):
        skip = {d for d in donors if (d, r) in bad}
        base, donor_acc, own_acc, r_detail = _evaluate_recipient(r, donors, skip, self_trained.get(r), benches, args,
                                                                 bar)
        gc.collect()  # the recipient's model is gone; free it before the next one loads
        detail.update(r_detail)
        for d_i in range(len(donors)):
            acc_m[d_i][c] = donor_acc[d_i]
            score_m[d_i][c] = relative_improvement(acc_m[d_i][c], base, own_acc, scale=1.0)
        rec_rows.append({"label": _label(r), "model": r, "num_hidden_layers": shapes[r][0], "hidden_size": shapes[r][1],
                         "base_accuracy": base, "self_trained": self_trained.get(r), "self_trained_accuracy": own_acc})
    bar.close()

    # ---- plot, write
    result = {"command": "transfer",
              "donors": [{"label": _label(d), "path": d, "base_model": m.get("base_model"), "layers": m["layers"],
                          "hidden_size": m["hidden_size"]} for d, m in zip(donors, donor_meta)],
              "recipients": rec_rows, "accuracy": acc_m, "score": score_m, "incompatible": incompatible,
              "detail": detail, "settings": settings.record(args),
              "plots": _plot(out, acc_m, score_m, [_label(d) for d in donors], rec_rows)}
    return output.finish(out, result, f"transfer: {len(donors)} donors x {len(recipients)} recipients")


def _read_donors(donors: list[str]) -> list[dict[str, Any]]:
    """Each donor checkpoint's steering.json (:func:`_verified_meta`)."""
    return [_verified_meta(d, "--checkpoint") for d in donors]


def _verified_meta(path: str, flag: str) -> dict[str, Any]:
    """A checkpoint's steering.json, its vectors read back (checksum, finite values, the layers it lists): a broken
    donor or self-trained checkpoint is refused before --out is made or any weights load, not after the first
    recipient's evaluation."""
    cli.check_checkpoint_arg(path, flag)
    meta, _ = sv.read_checkpoint(path)
    return meta


def _recipients(given: list[str] | None, donor_meta: list[dict[str, Any]]) -> list[str]:
    """``--recipients`` (or ``--model``), else the donors' base models, in order."""
    recipients = list(given) if given else list(dict.fromkeys(
        m.get("base_model") for m in donor_meta if m.get("base_model")))
    if not recipients:
        raise UsageError("no recipients: pass --recipients BASE ... (the donors record no base model)")
    return recipients


def _self_trained(items: list[str], recipients: list[str], donors: list[str],
                  donor_meta: list[dict[str, Any]]) -> dict[str, str]:
    """``{recipient: its own checkpoint}``: the ``--self-trained BASE=DIR`` pairs, else the first donor trained on
    that recipient."""
    self_trained: dict[str, str] = {}
    for item in items:
        m = re.match(r"^(.+?)=(.+)$", item)
        if not m:
            raise UsageError(f"--self-trained {item}: write BASE=DIR")
        if m.group(1) not in recipients:
            raise UsageError(f"--self-trained {item}: {m.group(1)} is not a recipient ({recipients})")
        _verified_meta(m.group(2), "--self-trained")
        self_trained[m.group(1)] = m.group(2)
    for r in recipients:
        if r not in self_trained:
            own = [d for d, meta in zip(donors, donor_meta) if meta.get("base_model") == r]
            if own:
                self_trained[r] = own[0]
    return self_trained


def _shape(config: Any) -> tuple[int, int]:
    """``(layer count, hidden size)`` of a model config."""
    return int(config.num_hidden_layers), int(config.hidden_size)


def _check_shapes(donors: list[str], donor_meta: list[dict[str, Any]], recipients: list[str],
                  self_trained: dict[str, str], shapes: dict[str, tuple[int, int]], skip_incompatible: bool) -> list[dict[str, str]]:
    """The donor/recipient pairs whose shapes differ (``{"donor", "recipient", "reason"}``). A self-trained checkpoint
    that does not fit its recipient is a usage error, and so is any such pair without ``--skip-incompatible``."""
    incompatible = []
    for d, meta in zip(donors, donor_meta):
        for r in recipients:
            why = fits(meta, *shapes[r])
            if why:
                incompatible.append({"donor": d, "recipient": r, "reason": why})
    for r, ck in self_trained.items():
        why = fits(sv.read_meta(ck), *shapes[r])
        if why:
            raise UsageError(f"--self-trained {r}={ck}: does not fit {r}: {why}")
    if incompatible and not skip_incompatible:
        first = incompatible[0]
        raise UsageError(f"donor {first['donor']} does not fit recipient {first['recipient']} "
                         f"({shapes[first['recipient']][0]} layers x hidden size {shapes[first['recipient']][1]}): "
                         f"{first['reason']}; transfer needs the same shape (or pass --skip-incompatible)")
    return incompatible


def _evaluate_recipient(recipient: str, donors: list[str], skip: set[str], own: str | None, benches: list[Any],
                        args: argparse.Namespace, bar: Any) -> tuple[float, list[float | None], float | None,
                                                                     dict[str, Any]]:
    """Load one recipient base and evaluate it bare, with each donor's vectors (None for those in ``skip``) and with
    its own (``own``, reused when it is a donor). ``(base accuracy, [accuracy per donor], own accuracy, detail)``;
    ``detail`` holds the per-benchmark accuracies under ``"base|R"`` and ``"CHECKPOINT|R"``."""
    bar.set_postfix_str(f"loading {_label(recipient)}")
    model, tokenizer = cli.load_steerable(recipient, args)
    tmpl = cli.template(args, donors)
    evals = settings.from_args(args)

    def accuracy(vectors) -> _common.Accuracy:
        with _common.use_vectors(model, vectors):
            return _common.accuracy(model, tokenizer, benches, evals, tmpl)

    base = accuracy({})
    bar.update(1)
    detail = {f"base|{recipient}": base.per_benchmark}
    cache: dict[str, _common.Accuracy] = {}
    donor_acc: list[float | None] = []
    for d in donors:
        if d in skip:
            donor_acc.append(None)
        else:
            cache[d] = accuracy(cli.checkpoint_vectors(d, model))
            detail[f"{d}|{recipient}"] = cache[d].per_benchmark
            donor_acc.append(cache[d].accuracy)
        bar.update(1)
    own_acc = None
    if own is not None:
        if own not in cache:
            cache[own] = accuracy(cli.checkpoint_vectors(own, model))
            detail[f"{own}|{recipient}"] = cache[own].per_benchmark
        own_acc = cache[own].accuracy
    bar.update(1)
    return base.accuracy, donor_acc, own_acc, detail


def _plot(out: Path, acc_m: list[list[float | None]], score_m: list[list[float | None]], d_labels: list[str],
          rec_rows: list[dict[str, Any]]) -> list[str]:
    """``score.png`` and ``accuracy.png`` (donors x recipients, the latter with the recipient base and self-trained
    rows); their file names."""
    r_labels = [row["label"] for row in rec_rows]
    return [plots.heatmap(out / "score.png", score_m, d_labels, r_labels, cmap="RdBu_r", center=0.0,
                          title="(x − recipient base) / (recipient self-trained − recipient base)",
                          xlabel="recipient", ylabel="donor").name,
            plots.heatmap(out / "accuracy.png",
                          acc_m + [[row["base_accuracy"] for row in rec_rows],
                                   [row["self_trained_accuracy"] for row in rec_rows]],
                          d_labels + ["(recipient base)", "(self-trained)"], r_labels, cmap="viridis",
                          title="accuracy of donor vectors on each recipient", xlabel="recipient",
                          ylabel="donor").name]
