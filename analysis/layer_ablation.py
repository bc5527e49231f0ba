"""``python -m analysis layer-ablation {make,collect}``: one RL run per layer, training only that layer's vector.

``make`` writes, under ``--out``:

- ``configs/layer_XX.yaml``: one training config per layer -- the ``--config`` recipe (or a minimal paper-preset
  one) with ``layers: [l]``, ``learning_rate: lr_l`` (that layer's own rate), ``output_dir: RUNS/layer_XX`` and
  ``run_name: ...-layerXX``. Extra ``--set key=value`` pairs are applied to every config.
- ``launch.sh``: runs them one after the other with ``accelerate launch [--config_file F] -m train --config ...``
  (``bash launch.sh 3 7`` runs layers 3 and 7 only).
- ``sweep.yaml``: a W&B sweep (grid over the config files) whose ``command`` is the same ``accelerate launch -m train``.
- ``runs.json``: the manifest ``collect`` reads (layer, learning rate, config, output_dir per run).
- ``lr_schedule.png`` and ``result.json`` (the same manifest plus the schedule).

The default per-layer learning rates are those of the single-layer runs of Sinii et al., *Small Vectors, Big Effects*
(arXiv 2509.06608): log-linear interpolation over the relative depth ``f = l / (L − 1)`` between anchors -- Qwen ``0:3e-3, 0.6:1e-2, 1:0.1`` (3e-3..1e-2 early, rising to 0.1 at the
end), Llama ``0:5e-4, 1:7e-3``. ``--schedule`` picks one (default from the model's family), ``--lr-anchors`` gives
your own, ``--constant-lr`` one rate for all, and ``--lr L=RATE`` overrides single layers.

``collect`` evaluates every run's final checkpoint (``analysis.cli.final_checkpoint``: the output dir itself if it is
a checkpoint, else the complete checkpoint the ``latest`` marker names, else the highest complete ``checkpoint-N``,
else ``final/``) greedily (T = 0) and at ``--temperature`` (default 1), plus the unsteered base and, with
``--all-layers DIR``, all-layer steering; it writes ``result.json`` and ``accuracy_per_layer.png`` (accuracy per
layer at both temperatures, with base and all-layer lines). Runs without a checkpoint are reported as missing.

result.json (collect)::

    {"command": "layer-ablation collect", "base_model", "runs_file",
     "layers": [...], "temperatures": [0.0, T],
     "runs": [{"layer", "learning_rate", "output_dir", "checkpoint" | null,
               "accuracy": {"T=0": x, "T=1.0": y} | null, "detail": {...}}],
     "base": {"T=0": x, "T=1.0": y}, "all_layers": null | {"checkpoint", "T=0": x, "T=1.0": y},
     "settings", "plots"}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

from analysis import _common
from analysis import cli, output, plots, settings
from analysis.cli import UsageError

SCHEDULES: dict[str, list[tuple[float, float]]] = {
    "qwen": [(0.0, 3e-3), (0.6, 1e-2), (1.0, 1e-1)],
    "llama": [(0.0, 5e-4), (1.0, 7e-3)],
}
FAMILY_SCHEDULE = {"qwen2": "qwen", "llama": "llama"}


# --------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def parse_anchors(text: str) -> list[tuple[float, float]]:
    """``"0:3e-3,0.6:1e-2,1:0.1"`` -> sorted (relative depth, learning rate) anchors."""
    anchors = []
    for part in text.split(","):
        try:
            f, lr = part.split(":")
            anchors.append((float(f), float(lr)))
        except ValueError:
            raise UsageError(f"--lr-anchors {text}: write depth:rate pairs like 0:3e-3,0.6:1e-2,1:0.1") from None
    anchors.sort()
    if not anchors or anchors[0][0] > 0 or anchors[-1][0] < 1 or any(not 0 <= f <= 1 for f, _ in anchors):
        raise UsageError(f"--lr-anchors {text}: depths must lie in [0, 1] and include 0 and 1")
    if any(lr <= 0 for _, lr in anchors):
        raise UsageError(f"--lr-anchors {text}: learning rates must be > 0")
    return anchors


def schedule(num_layers: int, anchors: list[tuple[float, float]]) -> list[float]:
    """Per-layer learning rates, log-linear between the anchors over the relative depth l / (L − 1)."""
    out = []
    for layer in range(num_layers):
        f = layer / (num_layers - 1) if num_layers > 1 else 0.0
        for (f0, a), (f1, b) in zip(anchors, anchors[1:]):
            if f0 <= f <= f1:
                w = 0.0 if f1 == f0 else (f - f0) / (f1 - f0)
                out.append(float(math.exp((1 - w) * math.log(a) + w * math.log(b))))
                break
        else:
            out.append(anchors[-1][1] if f > anchors[-1][0] else anchors[0][1])
    return [float(f"{x:.4g}") for x in out]


# --------------------------------------------------------------------------------------------------------------------
# make


def _yaml_scalar_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_make(args: argparse.Namespace) -> int:
    base_cfg = _read_recipe(args.config) if args.config else {}
    model = _recipe_model(base_cfg, args.model, args.config)
    base_cfg = _single_layer_recipe(base_cfg, model, args.dataset, args.set)
    num_layers, model_type = (args.num_layers, None) if args.num_layers else _model_shape(model)
    anchors, sched_name = _anchors(model_type, args.constant_lr, args.lr_anchors, args.schedule)
    lrs = _override_rates(schedule(num_layers, anchors), args.lr, num_layers)
    layers = cli.parse_layers(args.layers, num_layers) if args.layers else list(range(num_layers))

    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(base_cfg.get("output_dir", "runs/layer-ablation"))
    run_name = base_cfg.get("run_name") or Path(str(model)).name
    configs = _layer_configs(base_cfg, layers, lrs, num_layers, runs_dir, run_name)
    validated = _validate(configs) if args.validate else None  # before --out: a refused config writes nothing
    # The training runs, the recipe and the accelerate config (which launch.sh names) must not live in OUT: a later
    # make into the same --out replaces OUT as a whole.
    out = output.prepare_out(args.out, inputs=[runs_dir, args.config, args.accelerate_config])
    runs = _write_configs(out, configs, lrs, num_layers, sched_name)
    launch_prefix = ["accelerate", "launch"] + (["--config_file", args.accelerate_config]
                                                 if args.accelerate_config else [])
    _write_launch_script(out / "launch.sh", runs, launch_prefix)
    _write_sweep(out / "sweep.yaml", runs, run_name, launch_prefix)
    manifest = {"model": model, "dataset": base_cfg.get("dataset"), "num_layers": num_layers,
                "schedule": sched_name, "anchors": anchors, "runs": runs}
    output.write_json(out / "runs.json", manifest)
    files = [plots.line_plot(out / "lr_schedule.png", list(range(num_layers)), {"learning rate": lrs},
                             title=f"per-layer learning rate ({sched_name})", xlabel="layer",
                             ylabel="learning rate").name]
    return output.finish(out, {"command": "layer-ablation make", **manifest, "launch": "launch.sh",
                            "sweep": "sweep.yaml", "validated": validated, "plots": files},
                      f"layer-ablation make: {len(runs)} configs in {out / 'configs'}; run them with bash "
                      f"{out / 'launch.sh'} or wandb sweep {out / 'sweep.yaml'}")


def _read_recipe(config: str) -> dict[str, Any]:
    """The ``--config`` training recipe, a YAML mapping."""
    import yaml

    path = Path(config)
    if not path.is_file():
        raise UsageError(f"--config {config}: no such file")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {config}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {config}: must be a YAML mapping")
    return recipe


def _recipe_model(recipe: dict[str, Any], model: str | None, config: str | None) -> str:
    """The base model (``--model``, else the recipe's), checked to be trained with a steering adapter."""
    model = model or recipe.get("model_name_or_path")
    if not model:
        raise UsageError("no model: pass --model BASE or a --config with model_name_or_path")
    if recipe.get("adapter", "steering") != "steering":
        raise UsageError(f"--config {config}: adapter is {recipe.get('adapter')!r}; single-layer runs need "
                         "adapter: steering")
    return model


def _single_layer_recipe(recipe: dict[str, Any], model: str, dataset: str | None,
                         set_items: list[str]) -> dict[str, Any]:
    """The recipe every layer's config copies: the ``--config`` one (or a minimal paper-preset one, which needs
    ``--dataset``) with the model, the dataset and the ``--set key=value`` pairs, without per-layer rates or a
    starting vector."""
    if not recipe:
        if not dataset:
            raise UsageError("without --config, pass --dataset (e.g. deepscaler, or procedural:mixed)")
        recipe = {"preset": "paper", "adapter": "steering", "template": "qwen_math"}
    recipe["model_name_or_path"] = model
    if dataset:
        recipe["dataset"] = dataset
    for item in set_items:
        if "=" not in item:
            raise UsageError(f"--set {item}: write key=value")
        k, v = item.split("=", 1)
        recipe[k.strip()] = _yaml_scalar_value(v)
    for k in ("layer_lr", "init_from"):
        recipe.pop(k, None)
    return recipe


def _model_shape(model: str) -> tuple[int, str | None]:
    """``(layer count, model type)`` from the model's config."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # offline Hub id: one clear line
        raise UsageError(f"cannot read the config of {model!r} ({type(e).__name__}); pass --num-layers N") from None
    return int(cfg.num_hidden_layers), getattr(cfg, "model_type", None)


def _anchors(model_type: str | None, constant_lr: float | None, lr_anchors: str | None,
             schedule_name: str | None) -> tuple[list[tuple[float, float]], str]:
    """``(anchors, schedule name)``: ``--constant-lr``, else ``--lr-anchors``, else ``--schedule`` or the model
    family's."""
    if constant_lr is not None:
        return [(0.0, constant_lr), (1.0, constant_lr)], "constant"
    if lr_anchors:
        return parse_anchors(lr_anchors), "anchors"
    sched_name = schedule_name or FAMILY_SCHEDULE.get(model_type or "", None)
    if sched_name is None:
        raise UsageError(f"no default schedule for model type {model_type!r}; pass --schedule qwen|llama, "
                         "--lr-anchors or --constant-lr")
    return SCHEDULES[sched_name], sched_name


def _override_rates(lrs: list[float], overrides: list[str], num_layers: int) -> list[float]:
    """``lrs`` with the ``--lr LAYER=RATE`` overrides applied (in place)."""
    for item in overrides:
        m = re.match(r"^(-?\d+)=(.+)$", item)
        if not m:
            raise UsageError(f"--lr {item}: write LAYER=RATE")
        layer, rate = int(m.group(1)), float(m.group(2))
        if not 0 <= layer < num_layers or rate <= 0:
            raise UsageError(f"--lr {item}: layer must be in 0..{num_layers - 1} and the rate > 0")
        lrs[layer] = rate
    return lrs


def _layer_configs(recipe: dict[str, Any], layers: list[int], lrs: list[float], num_layers: int, runs_dir: Path,
                   run_name: str) -> dict[int, dict[str, Any]]:
    """``{layer: training config}``: the recipe with ``layers: [l]``, the layer's own rate, its ``output_dir`` under
    ``runs_dir`` and its run name."""
    width = max(2, len(str(num_layers - 1)))
    return {layer: {**recipe, "layers": [layer], "learning_rate": lrs[layer],
                    "output_dir": str(runs_dir / f"layer_{layer:0{width}d}"),
                    "run_name": f"{run_name}-layer{layer:0{width}d}"}
            for layer in layers}


def _write_configs(out: Path, configs: dict[int, dict[str, Any]], lrs: list[float], num_layers: int,
                   sched_name: str) -> list[dict[str, Any]]:
    """``OUT/configs/layer_XX.yaml``, one per layer; the manifest's runs (layer, learning rate, config,
    output_dir)."""
    import yaml

    (out / "configs").mkdir(exist_ok=True)
    width = max(2, len(str(num_layers - 1)))
    runs = []
    for layer, cfg in configs.items():
        path = out / "configs" / f"layer_{layer:0{width}d}.yaml"
        header = (f"# Single-layer steering run: only layer {layer} of {num_layers} is trained, at its own learning "
                  f"rate.\n# Written by `python -m analysis layer-ablation make` ({sched_name} schedule).\n")
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        runs.append({"layer": layer, "learning_rate": lrs[layer], "config": str(output.final(path)),
                     "output_dir": cfg["output_dir"]})
    return runs


def _write_launch_script(path: Path, runs: list[dict[str, Any]], launch_prefix: list[str]) -> None:
    """``launch.sh``: the runs one after the other (``bash launch.sh 3 7``: only layers 3 and 7), executable."""
    lines = ["#!/usr/bin/env bash",
             "# One single-layer steering run per layer, one after the other (layer-ablation make).",
             "# Usage: bash launch.sh            # every layer",
             "#        bash launch.sh 3 7       # only layers 3 and 7",
             "set -euo pipefail", "declare -A CONFIGS=("]
    lines += [f"  [{r['layer']}]={shlex.quote(r['config'])}" for r in runs]
    every = " ".join(str(r["layer"]) for r in runs)
    lines += [")", "LAYERS=(\"$@\")", f"[ ${{#LAYERS[@]}} -gt 0 ] || LAYERS=({every})",
              "for l in \"${LAYERS[@]}\"; do",
              "  cfg=${CONFIGS[$l]:-}",
              "  if [ -z \"$cfg\" ]; then echo \"no config for layer $l\" >&2; exit 2; fi",
              "  echo \"=== layer $l: $cfg\"",
              f"  {' '.join(shlex.quote(x) for x in launch_prefix)} -m train --config \"$cfg\"",
              "done", ""]
    path.write_text("\n".join(lines))
    os.chmod(path, 0o755)


def _write_sweep(path: Path, runs: list[dict[str, Any]], run_name: str, launch_prefix: list[str]) -> None:
    """``sweep.yaml``: a W&B grid sweep over the config files, launching each like ``launch.sh`` does."""
    import yaml

    sweep = {"program": "train", "method": "grid", "name": f"{run_name}-layer-ablation",
             "metric": {"name": "eval_accuracy", "goal": "maximize"},
             "parameters": {"config": {"values": [r["config"] for r in runs]}},
             "command": launch_prefix + ["-m", "train", "${args}"]}
    path.write_text(
        "# W&B sweep over the single-layer configs: wandb sweep sweep.yaml, then wandb agent <id>.\n"
        "# ${args} expands to --config=<file>, which python -m train reads like --config <file>.\n"
        + yaml.safe_dump(sweep, sort_keys=False))


def _validate(configs: dict[int, dict[str, Any]]) -> bool:
    """Check every layer's config keys against python -m train's own (the fields of SteeringGRPOConfig), before any
    file is written. Values are left to the trainer, which checks them against the machine it runs on (bf16, GPUs)."""
    from train.config import config_keys

    known = config_keys() | {"env"}
    for layer, cfg in configs.items():
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UsageError(f"the config of layer {layer}: keys {unknown} are unknown to python -m train "
                             "(from --config or --set)")
    return True


# --------------------------------------------------------------------------------------------------------------------
# collect


def run_collect(args: argparse.Namespace) -> int:
    runs_file = Path(args.runs)
    if runs_file.is_dir():
        runs_file = runs_file / "runs.json"
    if not runs_file.is_file():
        raise UsageError(f"--runs {args.runs}: no runs.json (written by layer-ablation make)")
    try:
        manifest = json.loads(runs_file.read_text())
        runs = manifest["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"--runs {runs_file}: not a runs.json of layer-ablation make") from None
    if args.all_layers:
        cli.check_checkpoint_arg(args.all_layers, "--all-layers")
    found = []
    for r in runs:
        out_dir = Path(r["output_dir"])
        if not out_dir.is_absolute() and not out_dir.exists() and (runs_file.parent / out_dir).exists():
            out_dir = runs_file.parent / out_dir
        ck = cli.final_checkpoint(out_dir)
        found.append((r, ck))
    cks = [str(ck) for _, ck in found if ck is not None]
    if not args.benchmarks and str(manifest.get("dataset") or "").startswith("procedural:"):
        args.benchmarks = [f"procedural:{manifest['dataset'].split(':')[1]}"]
    refs = cks + ([args.all_layers] if args.all_layers else [])
    cli.check_args(args, refs)
    base_id = cli.base_model_id(args.model or manifest.get("model"), refs[0] if refs else None)
    benches = cli.load_benchmarks(cli.benchmark_specs(args, refs), args)
    all_vectors, run_vectors = _collect_vectors(found, args.all_layers, cli.model_config(base_id))
    out = output.prepare_out(args.out, inputs=[runs_file, args.all_layers, *cks])
    model, tokenizer = cli.load_steerable(base_id, args)
    tmpl = cli.template(args, refs)
    temps = [("T=0", True)] + ([(f"T={args.temperature:g}", False)] if args.temperature > 0 else [])

    def evaluate(vectors) -> tuple[dict[str, float], dict[str, Any]]:
        acc, det = {}, {}
        with _common.use_vectors(model, vectors):
            for key, greedy in temps:
                a = _common.accuracy(model, tokenizer, benches, settings.from_args(args), tmpl, greedy=greedy)
                acc[key], det[key] = a.accuracy, a.per_benchmark
        return acc, det

    bar = output.progress(total=len(found) + 1 + bool(args.all_layers), desc="layer-ablation collect",
                          quiet=args.no_progress)
    base_acc, base_det = evaluate({})
    bar.update(1)
    all_row = None
    if args.all_layers:
        a, d = evaluate(all_vectors)
        all_row = {"checkpoint": args.all_layers, **a, "detail": d}
        bar.update(1)
    rows = []
    for (r, ck), vecs in zip(found, run_vectors):
        row = {"layer": r["layer"], "learning_rate": r.get("learning_rate"), "output_dir": r["output_dir"],
               "checkpoint": None if ck is None else str(ck), "accuracy": None, "detail": None}
        if vecs is not None:
            row["accuracy"], row["detail"] = evaluate(vecs)
        rows.append(row)
        bar.update(1)
    bar.close()
    layers = [r["layer"] for r in rows]
    series = {key: [None if r["accuracy"] is None else r["accuracy"][key] for r in rows] for key, _ in temps}
    hl: dict[str, float | None] = {f"base {k}": base_acc[k] for k, _ in temps}
    if all_row:
        hl.update({f"all layers {k}": all_row[k] for k, _ in temps})
    files = [plots.line_plot(out / "accuracy_per_layer.png", layers, series, hlines=hl, xlabel="steered layer",
                             ylabel="accuracy", title="single-layer steering: accuracy per layer").name]
    missing = [r["layer"] for r in rows if r["checkpoint"] is None]
    result = {"command": "layer-ablation collect", "base_model": base_id, "runs_file": str(runs_file),
              "layers": layers, "temperatures": [0.0] + ([args.temperature] if args.temperature > 0 else []),
              "runs": rows,
              "base": {**base_acc, "detail": base_det}, "all_layers": all_row, "missing": missing,
              "settings": settings.record(args), "plots": files}
    return output.finish(out, result, f"layer-ablation collect: {len(rows) - len(missing)} runs evaluated"
                      + (f", {len(missing)} without a checkpoint (layers {missing})" if missing else ""))


def _collect_vectors(found: list[tuple[dict[str, Any], Path | None]], all_layers: str | None, config: Any
                     ) -> tuple[dict[int, Any] | None, list[dict[int, Any] | None]]:
    """The vectors of ``--all-layers`` and of every run's checkpoint (None where a run has none), read and checked
    against the base's config.json before any weights load: each fits it, and each run steers the layer the
    manifest says."""
    all_vectors = cli.checkpoint_vectors(all_layers, config) if all_layers else None
    run_vectors = []
    for r, ck in found:
        vecs = None if ck is None else cli.checkpoint_vectors(ck, config)
        if vecs is not None and sorted(vecs) != [r["layer"]]:
            raise UsageError(f"{ck}: steers layers {sorted(vecs)}, but the manifest says layer {r['layer']}")
        run_vectors.append(vecs)
    return all_vectors, run_vectors


# --------------------------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "layer-ablation", help="single-layer steering: make one training config per layer (make), then evaluate "
                               "every run against base and all-layer steering (collect)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="{make,collect}", required=True)
    mk = cli.add_command(sub, "make", run_make, __doc__,
                         help="write per-layer training configs, a launch script and a W&B sweep")
    mk.add_argument("--model", default=None, metavar="BASE", help="base model (default: the --config's)")
    mk.add_argument("--config", default=None, metavar="YAML", help="training recipe to copy (e.g. configs/*.yaml)")
    mk.add_argument("--dataset", default=None, help="training dataset (overrides the --config's)")
    mk.add_argument("--out", required=True, metavar="DIR", help="where configs/, launch.sh, sweep.yaml go")
    mk.add_argument("--runs-dir", default=None, metavar="DIR",
                    help="parent of the runs' output_dir (default: the --config's output_dir, else "
                         "runs/layer-ablation)")
    mk.add_argument("--layers", default=None, help="layers to make runs for (default all), e.g. 0,4,8-12")
    mk.add_argument("--num-layers", type=int, default=None, help="number of layers (default: read the model config)")
    mk.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                    help="learning-rate schedule (default: from the model family)")
    mk.add_argument("--lr-anchors", default=None, metavar="F:LR,...",
                    help="own schedule: relative depth:rate anchors, log-linear between, e.g. 0:3e-3,0.6:1e-2,1:0.1")
    mk.add_argument("--constant-lr", type=float, default=None, help="one learning rate for every layer")
    mk.add_argument("--lr", action="append", default=[], metavar="LAYER=RATE", help="override one layer's rate")
    mk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="set a training config key in every config (YAML value), e.g. --set max_steps=200")
    mk.add_argument("--accelerate-config", default="launch/single_gpu.yaml", metavar="YAML",
                    help="accelerate --config_file for the launches (default launch/single_gpu.yaml; '' for none)")
    mk.add_argument("--validate", action="store_true",
                    help="check every config's keys against python -m train's (imports trl)")

    co = cli.add_checkpoint_command(sub, "collect", run_collect, __doc__, checkpoint="none",
                                    help="evaluate every run at T=0 and T=1 against base and all-layer steering")
    co.add_argument("--runs", required=True, metavar="RUNS_JSON", help="runs.json of make (or its --out dir)")
    co.add_argument("--all-layers", default=None, metavar="DIR", help="all-layer steering checkpoint (reference line)")
