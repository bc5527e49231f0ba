"""``python -m analysis evaluate``: accuracy of a base model, steering / LoRA / full checkpoints on math benchmarks.

Command::

    python -m analysis evaluate --model Qwen/Qwen2.5-Math-1.5B --include-base --base-greedy \\
        --checkpoint steering=runs/steer/checkpoint-314 --checkpoint lora=runs/lora/checkpoint-314 \\
        --checkpoint full=runs/full/checkpoint-314 --benchmarks six --seeds 0 1 2 --out eval/qwen-math-1.5b

writes ``OUT/results.json`` (every number, per row, benchmark and seed, with the exact settings), ``OUT/table.md``
(the papers' table: rows Base / Steering / LoRA / Full, one column per benchmark, Avg, Relative and Relative
Improvement, mean ± std over seeds) and ``OUT/samples.jsonl`` (every completion, its extracted answer and verdict).

Library use (what the other analyses reuse)::

    from analysis.evaluate import evaluate_model
    from steering.generation import SamplingParams
    res = evaluate_model(model, tokenizer, problems, template="qwen_math",
                         params=SamplingParams(max_new_tokens=512, temperature=0.0), num_samples=1, seeds=[0])
    res.accuracy, res.per_problem_accuracy, res.seeds[0].correct

See :func:`evaluate_model`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analysis import metrics as M
from analysis.cli import UsageError, default_device, prepare_out, write_json

# --------------------------------------------------------------------------------------------------------------------
# Library: evaluate one model on one list of problems


@dataclass
class SeedResult:
    """One seed's evaluation: ``correct[i][j]`` is the verdict of sample ``j`` of problem ``i``; ``samples[i][j]``
    the full record (completion, extracted answer, reward, ...)."""

    seed: int
    correct: list[list[bool]]
    samples: list[list[dict[str, Any]]]

    @property
    def accuracy(self) -> float:
        """avg@k over this seed's samples (= plain accuracy with one sample per problem)."""
        return M.avg_at_k(self.correct)

    @property
    def pass_at_1(self) -> float:
        return M.pass_at_1(self.correct)

    @property
    def num_samples(self) -> int:
        return len(self.correct[0]) if self.correct else 0

    def metrics(self, pass_ks: Iterable[int] = ()) -> dict[str, Any]:
        k = self.num_samples
        out: dict[str, Any] = {
            "seed": self.seed,
            "accuracy": self.accuracy,
            f"avg@{k}": self.accuracy,
            "pass@1": self.pass_at_1,
            "num_problems": len(self.correct),
            "num_samples": k,
            "num_correct": sum(sum(row) for row in self.correct),
            "num_completions": sum(len(row) for row in self.correct),
            "num_unparsed": sum(1 for row in self.samples for s in row if s.get("extracted") is None),
            "num_timed_out": sum(1 for row in self.samples for s in row if s.get("timed_out")),
        }
        for pk in sorted(set(pass_ks)):
            if 1 < pk <= k:
                out[f"pass@{pk}"] = M.pass_at_k(self.correct, pk)
        return out


