"""The evaluation settings on the command line: :func:`add_arguments` declares the flags of
``steering.evaluation.EvalSettings`` (sampling, seeds, batching, grading, backend) with its defaults, and
:func:`from_args` turns them back into one; nothing else reads these flags.

The trace commands (``diffmean``, ``behavior``) generate with the same sampling flags (:func:`add_sampling_arguments`,
:func:`sampling_params`); a command whose method needs other defaults (greedy, shorter completions) states them where
it registers (``analysis.cli.add_command(..., temperature=0.0)``), and its ``--help`` shows them.

The statistics' options of ``evaluate`` and ``compare`` (:func:`add_statistics_arguments`) live here too.
"""

from __future__ import annotations

import argparse
from typing import Any

from analysis.cli import UsageError, default
from steering.evaluation import BACKENDS, EvalSettings, grading_options

DEFAULTS = EvalSettings()

# The flag of each EvalSettings field whose flag is not ``--`` + its name with dashes.
_FLAG_OF = {"timeout_s": "--reward-timeout"}


def add_sampling_arguments(group: argparse._ArgumentGroup) -> None:
    """``--temperature``, ``--top-p``, ``--top-k``, ``--max-new-tokens``, with the command's own defaults if it set
    any (``analysis.cli.default``), else the evaluation's."""
    group.add_argument("--temperature", type=float, default=default(group, "temperature", DEFAULTS.temperature),
                       help="sampling temperature; 0 = greedy (default %(default)s; 1.0 is the papers' setting)")
    group.add_argument("--top-p", type=float, default=default(group, "top_p", DEFAULTS.top_p),
                       help="nucleus sampling (default %(default)s)")
    group.add_argument("--top-k", type=int, default=default(group, "top_k", DEFAULTS.top_k),
                       help="top-k sampling, 0 = off (default %(default)s)")
    group.add_argument("--max-new-tokens", type=int, default=default(group, "max_new_tokens", DEFAULTS.max_new_tokens),
                       help="completion length limit (default %(default)s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation and scoring flags of ``evaluate``, ``select`` and every command that measures accuracy: the
    evaluation settings, and which problems (template, limit, keys), device and dtype."""
    from analysis import cli

    g = parser.add_argument_group("generation and scoring")
    g.add_argument("--template", default=None,
                   help="prompt template: qwen_math, r1, or a template file (default: the template recorded in the "
                        "first steering checkpoint's training config, else qwen_math)")
    g.add_argument("--num-samples", "-k", type=int, default=DEFAULTS.num_samples, metavar="K",
                   help="samples per problem (k of avg@k) for every benchmark; default: 32 for aime24/aime25/amc23, "
                        "1 otherwise; always 1 at temperature 0")
    add_sampling_arguments(g)
    g.add_argument("--max-length", type=int, default=DEFAULTS.max_length, metavar="L",
                   help="limit prompt + completion to L tokens per problem instead (the papers: 4096 for Qwen, 8192 "
                        "for Llama); overrides --max-new-tokens")
    g.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULTS.seeds), metavar="SEED",
                   help="one evaluation per seed; mean ± std over seeds (default: 0)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help="completions (prompts x samples) per generation call (default %(default)s; the KV cache of "
                        "one call must fit in memory)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N problems of each "
                   "benchmark (quick runs)")
    g.add_argument("--question-key", default=None, help="question field of local benchmark files (default: auto)")
    g.add_argument("--answer-key", default=None, help="answer field of local benchmark files (default: auto)")
    g.add_argument("--pass-k", type=int, nargs="*", default=[], metavar="K",
                   help="also report the unbiased pass@K for these K (<= samples per problem)")
    _add_grading_arguments(g)
    _add_backend_arguments(g)
    cli.add_device_arguments(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_grading_arguments(g: argparse._ArgumentGroup) -> None:
    """``--reward-timeout`` and math-verify's grading options (``steering.rewards.GradingOptions``), with its
    defaults."""
    grading = DEFAULTS.grading
    g.add_argument("--reward-timeout", type=float, default=DEFAULTS.timeout_s,
                   help="seconds per answer check (default %(default)s)")
    g.add_argument("--reward-float-rounding", type=int, default=grading.float_rounding, metavar="N",
                   help="math-verify float_rounding: decimal places floats are rounded to before comparing "
                        "(default %(default)s)")
    g.add_argument("--reward-numeric-precision", type=int, default=grading.numeric_precision, metavar="N",
                   help="math-verify numeric_precision: significant digits of numeric evaluation (default %(default)s)")
    g.add_argument("--reward-strict", action=argparse.BooleanOptionalAction, default=grading.strict,
                   help="math-verify strict: variables must match and sets never equal tuples (default: on)")
    g.add_argument("--reward-allow-set-relation-comp", action=argparse.BooleanOptionalAction,
                   default=grading.allow_set_relation_comp,
                   help="math-verify allow_set_relation_comp: a relation in the answer may equal a set in the ground "
                        "truth (default: off)")


def _add_backend_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--backend", default=DEFAULTS.backend, choices=list(BACKENDS),
                   help="generation backend of steering.generation: hf (model.generate, the reference), static (static "
                        "KV cache, compiled on CUDA) or vllm (a vLLM engine with the vectors as down_proj biases; "
                        "needs vLLM, see README); default %(default)s")
    g.add_argument("--vllm-kv-cache-gb", type=float, default=DEFAULTS.vllm_kv_cache_gb, metavar="GB",
                   help="--backend vllm: KV-cache size of the engine (default: 2 on CPU; on GPU vLLM's share of GPU "
                        "memory, --vllm-gpu-memory-utilization)")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=DEFAULTS.vllm_gpu_memory_utilization,
                   metavar="F", help="--backend vllm on GPU: fraction of GPU memory the engine may take "
                                     "(default %(default)s)")


def from_args(args: argparse.Namespace) -> EvalSettings:
    """The evaluation settings the flags of :func:`add_arguments` name (a bad ``--reward-*`` value: a usage error)."""
    try:
        grading = grading_options(vars(args))
    except ValueError as e:
        raise flag_error(e, "--reward-") from None
    return EvalSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, max_length=args.max_length, num_samples=args.num_samples,
                        seeds=tuple(args.seeds), batch_size=args.batch_size, timeout_s=args.reward_timeout,
                        grading=grading, backend=args.backend, vllm_kv_cache_gb=args.vllm_kv_cache_gb,
                        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)


def check(args: argparse.Namespace) -> None:
    """Reject bad values of the flags of :func:`add_arguments` before anything loads."""
    try:
        from_args(args).check()
    except ValueError as e:
        raise flag_error(e) from None
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if any(k < 1 for k in args.pass_k):
        raise UsageError(f"--pass-k values must be >= 1, got {args.pass_k}")
    if args.backend == "vllm":
        from steering.vllm_engine import VLLMError, check_vllm

        try:
            check_vllm()  # installed, a tested version; the model's head size is checked when the engine starts
        except VLLMError as e:
            raise UsageError(f"--backend vllm: {e}") from None


def sampling_params(args: argparse.Namespace):
    """``steering.generation.SamplingParams`` from the flags of :func:`add_sampling_arguments` (a bad value: a usage
    error naming its flag)."""
    try:
        return EvalSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens).sampling_params()
    except ValueError as e:
        raise flag_error(e) from None


def record(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation flags as a command's result.json records them."""
    return {**from_args(args).record(), "limit": args.limit}


def flag_error(error: Exception, prefix: str = "") -> UsageError:
    """``"top_p must be ..."`` -> ``UsageError("--top-p must be ...")``: a message about a setting, said of the flag
    that sets it (``prefix``: the flags' common prefix, e.g. ``--reward-``)."""
    name, _, rest = str(error).partition(" ")
    flag = _FLAG_OF.get(name) or f"{prefix or '--'}{name.replace('_', '-')}"
    return UsageError(f"{flag} {rest}")


def add_statistics_arguments(parser: argparse.ArgumentParser) -> None:
    """The statistics' options (``steering.statistics``), shared by ``evaluate`` and ``compare``."""
    from steering import statistics as stats

    g = parser.add_argument_group("statistics (intervals, paired tests, detectable differences)")
    g.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES, metavar="N",
                   help="bootstrap resamples of the problems, and random sign flips of the paired test "
                        f"(default {stats.DEFAULT_RESAMPLES}; at least 100)")
    g.add_argument("--stats-seed", type=int, default=stats.DEFAULT_SEED, metavar="SEED",
                   help="seed of the bootstrap draws and the sign flips: the same seed gives the same intervals and "
                        f"p-values (default {stats.DEFAULT_SEED})")


def check_statistics(args: argparse.Namespace) -> None:
    if args.resamples < 100:
        raise UsageError(f"--resamples must be >= 100, got {args.resamples}")
