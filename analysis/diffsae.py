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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis import _common
from analysis import cli, output, plots, settings
from analysis.cli import UsageError
from analysis.sae_activations import (SPLITS, ChunkWriter, FeatureStats, batch_stream, clear_activations, collect,
                                      feature_pass, read_chunk)
from analysis.sae_features import describe_top, feature_cards, ranked_table
import steering.sae
from steering import separation

INPUTS = ("diff", "steered")
CORRECTIONS = ("maxt", "holm", "bh")
PERMUTATIONS = ("within-problem", "global")
# Top-activating tokens kept per feature, per example shown: k samples of one problem are often the same text, so the
# cards skip repeated contexts and need more candidates than they show.
EXAMPLE_POOL = 4
DEFAULT_SAE_BATCH = 4096  # vectors per SAE step unless --sae-batch-size says otherwise


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
    g.add_argument("--sae-batch-size", type=int, default=None, metavar="N",
                   help=f"vectors per SAE step (default {DEFAULT_SAE_BATCH}, or every training vector when fewer were "
                        "recorded)")
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
    vectors: dict[int, torch.Tensor]  # the checkpoint's, read and checked with the rest

    @property
    def hook_name(self) -> str:
        """SAELens's name of the recorded point, the output of block ``layer``."""
        return f"blocks.{self.layer}.hook_resid_post"


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
    cli.check_positive(args, "samples_per_problem", "chunk_size", "steps", "dead_window",
                       "permutations", "top_features", "examples", "lens_k", "topk")
    if args.sae_batch_size is not None:
        cli.check_positive(args, "sae_batch_size")
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
    # The checkpoint (checksum, shape) against the base's config.json, before --out is made or any weights load.
    checked = cli.check_checkpoint(args, layers=args.steer_layers, layers_flag="--steer-layers")
    num_layers, hidden = checked.num_layers, int(checked.config.hidden_size)
    ck_layers, steer = sorted(checked.vectors), checked.layers
    layer = args.layer + num_layers if args.layer < 0 else args.layer
    if not 0 <= layer < num_layers:
        raise UsageError(f"--layer {args.layer}: out of range; the model has {num_layers} layers (0..{num_layers - 1})")
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
    return Plan(layer, num_layers, hidden, ck_layers, steer, dict_size, checked.vectors)


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
    plan = check(args)
    base_id = cli.base_model_id(args.model, args.checkpoint)
    problems = load_problems(args)
    run_settings = settings_of(args, plan)
    out = output.prepare_out(args.out, inputs=[args.checkpoint])
    model, tokenizer = cli.load_steerable(base_id, args)
    vectors = plan.vectors
    seqs, correct = sample_and_grade(model, tokenizer, vectors, problems, args)
    heldout = split_problems(len(problems), args.heldout_fraction, args.sae_seed)
    writers = record_activations(model, tokenizer, seqs, {layer: vectors[layer] for layer in plan.steer_layers},
                                 heldout, plan, out / "activations", args)
    files = {split: list(w.files) for split, w in writers.items()}
    gen = torch.Generator().manual_seed(args.sae_seed)
    run_settings["sae_batch_size"] = batch_size = sae_batch_size(args.sae_batch_size, writers["train"].tokens)
    sae, info, curve = train_sae(files["train"], batch_size, plan, gen, args, device=next(model.parameters()).device)
    sae_dir = steering.sae.save_saelens(sae, out / "sae", hook_name=plan.hook_name, model_name=base_id,
                                        extra={"input": args.input, "steer_layers": plan.steer_layers,
                                               "checkpoint": str(args.checkpoint), "steering_analysis": "diffsae"})
    st = feature_pass(sae, files, len(seqs), top_m=args.examples * EXAMPLE_POOL, input_kind=args.input,
                      quiet=args.no_progress)
    save_completion_features(out / "completion_features.safetensors", st.row_means(), correct, seqs, st.row_tokens)
    sep = separate(st, correct, seqs, gen, args)
    top = describe_top(sep.rows[:args.top_features], sae, model, tokenizer, vectors, seqs, correct, st, files,
                       lens_kind=args.lens, lens_k=args.lens_k, examples=args.examples, context=args.context,
                       contribution=args.input == "diff")
    plot_files = draw(out, curve, sep, top, plan, args)
    if args.delete_activations:
        shutil.rmtree(out / "activations")
    result = {
        "command": "diffsae", "checkpoint": str(args.checkpoint), "base_model": base_id, "layer": plan.layer,
        "hook_name": plan.hook_name, "input": args.input, "steer_layers": plan.steer_layers, "settings": run_settings,
        "data": data_json(seqs, correct, problems, heldout, writers, st, args),
        "sae": sae_json(sae_dir, sae.cfg, info, st), "separation": separation_json(sep, args),
        "separation_skipped": sep.skipped, "features": sep.rows, "top_features": top, "plots": plot_files,
        "files": [sae_dir.name, "completion_features.safetensors"]
        + ([] if args.delete_activations else ["activations"])}
    return output.finish(out, result, summary(result))