@dataclass
class EvalResult:
    """The evaluation of one model on one problem list, over one or more seeds.

    - ``accuracy`` / ``std``: mean and std over seeds of the per-seed avg@k;
    - ``per_seed_accuracy``: the per-seed avg@k values;
    - ``per_problem_accuracy``: for each problem, the fraction of its samples (all seeds) that are correct;
    - ``seeds``: the :class:`SeedResult` of each seed (verdicts and full sample records).
    """

    problems: list[dict[str, Any]]
    num_samples: int
    seeds: list[SeedResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def per_seed_accuracy(self) -> list[float]:
        return [s.accuracy for s in self.seeds]

    @property
    def accuracy(self) -> float:
        return M.mean_std(self.per_seed_accuracy)[0]

    @property
    def std(self) -> float:
        return M.mean_std(self.per_seed_accuracy)[1]

    @property
    def per_problem_accuracy(self) -> list[float]:
        n = len(self.problems)
        return [sum(sum(s.correct[i]) for s in self.seeds) / sum(len(s.correct[i]) for s in self.seeds)
                for i in range(n)]

    def records(self) -> Iterable[dict[str, Any]]:
        for s in self.seeds:
            for row in s.samples:
                yield from row

    def summary(self, pass_ks: Iterable[int] = ()) -> dict[str, Any]:
        per_seed = [s.metrics(pass_ks) for s in self.seeds]
        mean, std = M.mean_std(self.per_seed_accuracy)
        out = {"accuracy": mean, "std": std, "num_samples": self.num_samples,
               "metric": metric_name(self.num_samples), "per_seed": per_seed}
        p1_mean, p1_std = M.mean_std([p["pass@1"] for p in per_seed])
        out["pass@1"], out["pass@1_std"] = p1_mean, p1_std
        return out


def metric_name(num_samples: int) -> str:
    return f"avg@{num_samples}" if num_samples > 1 else "pass@1"


def _as_problem(p: Any, i: int) -> dict[str, Any]:
    if not isinstance(p, Mapping) or "question" not in p or "answer" not in p:
        raise ValueError(f"problem {i} must be a mapping with 'question' and 'answer'")
    return {"id": p.get("id", i), "question": str(p["question"]), "answer": str(p["answer"])}


def _completion_texts(result: Any, n_prompts: int, n_samples: int) -> tuple[list[list[str]], list[list[Any]]]:
    """(texts, extras) per prompt from a :class:`steering.generation.GenerationResult`, whose rows are in prompt order:
    prompt ``i``'s samples are rows ``i*n .. i*n+n-1``."""
    flat = list(result.completions)
    if len(flat) != n_prompts * n_samples:
        raise RuntimeError(f"generate returned {len(flat)} completions for {n_prompts} prompts x {n_samples} samples")
    ids, finished = result.completion_ids, result.finished
    texts = [flat[i * n_samples:(i + 1) * n_samples] for i in range(n_prompts)]
    extras = [[{"num_tokens": len(ids[i * n_samples + j]), "finished": bool(finished[i * n_samples + j])}
               for j in range(n_samples)] for i in range(n_prompts)]
    return texts, extras


# Generation seeds chunk c of a call with ``seed + c``; evaluation seed s uses ``s * SEED_STRIDE`` so that the chunks of
# different evaluation seeds never share a random stream.
SEED_STRIDE = 1_000_003


def evaluate_model(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Mapping[str, Any]],
    *,
    template: Any = "qwen_math",
    params: Any = None,
    num_samples: int = 1,
    seeds: Iterable[int] = (0,),
    batch_size: int | None = None,
    reward_style: str = "pm1",
    timeout_s: float = 2.0,
    backend: str = "hf",
    progress: bool = False,
    answer_format: str | None = None,
    max_length: int | None = None,
    options: Any = None,
) -> EvalResult:
    """Generate ``num_samples`` completions per problem for each seed, and verify each against the ground truth.

    Args:
        model, tokenizer: a causal LM (plain, steered PeftModel, LoRA PeftModel, ...) and its tokenizer.
        problems: ``{"question", "answer"}`` mappings (an ``id`` is kept if present).
        template: a :class:`steering.templates.PromptTemplate` or a name / path for ``get_template`` ("qwen_math",
            "r1"). The prompt is ``template.render(question, tokenizer)``; answers are extracted in the template's
            ``answer_format`` (unless ``answer_format`` is given).
        params: :class:`steering.generation.SamplingParams` (T = 0 is greedy). Default: T = 1, 1024 new tokens.
        num_samples: completions per problem and seed (k of avg@k).
        seeds: one evaluation per seed; ``generate`` gets ``seed * SEED_STRIDE`` (see :data:`SEED_STRIDE`).
        batch_size: rows (prompts x samples) per generation call (``steering.generation.generate``'s
            ``batch_size``; results depend on it, since each chunk is seeded on its own). Default: all at once.
        reward_style, timeout_s, options: passed to ``steering.rewards.score_batch`` (the training reward's check;
            ``options`` is a ``steering.rewards.GradingOptions``, default math-verify's own).
        backend, progress: passed to ``generate`` (the same generation path training uses).
        max_length: if given, a limit on prompt + completion tokens per problem (the papers' "max length", 4096 for
            Qwen): generation runs to ``max_length - shortest prompt`` new tokens and each completion is then cut to
            ``max_length - its prompt length`` (cutting later tokens never changes earlier ones, so this is exactly
            a per-problem limit). ``params.max_new_tokens`` is ignored then.

    Returns:
        :class:`EvalResult`: ``.accuracy`` (mean avg@k over seeds), ``.std``, ``.per_seed_accuracy``,
        ``.per_problem_accuracy``, and per seed ``.seeds[s].correct[i][j]`` / ``.seeds[s].samples[i][j]``.
    """
    from steering.generation import SamplingParams, generate
    from steering.rewards import GradingOptions, score_batch
    from steering.templates import get_template

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    probs = [_as_problem(p, i) for i, p in enumerate(problems)]
    if not probs:
        raise ValueError("no problems to evaluate")
    tmpl = get_template(template) if isinstance(template, (str, os.PathLike)) else template
    fmt = answer_format or tmpl.answer_format
    if params is None:
        params = SamplingParams(max_new_tokens=1024, temperature=1.0)
    prompts = [tmpl.render(p["question"], tokenizer=tokenizer) for p in probs]
    budgets = None
    if max_length is not None:
        import dataclasses

        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        budgets = [max(0, int(max_length) - n) for n in lengths]
        params = dataclasses.replace(params, max_new_tokens=max(1, max(budgets)))
    seed_results = []
    for seed in seeds:
        result = generate(model, tokenizer, prompts, params, num_return_sequences=num_samples,
                          batch_size=batch_size, seed=seed * SEED_STRIDE, backend=backend,
                          progress=progress)
        if budgets is not None:
            _truncate(result, tokenizer, budgets, num_samples)
        texts, extras = _completion_texts(result, len(prompts), num_samples)
        verdicts = score_batch([t for row in texts for t in row],
                               [p["answer"] for p in probs for _ in range(num_samples)],
                               answer_format=fmt, reward_style=reward_style, timeout_s=timeout_s,
                               options=options)
        correct: list[list[bool]] = []
        samples: list[list[dict[str, Any]]] = []
        for i, p in enumerate(probs):
            c_row, s_row = [], []
            for j, text in enumerate(texts[i]):
                r = verdicts[i * num_samples + j]
                c_row.append(bool(r.correct))
                s_row.append({"problem_id": p["id"], "seed": seed, "sample": j, "question": p["question"],
                              "answer": p["answer"], "completion": text, "extracted": r.extracted,
                              "parsed": bool(r.parsed), "correct": bool(r.correct), "reward": float(r.reward),
                              "timed_out": bool(r.timed_out), "status": getattr(r, "status", None),
                              **extras[i][j]})
            correct.append(c_row)
            samples.append(s_row)
        seed_results.append(SeedResult(seed, correct, samples))
    settings = {"template": getattr(tmpl, "name", str(template)), "answer_format": fmt,
                "sampling": _params_dict(params), "num_samples": num_samples, "seeds": seeds,
                "batch_size": batch_size, "generation_seeds": [s * SEED_STRIDE for s in seeds],
                "reward_style": reward_style, "reward_timeout_s": timeout_s,
                "grading_options": asdict(options or GradingOptions()),
                "backend": backend, "max_length": max_length}
    return EvalResult(probs, num_samples, seed_results, settings)