def load_problems(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The problems of ``--benchmarks``: at least one, and two when some are held out."""
    benches = cli.load_benchmarks(cli.benchmark_specs(args), args)
    problems = _common.problems_of(benches)
    if not problems:
        raise UsageError(f"--benchmarks {' '.join(cli.benchmark_specs(args))}: no problems")
    if args.heldout_fraction > 0 and len(problems) < 2:
        raise UsageError(f"--heldout-fraction {args.heldout_fraction} needs at least 2 problems (a held-out one and "
                         f"a training one); there is {len(problems)}; use --heldout-fraction 0")
    return problems


def sample_and_grade(model: nn.Module, tokenizer: Any, vectors: Mapping[int, torch.Tensor],
                     problems: Sequence[dict[str, Any]], args: argparse.Namespace
                     ) -> tuple[_common.Sequences, torch.Tensor]:
    """``--samples-per-problem`` completions per problem from the steered model (every vector of the checkpoint on),
    and whether the reward counts each correct."""
    from steering.rewards import score_batch

    tmpl = cli.template(args)
    eval_settings = settings.from_args(args)
    with _common.use_vectors(model, vectors):
        seqs = _common.sample_sequences(model, tokenizer, problems, tmpl, eval_settings,
                                        progress=not args.no_progress, num_samples=args.samples_per_problem)
    verdicts = score_batch(seqs.completions, [problems[i]["answer"] for i in seqs.problem],
                           answer_format=tmpl.answer_format, timeout_s=args.reward_timeout,
                           options=eval_settings.grading)
    return seqs, torch.tensor([bool(v.correct) for v in verdicts])


def record_activations(model: nn.Module, tokenizer: Any, seqs: _common.Sequences, steer: Mapping[int, torch.Tensor],
                       heldout: set[int], plan: Plan, act_dir: Path, args: argparse.Namespace
                       ) -> dict[str, ChunkWriter]:
    """The SAE's input at ``plan.layer`` on every sequence, in chunks under ``act_dir`` (a previous run's removed)
    with its ``index.json``; one writer per split, whose ``files`` and ``tokens`` say what was written."""
    from steering.generation import pad_id_of

    split_of_row = ["heldout" if seqs.problem[r] in heldout else "train" for r in range(len(seqs))]
    act_dir.mkdir(exist_ok=True)
    clear_activations(act_dir)
    writers = {split: ChunkWriter(act_dir, split, args.chunk_size) for split in SPLITS}
    collect(model, seqs, steer, plan.layer, input_kind=args.input, positions=args.positions, writers=writers,
            split_of_row=split_of_row, batch_size=args.forward_batch_size, pad=pad_id_of(tokenizer),
            quiet=args.no_progress)
    if not writers["train"].files:
        raise UsageError("no training tokens were recorded (every problem is held out?)")
    output.write_json(act_dir / "index.json", {
        "layer": plan.layer, "hook_name": plan.hook_name, "input": args.input,
        "steer_layers": plan.steer_layers, "positions": args.positions, "d": plan.hidden,
        "chunks": {s: [f.name for f in w.files] for s, w in writers.items()},
        "tokens": {s: w.tokens for s, w in writers.items()}})
    return writers


def sae_batch_size(given: int | None, train_tokens: int) -> int:
    """``--sae-batch-size``, or by default DEFAULT_SAE_BATCH vectors, or all of them when fewer were recorded (said on
    stderr); a batch larger than the recorded vectors that the user asked for is refused."""
    if given is None:
        if train_tokens < DEFAULT_SAE_BATCH:
            print(f"diffsae: {train_tokens} training vectors recorded, fewer than the default --sae-batch-size "
                  f"{DEFAULT_SAE_BATCH}: each SAE step uses all of them", file=sys.stderr)
        return min(DEFAULT_SAE_BATCH, train_tokens)
    if train_tokens < given:
        raise UsageError(f"--sae-batch-size {given} is more than the {train_tokens} training vectors recorded; lower "
                         "it or sample more")
    return given


def train_sae(train_files: Sequence[Path], batch_size: int, plan: Plan, gen: torch.Generator,
              args: argparse.Namespace, *, device: torch.device
              ) -> tuple[steering.sae.SparseAutoencoder, dict[str, Any], dict[str, list[float]]]:
    """The SAE trained on the training chunks (batches drawn with ``gen``), its training summary, and the loss and
    explained-variance curve of about 200 of its steps, while a progress bar shows them."""
    cfg = steering.sae.SAEConfig(plan.hidden, plan.dict_size, args.sparsity, k=args.topk, l1_coeff=args.l1_coeff)
    tc = steering.sae.TrainConfig(steps=args.steps, batch_size=batch_size, lr=args.lr, seed=args.sae_seed,
                                  aux_coeff=args.aux_coeff, dead_window=args.dead_window)
    init = read_chunk(train_files[0])["x"][:65536]
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
        sae, info = steering.sae.train(cfg, tc, batch_stream(train_files, batch_size, gen),
                                       init_sample=init, device=device, on_step=on_step)
    except steering.sae.SAEError as e:
        raise UsageError(f"SAE training: {e}") from None
    finally:
        bar.close()
    return sae, info, curve


@dataclass
class Separation:
    """The separation test of every live feature, or why there was none."""

    rows: list[dict[str, Any]]  # every tested feature, ranked (:func:`ranked_table`); [] when skipped
    threshold: float | None  # the effect |AUROC − ½| a feature needs to be significant
    num_tested: int
    skipped: str | None  # why there is no test; None when there is one


def separate(st: FeatureStats, correct: torch.Tensor, seqs: _common.Sequences, gen: torch.Generator,
             args: argparse.Namespace) -> Separation:
    """AUROC and permutation test of every live feature's mean activation per completion against ``correct`` (only
    completions with completion tokens count); skipped, with the reason on stderr, when one class or every feature
    is missing."""
    means = st.row_means()
    has_tokens = st.row_tokens > 0
    tested = torch.nonzero(st.alive).reshape(-1)
    n_pos, n_neg = int(correct[has_tokens].sum()), int((~correct[has_tokens]).sum())
    sep, skipped = None, None
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
    rows = [] if sep is None else ranked_table(sep, tested, means[has_tokens], correct[has_tokens],
                                               st.fires.double() / max(st.count, 1))
    return Separation(rows, None if sep is None else sep["threshold"], int(tested.numel()), skipped)


def draw(out: Path, curve: Mapping[str, list[float]], sep: Separation, top: Sequence[dict[str, Any]], plan: Plan,
         args: argparse.Namespace) -> list[str]:
    """The command's figures (names relative to ``out``): the SAE's training curve, the AUROC histogram (when there
    was a test), the top features' cosines with each layer's vector and one card per top feature."""
    plot_files = [plots.line_plot(out / "sae_training.png", curve["step"],
                                  {"loss": curve["loss"], "explained variance": curve["explained_variance"]},
                                  title=f"SAE training at {plan.hook_name} (batch statistics)", xlabel="step",
                                  ylabel="").name]
    if sep.skipped is None:
        plot_files.append(auroc_histogram(out / "auroc_hist.png", [r["auroc"] for r in sep.rows], sep.threshold,
                                          args, sum(r["significant"] for r in sep.rows)).name)
    if top:
        plot_files.append(plots.heatmap(out / "top_features_cos.png",
                                        [[t["cos_to_vectors"].get(str(layer)) for layer in range(plan.num_layers)]
                                         for t in top],
                                        [f"#{t['rank']} f{t['feature']}" for t in top], list(range(plan.num_layers)),
                                        title="cos(decoder direction, s_l)", xlabel="layer l", ylabel="feature",
                                        cmap="RdBu_r", vmin=-1, vmax=1).name)
        plot_files += feature_cards(out / "cards", top, args.correction)
    return plot_files


def data_json(seqs: _common.Sequences, correct: torch.Tensor, problems: Sequence[dict[str, Any]], heldout: set[int],
              writers: Mapping[str, ChunkWriter], st: FeatureStats, args: argparse.Namespace) -> dict[str, Any]:
    """result.json's ``data``: the completions, the split, the chunks and ΔF's mean norm and total variance."""
    delta_n = max(st.count, 1)
    return {"num_completions": len(seqs), "num_correct": int(correct.sum()),
            "accuracy": float(correct.double().mean()), "num_problems": len(problems),
            "heldout_problems": sorted(heldout), "train_tokens": writers["train"].tokens,
            "heldout_tokens": writers["heldout"].tokens,
            "chunks": {s: len(w.files) for s, w in writers.items()},
            "activations_dir": None if args.delete_activations else "activations",
            "delta_mean_norm": float((st.s_delta / delta_n).norm()),
            "delta_total_variance": (st.s_delta2 - float(st.s_delta @ st.s_delta) / delta_n) / delta_n}


def sae_json(sae_dir: Path, cfg: steering.sae.SAEConfig, info: Mapping[str, Any], st: FeatureStats
             ) -> dict[str, Any]:
    """result.json's ``sae``: its shape, training summary, reconstruction per split and dead features."""
    recon = {split: st.recon[split].metrics() for split in SPLITS}
    dead = int((~st.alive).sum())
    return {"dir": sae_dir.name, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "sparsity": cfg.sparsity,
            "k": cfg.k if cfg.sparsity == "topk" else None,
            "l1_coeff": cfg.l1_coeff if cfg.sparsity == "l1" else None, "input_scale": info["input_scale"],
            "training": {**(info["last_step"] or {}), "vectors_seen": info["vectors_seen"],
                         "epochs_completed": info["epochs_completed"]},
            "train": recon["train"], "heldout": recon["heldout"], "dead_features": dead,
            "dead_fraction": dead / cfg.d_sae}


def separation_json(sep: Separation, args: argparse.Namespace) -> dict[str, Any] | None:
    """result.json's ``separation``: the test's settings and outcome; None when it was skipped."""
    if sep.skipped is not None:
        return None
    return {"correction": args.correction, "alpha": args.alpha, "permutations": args.permutations,
            "permutation": args.permutation, "num_tested": sep.num_tested,
            "num_significant": sum(r["significant"] for r in sep.rows),
            "threshold": threshold_json(sep.threshold)}


def summary(result: Mapping[str, Any]) -> str:
    """The line printed at the end: completions, the SAE's explained variance (held out when there is a held-out
    split), dead features and the top feature."""
    sae, rows = result["sae"], result["features"]
    ev = sae["heldout"]["explained_variance"] if sae["heldout"]["num_vectors"] else sae["train"]["explained_variance"]
    best = f", top feature {rows[0]['feature']} AUROC {rows[0]['auroc']:.3f}" if rows else ""
    completions, dead = result["data"]["num_completions"], sae["dead_features"]
    return f"diffsae: {completions} completions, SAE EV {ev:.3f}, {dead} dead{best}"


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