def _truncate(result: Any, tokenizer: Any, budgets: list[int], n: int) -> None:
    """Cut row ``r`` (prompt ``r // n``) to ``budgets[r // n]`` completion tokens, re-decoding the text."""
    for r, ids in enumerate(result.completion_ids):
        budget = budgets[r // n]
        if len(ids) > budget:
            result.completion_ids[r] = ids[:budget]
            result.completions[r] = tokenizer.decode(ids[:budget], skip_special_tokens=True)
            result.finished[r] = False


def _params_dict(params: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(params):
        return asdict(params)
    return {k: getattr(params, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample")
            if hasattr(params, k)}


# --------------------------------------------------------------------------------------------------------------------
# Rows: what is evaluated (base / steering / LoRA / full), and loading it

ROLE_NAMES = {"base": "Base", "base_greedy": "Base (greedy)", "steering": "Steering", "lora": "LoRA", "full": "Full"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class RowSpec:
    """One row of the table: a model to evaluate."""

    label: str
    kind: str  # base | steering | lora | full
    role: str  # base | base_greedy | steering | lora | full | other
    path: str | None  # checkpoint / model dir (None for the base row)
    base_model: str | None  # base to load the adapter onto / the base row's model
    tokenizer: str | None
    greedy: bool = False

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "role": self.role, "path": self.path,
                "base_model": self.base_model, "tokenizer": self.tokenizer, "greedy": self.greedy}


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``steering`` (has steering.json), ``lora`` (adapter_config.json without it) or ``full`` (config.json)."""
    from steering import vectors as sv

    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--checkpoint {path}: no such directory")
    if (p / sv.META_FILE).is_file():
        return "steering"
    if (p / sv.ADAPTER_CONFIG_FILE).is_file():
        return "lora"
    if (p / "config.json").is_file():
        return "full"
    raise UsageError(f"--checkpoint {path}: not a checkpoint (no steering.json, adapter_config.json or config.json)")


def _has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()


def _check_model_id(name: str, flag: str = "--model") -> None:
    """A model argument must be an existing model dir or look like a Hub id (``Org/Name``); checked offline."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{flag} {name}: not a directory")
        if not (p / "config.json").is_file():
            raise UsageError(f"{flag} {name}: no config.json in that directory (not a model directory)")
        return
    if name.startswith(("/", ".", "~")) or not _HUB_ID_RE.match(name):
        raise UsageError(f"{flag} {name}: no such directory (and not a Hub id like Org/Name)")


def checkpoint_info(path: str, model: str | None) -> tuple[str, str | None, str | None]:
    """(kind, base model id, tokenizer source) of a checkpoint dir, checked without loading any weights."""
    from steering import vectors as sv

    kind = checkpoint_kind(path)
    if kind == "steering":
        if not sv.is_checkpoint(path):
            raise UsageError(f"--checkpoint {path}: not a complete steering checkpoint (needs "
                             f"{sv.ADAPTER_WEIGHTS_FILE} and {sv.META_FILE})")
        try:
            meta = sv.read_meta(path)
        except sv.CheckpointError as e:
            raise UsageError(str(e)) from None
        base = model or meta.get("base_model")
        if not base:
            raise UsageError(f"--checkpoint {path}: records no base model; pass --model BASE")
        return kind, base, base
    if kind == "lora":
        try:
            cfg = json.loads((Path(path) / sv.ADAPTER_CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise UsageError(f"--checkpoint {path}: unreadable {sv.ADAPTER_CONFIG_FILE} ({e})") from None
        if not any(Path(path, f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UsageError(f"--checkpoint {path}: LoRA adapter without adapter_model.safetensors")
        base = model or cfg.get("base_model_name_or_path")
        if not base:
            raise UsageError(f"--checkpoint {path}: adapter_config.json names no base model; pass --model BASE")
        return kind, base, path if _has_tokenizer(path) else base
    tok = path if _has_tokenizer(path) else model
    if tok is None:
        raise UsageError(f"--checkpoint {path}: full model dir without tokenizer files; pass --model BASE for the "
                         "tokenizer")
    return kind, None, tok


def _load_lm(name: str, dtype: Any):
    import torch
    from transformers import AutoModelForCausalLM

    from steering import vectors as sv

    model = AutoModelForCausalLM.from_pretrained(name, dtype=sv.parse_dtype(dtype) if dtype else torch.float32)
    return sv.freeze(model).eval()


def load_row_model(row: RowSpec, *, dtype: Any = "float32", device: str | None = None):
    """(model, tokenizer) for a row: the base, a steering checkpoint on its base, a LoRA adapter (PeftModel) on its
    base, or a full model dir."""
    from steering import vectors as sv

    if row.kind == "base":
        model = _load_lm(row.base_model, dtype)
    elif row.kind == "steering":
        model = sv.load_steered_model(row.path, base=_load_lm(row.base_model, dtype))
    elif row.kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(_load_lm(row.base_model, dtype), row.path)
    elif row.kind == "full":
        model = _load_lm(row.path, dtype)
    else:
        raise ValueError(f"unknown row kind {row.kind!r}")
    tokenizer = sv.load_tokenizer(row.tokenizer)
    return model.to(default_device(device)).eval(), tokenizer


def check_loadable(rows: Sequence[RowSpec]) -> None:
    """Read the config of every model a row needs (cheap: no weights), so a wrong Hub id or an unreachable Hub fails
    with one line before anything big loads."""
    from transformers import AutoConfig

    seen: set[str] = set()
    for row in rows:
        name = row.path if row.kind == "full" else row.base_model
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            AutoConfig.from_pretrained(name)
        except Exception as e:  # OSError (missing / offline), ValueError (unknown model type), ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"cannot load the model config of {name!r} (row {row.label!r}): {msg[:300]}") from None


def build_rows(checkpoints: Sequence[str], labels: Sequence[str], model: str | None, include_base: bool,
               base_greedy: bool) -> list[RowSpec]:
    """The rows to evaluate, checked (directories, kinds, base models) before anything loads."""
    if model is not None:
        _check_model_id(model)
    if labels and len(labels) != len(checkpoints):
        raise UsageError(f"--label given {len(labels)} times for {len(checkpoints)} --checkpoint; give one label per "
                         "checkpoint, or write --checkpoint LABEL=DIR")
    rows: list[RowSpec] = []
    parsed = []
    for i, item in enumerate(checkpoints):
        label = labels[i] if labels else None
        m = re.match(r"^([A-Za-z][\w .\-()]*)=(.+)$", item)
        if m and not Path(item).exists():
            if label is not None:
                raise UsageError(f"--checkpoint {item}: labelled both inline and with --label")
            label, path = m.group(1), m.group(2)
        else:
            path = item
        kind, base, tok = checkpoint_info(path, model)
        parsed.append((label, path, kind, base, tok))
    base_id = model
    if base_id is None:
        base_id = next((b for _, _, k, b, _ in parsed if k in ("steering", "lora") and b), None)
    if not checkpoints or include_base or base_greedy:
        if base_id is None:
            if not checkpoints:
                raise UsageError("nothing to evaluate: give --model BASE (the unsteered base) and/or --checkpoint DIR")
            raise UsageError("--include-base / --base-greedy need a base model: pass --model BASE")
        if not checkpoints or include_base:
            rows.append(RowSpec("Base", "base", "base", None, base_id, base_id))
        if base_greedy:
            rows.append(RowSpec("Base (greedy)", "base", "base_greedy", None, base_id, base_id, greedy=True))
    kind_counts: dict[str, int] = {}
    for _, _, kind, _, _ in parsed:
        kind_counts[kind] = kind_counts.get(kind, 0) + 1
    for label, path, kind, base, tok in parsed:
        if label is not None:
            role = label.lower() if label.lower() in ROLE_NAMES else kind
            shown = ROLE_NAMES.get(label.lower(), label)
        else:
            role = kind
            shown = ROLE_NAMES[kind] if kind_counts[kind] == 1 else f"{ROLE_NAMES[kind]} ({Path(path).name})"
        rows.append(RowSpec(shown, kind, role, str(path), base, tok))
    seen: set[str] = set()
    for r in rows:
        if r.label in seen:
            raise UsageError(f"two rows are labelled {r.label!r}; give distinct labels (--checkpoint LABEL=DIR)")
        seen.add(r.label)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Table


def _role_row(rows: list[dict[str, Any]], role: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["role"] == role), None)


def add_relative(rows: list[dict[str, Any]]) -> None:
    """Fill each row's ``relative`` / ``relative_improvement`` (percent, on the Avg) where the rows they need exist:
    Full (role full) for Relative, and Base (role base, else base_greedy) and Full for Relative Improvement."""
    full = _role_row(rows, "full")
    base = _role_row(rows, "base") or _role_row(rows, "base_greedy")
    for r in rows:
        avg = r["avg"]["mean"] if r.get("avg") else None
        r["relative"] = M.relative(avg, full["avg"]["mean"]) if full and avg is not None else None
        r["relative_improvement"] = (M.relative_improvement(avg, base["avg"]["mean"], full["avg"]["mean"])
                                     if full and base and avg is not None else None)
    for r in rows:
        r["relative_to"] = {"full": full["label"] if full else None, "base": base["label"] if base else None}


def render_table(results: dict[str, Any], digits: int = 2) -> str:
    """The papers' table in markdown: one row per model, one column per benchmark, Avg, Relative, Rel. Improvement."""
    rows = results["rows"]
    benches = results["benchmarks"]
    has_full = any(r["role"] == "full" for r in rows)
    has_base = any(r["role"] in ("base", "base_greedy") for r in rows)
    head = ["Model"] + [f"{b['name']} ({b['metric']})" for b in benches] + ["Avg"]
    if has_full:
        head.append("Relative (%)")
    if has_full and has_base:
        head.append("Rel. Improvement (%)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["label"]]
        for b in benches:
            res = r["results"].get(b["name"])
            cells.append(M.format_mean_std(res["accuracy"], res["std"], digits=digits) if res else "–")
        cells.append(M.format_mean_std(r["avg"]["mean"], r["avg"]["std"], digits=digits) if r.get("avg") else "–")
        if has_full:
            cells.append("–" if r["relative"] is None else f"{r['relative']:.{digits}f}")
        if has_full and has_base:
            cells.append("–" if r["relative_improvement"] is None else f"{r['relative_improvement']:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    samp = s["sampling"]
    seeds = s["seeds"]
    limit = (f"max length (prompt + completion) = {s['max_length']}" if s.get("max_length")
             else f"max new tokens = {samp['max_new_tokens']}")
    notes = [
        "",
        f"Accuracy (%), mean ± std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))}); T = {samp['temperature']}, top-p = {samp['top_p']}, {limit}, "
        f"template = {s['template']}. avg@k = mean correctness over k samples per problem; pass@1 = one sample.",
    ]
    if any(r["role"] == "base_greedy" for r in rows):
        notes.append("Base (greedy): T = 0, one sample, one seed.")
    if has_full:
        notes.append("Relative = Avg / Full Avg × 100" + ("; Rel. Improvement = (Avg − Base Avg) / (Full Avg − Base "
                                                            "Avg) × 100." if has_base else "."))
    return "\n".join(lines + notes) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# CLI


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Generation / scoring arguments shared by ``evaluate`` and ``select``."""
    g = parser.add_argument_group("generation and scoring")
    g.add_argument("--template", default=None,
                   help="prompt template: qwen_math, r1, or a template file (default: the template recorded in the "
                        "first steering checkpoint's training config, else qwen_math)")
    g.add_argument("--num-samples", "-k", type=int, default=None, metavar="K",
                   help="samples per problem (k of avg@k) for every benchmark; default: 32 for aime24/aime25/amc23, "
                        "1 otherwise; always 1 at temperature 0")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0, the papers' setting)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default)")
    g.add_argument("--max-new-tokens", type=int, default=4096, help="completion length limit (default 4096)")
    g.add_argument("--max-length", type=int, default=None, metavar="L",
                   help="limit prompt + completion to L tokens per problem instead (the papers: 4096 for Qwen, 8192 "
                        "for Llama); overrides --max-new-tokens")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one evaluation per seed; mean ± std over seeds (default: 0)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="completions (prompts x samples) per generation call (default 256; the KV cache of one call "
                        "must fit in memory)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N problems of each "
                   "benchmark (quick runs)")
    g.add_argument("--question-key", default=None, help="question field of local benchmark files (default: auto)")
    g.add_argument("--answer-key", default=None, help="answer field of local benchmark files (default: auto)")
    g.add_argument("--pass-k", type=int, nargs="*", default=[], metavar="K",
                   help="also report the unbiased pass@K for these K (<= samples per problem)")
    g.add_argument("--reward-timeout", type=float, default=2.0, help="seconds per answer check (default 2)")
    # math-verify's grading options (steering.rewards.GradingOptions), with its defaults.
    g.add_argument("--reward-float-rounding", type=int, default=6, metavar="N",
                   help="math-verify float_rounding: decimal places floats are rounded to before comparing (default 6)")
    g.add_argument("--reward-numeric-precision", type=int, default=15, metavar="N",
                   help="math-verify numeric_precision: significant digits of numeric evaluation (default 15)")
    g.add_argument("--reward-strict", action=argparse.BooleanOptionalAction, default=True,
                   help="math-verify strict: variables must match and sets never equal tuples (default: on)")
    g.add_argument("--reward-allow-set-relation-comp", action=argparse.BooleanOptionalAction, default=False,
                   help="math-verify allow_set_relation_comp: a relation in the answer may equal a set in the ground "
                        "truth (default: off)")
    g.add_argument("--backend", default="hf", choices=["hf", "static"],
                   help="generation backend of steering.generation: hf (model.generate) or static (static KV cache, "
                        "compiled on CUDA); default hf")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU); steering vectors stay fp32")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_eval_args(args: argparse.Namespace) -> None:
    """Reject bad numbers before anything loads."""
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_length is not None and args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {args.max_length}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds has duplicates: {args.seeds}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if any(k < 1 for k in args.pass_k):
        raise UsageError(f"--pass-k values must be >= 1, got {args.pass_k}")
    if args.reward_timeout <= 0:
        raise UsageError(f"--reward-timeout must be > 0, got {args.reward_timeout}")
    try:
        grading_options(args)
    except ValueError as e:
        raise UsageError(f"--reward-{str(e).replace('_', '-')}") from None


def grading_options(args: argparse.Namespace):
    """The ``--reward-*`` grading flags as a ``steering.rewards.GradingOptions``."""
    from steering.rewards import GradingOptions

    return GradingOptions(float_rounding=args.reward_float_rounding, numeric_precision=args.reward_numeric_precision,
                          strict=args.reward_strict, allow_set_relation_comp=args.reward_allow_set_relation_comp)


def resolve_template(name: str | None, rows_or_paths: Iterable[str | None] = ()):
    """The PromptTemplate to use: ``name``, else the first steering checkpoint's recorded one, else qwen_math."""
    from steering import vectors as sv

    if name is None:
        for path in rows_or_paths:
            if path and Path(path, sv.META_FILE).is_file():
                try:
                    tc = sv.read_meta(path).get("training_config") or {}
                except sv.CheckpointError:
                    continue
                if isinstance(tc, dict) and tc.get("template"):
                    name = str(tc["template"])
                    break
    name = name or "qwen_math"
    try:
        from steering.templates import get_template

        return get_template(name)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise UsageError(f"--template {name}: {e}") from None


def load_benchmarks_or_exit(specs: Sequence[str], args: argparse.Namespace):
    from steering.problems import DataError, load_benchmarks

    try:
        return load_benchmarks(list(specs), question_key=args.question_key, answer_key=args.answer_key,
                               limit=args.limit)
    except DataError as e:
        raise UsageError(str(e)) from None


def make_params(args: argparse.Namespace, *, greedy: bool = False):
    from steering.generation import SamplingParams

    temperature = 0.0 if greedy else args.temperature
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                          top_k=args.top_k, do_sample=temperature > 0)


def samples_for(bench: Any, args: argparse.Namespace, greedy: bool) -> int:
    if greedy or args.temperature == 0:
        return 1
    return args.num_samples if args.num_samples is not None else bench.default_samples


def resolve_dtype(dtype: str | None, device: str) -> str:
    if dtype:
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def environment() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "trl", "math_verify", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed / no version attribute
            out[mod] = None
    return out


def evaluate_rows(rows: list[RowSpec], benches: list[Any], args: argparse.Namespace, template: Any,
                  out: Path | None = None) -> dict[str, Any]:
    """Evaluate every row on every benchmark; write samples.jsonl / results.json / table.md under ``out`` (if given).
    Returns the results dict (the content of results.json)."""
    from tqdm.auto import tqdm

    device = default_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    params = make_params(args)
    bench_meta = []
    for b in benches:
        k = samples_for(b, args, greedy=False)
        bench_meta.append({**b.describe(), "num_samples": k, "metric": metric_name(k)})
    results: dict[str, Any] = {
        "settings": {
            "template": template.name, "answer_format": template.answer_format,
            "sampling": _params_dict(params), "seeds": list(args.seeds), "batch_size": args.batch_size,
            "limit": args.limit, "dtype": dtype, "device": device, "backend": args.backend,
            "max_length": args.max_length, "reward_style": "pm1", "reward_timeout_s": args.reward_timeout,
            "grading_options": asdict(grading_options(args)),
            "pass_k": list(args.pass_k),
            "num_samples": {b["name"]: b["num_samples"] for b in bench_meta},
            "greedy_rule": "temperature 0 -> 1 sample per problem",
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "argv": list(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "environment": environment(),
        },
        "benchmarks": bench_meta,
        "rows": [],
    }
    samples_f = open(out / "samples.jsonl", "w", encoding="utf-8") if out is not None else None
    units = sum(len(benches) * (1 if r.greedy else len(args.seeds)) for r in rows)
    bar = tqdm(total=units, desc="evaluate", unit="run", disable=args.no_progress, file=sys.stderr)
    try:
        for row in rows:
            bar.set_postfix_str(f"loading {row.label}")
            model, tokenizer = load_row_model(row, dtype=dtype, device=device)
            row_params = make_params(args, greedy=row.greedy)
            seeds = list(args.seeds[:1]) if row.greedy else list(args.seeds)
            row_out: dict[str, Any] = {**row.describe(), "seeds": seeds, "sampling": _params_dict(row_params),
                                       "results": {}}
            for b in benches:
                k = samples_for(b, args, greedy=row.greedy)
                per_seed_results = []
                for seed in seeds:
                    bar.set_postfix_str(f"{row.label} | {b.name} | seed {seed}")
                    res = evaluate_model(model, tokenizer, b.problems, template=template, params=row_params,
                                         num_samples=k, seeds=[seed], batch_size=args.batch_size,
                                         timeout_s=args.reward_timeout, options=grading_options(args),
                                         backend=args.backend,
                                         progress=not args.no_progress, max_length=args.max_length)
                    per_seed_results.append(res.seeds[0])
                    if samples_f is not None:
                        for rec in res.records():
                            samples_f.write(json.dumps({"row": row.label, "kind": row.kind, "path": row.path,
                                                        "benchmark": b.name, **rec}, ensure_ascii=False) + "\n")
                        samples_f.flush()
                    bar.update(1)
                full = EvalResult(res.problems, k, per_seed_results, res.settings)
                summ = full.summary(args.pass_k)
                summ["metric"] = metric_name(k)
                row_out["results"][b.name] = summ
            per_seed_avg = [sum(row_out["results"][b.name]["per_seed"][i]["accuracy"] for b in benches) / len(benches)
                            for i in range(len(seeds))]
            mean, std = M.mean_std(per_seed_avg)
            row_out["avg"] = {"mean": mean, "std": std, "per_seed": per_seed_avg}
            results["rows"].append(row_out)
            del model, tokenizer
            gc.collect()
            _empty_cuda_cache()
            add_relative(results["rows"])
            if out is not None:  # partial results after every row: a long run that dies keeps what it has
                write_json(out / "results.json", results)
    finally:
        bar.close()
        if samples_f is not None:
            samples_f.close()
    add_relative(results["rows"])
    results["settings"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results["table"] = render_table(results)
    if out is not None:
        write_json(out / "results.json", results)
        (out / "table.md").write_text(results["table"], encoding="utf-8")
    return results


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="accuracy of a base / steering / LoRA / full model on math benchmarks (the papers' table)",
        description="Evaluate the unsteered base (--model alone) and/or checkpoints (--checkpoint, repeatable: a "
                    "steering checkpoint, a PEFT LoRA adapter dir, or a full HF model dir) on benchmarks. Writes "
                    "OUT/results.json, OUT/table.md and OUT/samples.jsonl.")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]DIR",
                   help="checkpoint to evaluate (repeatable). LABEL base/steering/lora/full names the paper row; the "
                        "kind is read from the dir: steering.json -> steering, adapter_config.json -> LoRA, "
                        "config.json -> full model")
    p.add_argument("--label", action="append", default=[], help="row label for each --checkpoint, in order")
    p.add_argument("--model", default=None, metavar="BASE",
                   help="base model (Hub id or dir): alone, evaluates the unsteered base; with checkpoints, the base "
                        "they load onto (default: the base recorded in the checkpoint)")
    p.add_argument("--include-base", action="store_true", help="also evaluate the unsteered base as row 'Base'")
    p.add_argument("--base-greedy", action="store_true",
                   help="also evaluate the base greedily (T=0, one sample, first seed) as row 'Base (greedy)'")
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="SPEC",
                   help="comma/space separated: aime24 aime25 amc23 math500 minerva olympiadbench gsm8k math, six "
                        "(the papers' six), file:PATH (.json/.jsonl/.parquet), procedural:TASK[:N][:key=value]; "
                        "prefix LABEL= to rename")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_eval_args(args)
    rows = build_rows(args.checkpoint, args.label, args.model, args.include_base, args.base_greedy)
    template = resolve_template(args.template, [r.path for r in rows])
    benches = load_benchmarks_or_exit(args.benchmarks, args)
    check_loadable(rows)
    out = prepare_out(args.out)
    results = evaluate_rows(rows, benches, args, template, out)
    print(results["table"])
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'samples.jsonl'}")
    return 0
