"""The papers' results table: one row per model (Base / Steering / LoRA / Full ...), one column per benchmark, Avg,
Relative and Relative Improvement. Accuracies are fractions in ``results.json`` and percentages here.

- :func:`relative`: Relative (%) = method / full-tune * 100.
- :func:`relative_improvement`: Relative Improvement (%) = (method - base) / (full - base) * 100; with ``scale=1``
  the same ratio as a fraction, which the analysis commands report as their scores (how much of the gap between a
  reference and a target a variant closes).
- :func:`add_statistics`: the 95 % intervals of every number (bootstrap over problems), the paired differences
  between rows (:func:`resolve_pairs`) and the smallest detectable difference per benchmark, from the per-problem
  correct counts ``results.json`` keeps (the statistics themselves: ``steering.statistics``).
- :func:`render_table`, :func:`render_differences`: the tables of ``table.md``.
- The rows themselves (:class:`RowSpec`, :func:`build_rows`): the four kinds of model a table compares (the base, a
  steering checkpoint, a PEFT adapter (LoRA, IA3, ...), a full model directory), checked before any weights load, and
  :func:`load_row_model`, which loads one.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis import cli
from analysis.cli import UsageError
from steering import statistics as stats
from steering import vectors as sv


def relative(method: float, full: float) -> float | None:
    """Relative (%) = method / full * 100; None when the full-tune score is 0."""
    if full == 0:
        return None
    return 100.0 * method / full


def relative_improvement(method: float | None, base: float | None, full: float | None, *,
                         scale: float = 100.0) -> float | None:
    """``scale * (method - base) / (full - base)``; None when a term is missing or ``full - base`` is 0 or not
    finite."""
    if method is None or base is None or full is None:
        return None
    gap = full - base
    if gap == 0 or not math.isfinite(gap):
        return None
    return scale * (method - base) / gap


def format_mean_std(mean: float | None, std: float | None = None, *, scale: float = 100.0, digits: int = 2,
                    show_std: bool = True) -> str:
    """``"12.34 ± 0.56"`` (values scaled by ``scale``); ``"–"`` for a missing value."""
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if show_std and std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text


def _role_row(rows: list[dict[str, Any]], role: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["role"] == role), None)


def add_relative(rows: list[dict[str, Any]]) -> None:
    """Fill each row's ``relative`` / ``relative_improvement`` (percent, on the Avg) where the rows they need exist:
    Full (role full) for Relative, and Base (role base, else base_greedy) and Full for Relative Improvement."""
    full = _role_row(rows, "full")
    base = _role_row(rows, "base") or _role_row(rows, "base_greedy")
    for r in rows:
        avg = r["avg"]["mean"] if r.get("avg") else None
        r["relative"] = relative(avg, full["avg"]["mean"]) if full and avg is not None else None
        r["relative_improvement"] = (relative_improvement(avg, base["avg"]["mean"], full["avg"]["mean"])
                                     if full and base else None)
    for r in rows:
        r["relative_to"] = {"full": full["label"] if full else None, "base": base["label"] if base else None}


def format_interval(ci: Sequence[float] | None, *, scale: float = 100.0, digits: int = 2) -> str:
    """``" [8.10, 16.20]"`` (scaled by ``scale``); ``""`` without an interval."""
    return "" if not ci else f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def _cell(res: Mapping[str, Any] | None, mean: str, std: str, digits: int) -> str:
    if not res:
        return "–"
    return format_mean_std(res[mean], res[std], digits=digits) + format_interval(res.get("ci"), digits=digits)


def _percent_cell(value: float | None, ci: Sequence[float] | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}" + format_interval(ci, scale=1.0, digits=digits)


def render_table(results: dict[str, Any], digits: int = 2) -> str:
    """The papers' table in markdown: one row per model, one column per benchmark, Avg, Relative, Rel. Improvement;
    with intervals, the smallest detectable differences and the differences table when :func:`add_statistics` ran."""
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
        cells = [r["label"]] + [_cell(r["results"].get(b["name"]), "accuracy", "std", digits) for b in benches]
        cells.append(_cell(r.get("avg"), "mean", "std", digits))
        if has_full:
            cells.append(_percent_cell(r["relative"], r.get("relative_ci"), digits))
        if has_full and has_base:
            cells.append(_percent_cell(r["relative_improvement"], r.get("relative_improvement_ci"), digits))
        lines.append("| " + " | ".join(cells) + " |")
    notes = _notes(results, has_full, has_base)
    return "\n".join(lines + notes) + "\n" + render_differences(results, digits)


def _notes(results: Mapping[str, Any], has_full: bool, has_base: bool) -> list[str]:
    rows, s = results["rows"], results["settings"]
    samp, seeds = s["sampling"], s["seeds"]
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
        notes.append("Relative = Avg / Full Avg × 100" + ("; Rel. Improvement = (Avg − Base Avg) / (Full Avg − "
                                                            "Base Avg) × 100." if has_base else "."))
    st = s.get("statistics")
    if st:
        notes.append(f"[low, high]: {100 * st['confidence']:g} % interval, bootstrap over problems (a problem keeps "
                     f"its samples and seeds; {st['resamples']} resamples, seed {st['seed']}).")
        notes.append(_detectable_note(results))
    return notes


def _detectable_note(results: Mapping[str, Any]) -> str:
    det, st = results["detectable"], results["settings"]["statistics"]
    seeds = len(results["settings"]["seeds"])
    parts = [f"{name} ({d['num_problems']} problems × {_plural(d['num_samples'], 'sample')} × "
             f"{_plural(seeds, 'seed')}) {_points(d['detectable'])}{'*' if d['source'] == 'rows' else ''}"
             for name, d in det["benchmarks"].items()]
    parts.append(f"Avg {_points(det['avg']['detectable'])}")
    return (f"Smallest detectable difference (paired test, {100 * st['power']:g} % power, α = {st['alpha']:g}; from "
            "the per-problem differences of the compared rows, * from √2 × the rows' per-problem spread where no "
            "pair differs): " + "; ".join(parts) + ".")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def render_pair_detectable(differences: Sequence[Mapping[str, Any]]) -> str:
    """One line per pair: the smallest difference a paired test detects on each benchmark and the Avg, from that
    pair's per-problem differences."""
    lines = []
    for d in differences:
        parts = [f"{name} ({v['num_problems']} problems) {_points(v['detectable'])}"
                 for name, v in d["benchmarks"].items()]
        lines.append(f"Smallest detectable difference, {d['a']} − {d['b']} (paired test, {100 * stats.POWER:g} % "
                     f"power, α = {stats.ALPHA:g}): " + "; ".join(parts + [f"Avg {_points(d['avg']['detectable'])}"])
                     + ".")
    return "\n".join(lines) + ("\n" if lines else "")


def _points(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f} points"


def render_differences(results: Mapping[str, Any], digits: int = 2) -> str:
    """The differences table: one line per pair (A − B), one column per benchmark and the Avg; each cell the
    difference in points, its paired 95 % interval and the sign-flip test's p-value. ``""`` without pairs."""
    diffs = results.get("differences")
    if not diffs:
        return ""
    names = list(diffs[0]["benchmarks"])
    lines = ["", "Differences (points), paired over the same problems: A − B [95 % interval] (p = sign-flip "
             "permutation test)", "", "| A − B | " + " | ".join(names) + " | Avg |",
             "|---|" + ":---:|" * (len(names) + 1)]
    for d in diffs:
        cells = [_difference_cell(d["benchmarks"][n], digits) for n in names] + [_difference_cell(d["avg"], digits)]
        lines.append(f"| {d['a']} − {d['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _difference_cell(d: Mapping[str, Any], digits: int) -> str:
    return f"{100 * d['difference']:+.{digits}f}{format_interval(d['ci'], digits=digits)} (p = {d['p_value']:.3g})"


# --------------------------------------------------------------------------------------------------------------------
# Statistics on the table's numbers


def benchmark_scores(row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{benchmark: per-problem scores}`` of a results.json row, from its per-seed ``problem_correct`` counts (a
    problem's correct samples over all its samples and seeds)."""
    out = {}
    for name, res in row["results"].items():
        counts = [ps.get("problem_correct") for ps in res["per_seed"]]
        if any(c is None for c in counts):
            raise ValueError(f"row {row['label']!r}, benchmark {name!r}: no per-problem counts (problem_correct); "
                             "results.json was written before they were recorded: evaluate again")
        out[name] = stats.problem_scores(counts, res["num_samples"])
    return out


def _role_label(rows: Sequence[Mapping[str, Any]], *roles: str) -> str | None:
    return next((r["label"] for role in roles for r in rows if r["role"] == role), None)


def default_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Each row against Base (the sampled base, else Base (greedy)), and Steering against Full and LoRA."""
    base = _role_label(rows, "base", "base_greedy")
    pairs = [(r["label"], base) for r in rows if base is not None and r["label"] != base]
    steering = _role_label(rows, "steering")
    for other in (_role_label(rows, "full"), _role_label(rows, "lora")):
        if steering is not None and other is not None:
            pairs.append((steering, other))
    return pairs


def resolve_pairs(rows: Sequence[Mapping[str, Any]], named: Sequence[Sequence[str]] | None) -> list[tuple[str, str]]:
    """The ``(A, B)`` label pairs to difference (A − B): ``named`` (each name a row label or role, any case), or
    :func:`default_pairs`. ValueError naming an unknown row."""
    if not named:
        return default_pairs(rows)

    def find(name: str) -> str:
        for key in ("label", "role"):
            hit = next((r["label"] for r in rows if str(r[key]).lower() == name.lower()), None)
            if hit is not None:
                return hit
        raise ValueError(f"--pair: no row {name!r}; the rows are {[r['label'] for r in rows]}")

    pairs = [(find(a), find(b)) for a, b in named]
    same = [a for a, b in pairs if a == b]
    if same:
        raise ValueError(f"--pair: {same[0]!r} against itself")
    return pairs


def add_statistics(results: dict[str, Any], pairs: Sequence[tuple[str, str]], *,
                   resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED) -> None:
    """Fill in, from one set of bootstrap draws over problems: every row's ``ci`` per benchmark and on the Avg,
    ``relative_ci`` and ``relative_improvement_ci``; ``results["differences"]`` for ``pairs``; and
    ``results["detectable"]``, the smallest difference a paired test detects on each benchmark."""
    rows = results["rows"]
    boot = stats.Bootstrap({b["name"]: b["num_problems"] for b in results["benchmarks"]}, resamples, seed)
    scores = {r["label"]: benchmark_scores(r) for r in rows}
    avg_draws = {label: boot.average(s) for label, s in scores.items()}
    smallest = min(b["num_problems"] for b in results["benchmarks"])
    for r in rows:
        for name, res in r["results"].items():
            res["ci"] = stats.percentile_interval(boot.means(name, scores[r["label"]][name]), n=_size(results, name))
        r["avg"]["ci"] = stats.percentile_interval(avg_draws[r["label"]], n=smallest)
    _add_relative_intervals(rows, avg_draws, smallest)
    results["differences"] = [{"a": a, "b": b, **stats.paired_difference(scores[a], scores[b], boot)}
                              for a, b in pairs]
    results["detectable"] = detectable(results, scores)
    results["settings"]["statistics"] = {
        "confidence": stats.CONFIDENCE, "resamples": resamples, "seed": seed, "alpha": stats.ALPHA,
        "power": stats.POWER, "pairs": [list(p) for p in pairs],
        "scheme": "bootstrap over problems (a problem keeps its k samples and seeds), expanded percentile interval; "
                  "paired sign-flip permutation test; detectable difference of a paired t-test"}


def _size(results: Mapping[str, Any], name: str) -> int:
    return next(b["num_problems"] for b in results["benchmarks"] if b["name"] == name)


def _ratio_draws(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 100.0 * num / den
    return np.where(np.isfinite(out), out, np.nan)  # a draw with a zero denominator has no ratio


def _add_relative_intervals(rows: list[dict[str, Any]], avg_draws: Mapping[str, np.ndarray], n: int) -> None:
    """Relative and Rel. Improvement intervals: the ratios taken draw by draw, the rows on the same draws."""
    for r in rows:
        full, base = r.get("relative_to", {}).get("full"), r.get("relative_to", {}).get("base")
        own = avg_draws[r["label"]]
        r["relative_ci"] = (stats.percentile_interval(_ratio_draws(own, avg_draws[full]), n=n)
                            if r.get("relative") is not None else None)
        r["relative_improvement_ci"] = (
            stats.percentile_interval(_ratio_draws(own - avg_draws[base], avg_draws[full] - avg_draws[base]), n=n)
            if r.get("relative_improvement") is not None else None)


def detectable(results: Mapping[str, Any], scores: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Per benchmark (and the Avg), the difference a paired test detects with ``stats.POWER`` at ``stats.ALPHA``,
    from the per-problem spread observed here: the pooled (root mean square) SD of the compared pairs' per-problem
    differences (``source: pairs``); where there is no pair or they differ nowhere, √2 × the rows' pooled
    per-problem SD (``source: rows``: two rows as far apart per problem as independent ones, which is pessimistic
    when the rows share what makes a problem hard)."""
    diffs = results.get("differences") or []
    out: dict[str, Any] = {"benchmarks": {}}
    for b in results["benchmarks"]:
        name, n = b["name"], b["num_problems"]
        sd, source = _rms([d["benchmarks"][name]["sd"] for d in diffs]), "pairs"
        if not sd:
            spreads = [math.sqrt(2) * float(np.std(s[name], ddof=1)) for s in scores.values() if n > 1]
            sd, source = _rms(spreads), "rows"
        found = stats.detectable_difference(sd / math.sqrt(n), n - 1) if sd is not None else None
        out["benchmarks"][name] = {"num_problems": n, "num_samples": b["num_samples"], "sd": sd, "source": source,
                                   "detectable": found}
    sds = [(d["sd"], d["num_problems"]) for d in out["benchmarks"].values()]
    se = (math.sqrt(sum(sd ** 2 / n for sd, n in sds)) / len(sds)) if all(sd is not None for sd, _ in sds) else None
    out["avg"] = {"detectable": None if se is None else stats.detectable_difference(se, sum(n - 1 for _, n in sds))}
    return out


def _rms(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return math.sqrt(float(np.mean(np.square(vals)))) if vals else None


def forest_groups(differences: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[str, float, Any]]]:
    """The forest plot's panels: one per pair, a line per benchmark and the Avg, in points."""
    def line(label: str, d: Mapping[str, Any]) -> tuple[str, float, Any]:
        return label, 100 * d["difference"], None if d["ci"] is None else [100 * v for v in d["ci"]]

    return {f"{d['a']} − {d['b']}": [line(n, v) for n, v in d["benchmarks"].items()] + [line("Avg", d["avg"])]
            for d in differences}


# --------------------------------------------------------------------------------------------------------------------
# The rows: the four kinds of model a results table compares


ROLE_NAMES = {"base": "Base", "base_greedy": "Base (greedy)", "steering": "Steering", "lora": "LoRA", "full": "Full"}


@dataclass
class RowSpec:
    """One row of the table: a model to evaluate."""

    label: str
    kind: str  # base | steering | lora (a PEFT adapter: LoRA, IA3, ...) | full
    role: str  # base | base_greedy | steering | lora | full | other
    path: str | None  # checkpoint / model dir (None for the base row)
    base_model: str | None  # base to load the adapter onto / the base row's model
    tokenizer: str | None
    greedy: bool = False

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "role": self.role, "path": self.path,
                "base_model": self.base_model, "tokenizer": self.tokenizer, "greedy": self.greedy}


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``steering`` (has steering.json), ``lora`` (a PEFT adapter of any type but steering's BEFT: LoRA, IA3, AdaLoRA,
    LoHa, ...; PEFT loads it) or ``full`` (config.json, no adapter_config.json). Anything else is refused: a steering
    checkpoint that lost its steering.json (a BEFT adapter_config.json) is not evaluated as some other kind of row."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--checkpoint {path}: no such directory")
    if (p / sv.META_FILE).is_file():
        return "steering"
    expected = (f"expected a steering checkpoint ({sv.META_FILE}), a PEFT adapter (LoRA, IA3, ...: "
                f"{sv.ADAPTER_CONFIG_FILE}) or a full model directory (config.json)")
    if (p / sv.ADAPTER_CONFIG_FILE).is_file():
        from peft import PeftType

        peft_type = _adapter_config(path).get("peft_type")
        if peft_type == PeftType.BEFT:  # this project's steering adapter: its vectors are unreadable without the meta
            raise UsageError(f"--checkpoint {path}: {sv.ADAPTER_CONFIG_FILE} has peft_type {peft_type!r} and there is "
                             f"no {sv.META_FILE}; {expected}")
        if peft_type not in [t.value for t in PeftType]:  # a list: peft_type may be any JSON value
            raise UsageError(f"--checkpoint {path}: {sv.ADAPTER_CONFIG_FILE} has peft_type {peft_type!r}, which the "
                             f"installed PEFT does not know; {expected}")
        return "lora"
    if (p / "config.json").is_file():
        return "full"
    raise UsageError(f"--checkpoint {path}: not a checkpoint; {expected}")


def _adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """A PEFT adapter's adapter_config.json, read as JSON (no PEFT import, no weights)."""
    try:
        cfg = json.loads((Path(path) / sv.ADAPTER_CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--checkpoint {path}: unreadable {sv.ADAPTER_CONFIG_FILE} ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--checkpoint {path}: {sv.ADAPTER_CONFIG_FILE} is not a JSON object")
    return cfg


def _verify_manifest(path: str | os.PathLike) -> None:
    """A training checkpoint's checksums.json (``train.checkpointing``), where the directory has one: every file it
    lists but the training state (optimizer, RNG state, ...: a model load never reads it, and users delete it to save
    disk) is there with its recorded size and sha256."""
    from train import checkpointing as ckpt_io

    p = Path(path)
    if (p / ckpt_io.MANIFEST).is_file():
        ckpt_io.verify_manifest(p, "evaluate an intact checkpoint", training_state=False)  # names the file


def _has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()


def checkpoint_info(path: str, model: str | None) -> tuple[str, str | None, str | None]:
    """(kind, base model id, tokenizer source) of a checkpoint dir, checked without loading any weights."""
    kind = checkpoint_kind(path)
    _verify_manifest(path)
    if kind == "steering":
        cli.check_checkpoint_arg(path)
        base = cli.base_model_id(model, path)
        return kind, base, base
    if kind == "lora":
        cfg = _adapter_config(path)
        if not any(Path(path, f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UsageError(f"--checkpoint {path}: PEFT adapter without adapter_model.safetensors")
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
    """Any causal LM, frozen (LoRA and full-model rows may be of any family, unlike steered ones)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, dtype=sv.parse_dtype(dtype or "float32"))
    return sv.freeze(model).eval()


def load_row_model(row: RowSpec, *, dtype: Any = "float32", device: str | None = None, backend: str = "hf",
                   vllm_options: dict[str, Any] | None = None):
    """(model, tokenizer) for a row: the base, a steering checkpoint on its base, a PEFT adapter (PeftModel) on its
    base, or a full model dir. ``backend="vllm"``: a ``steering.vllm_engine.VLLMModel`` serving the same model
    (``vllm_options``: its KV-cache size, ...)."""
    if backend == "vllm":
        return _load_row_engine(row, dtype, device, vllm_options or {}), sv.load_tokenizer(row.tokenizer)
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
    return model.to(cli.default_device(device)).eval(), tokenizer


def _load_row_engine(row: RowSpec, dtype: Any, device: str | None, options: dict[str, Any]):
    from steering.vllm_engine import VLLMModel

    if row.kind == "lora":
        raise UsageError(f"row {row.label!r}: PEFT adapter rows are not served by --backend vllm here; use "
                         "--backend hf")
    model_dir = row.path if row.kind == "full" else row.base_model
    vectors = row.path if row.kind == "steering" else None
    device_type = "cuda" if str(cli.default_device(device)).startswith("cuda") else "cpu"
    return VLLMModel(model_dir, vectors, dtype=str(dtype).removeprefix("torch."), device=device_type, **options)


def check_vllm_rows(rows: Sequence[RowSpec], device: str | None) -> None:
    """``--backend vllm``: vLLM installed, a tested version, and every row's model servable here; PEFT adapter rows
    (LoRA, ...) are refused. One line each, before any weights load."""
    for row in rows:
        if row.kind == "lora":
            raise UsageError(f"--backend vllm: row {row.label!r} is a PEFT adapter (LoRA, ...), which this project "
                             "does not serve through vLLM; use --backend hf for adapter rows")
        cli.check_vllm_model(row.path if row.kind == "full" else row.base_model, device)


def check_loadable(rows: Sequence[RowSpec], template: Any) -> None:
    """Every row's cheap parts, all before the first row's weights load (so that a bad last row does not fail after
    the first ones were evaluated): the config of every model a row needs (a wrong Hub id or an unreachable Hub is
    one line); every steering row's vectors (a few kB) against its base's config (a truncated, tampered or
    non-finite checkpoint, or one made for another shape); every row's tokenizer, loaded, and ``template`` rendered
    with it (a chat template needs a tokenizer with one)."""
    from transformers import AutoConfig

    configs: dict[str, Any] = {}
    tokenizers: set[str] = set()
    for row in rows:
        name = row.path if row.kind == "full" else row.base_model
        if not name:
            continue
        if name not in configs:
            try:
                configs[name] = AutoConfig.from_pretrained(name)
            except Exception as e:  # OSError (missing / offline), ValueError (unknown model type), ...
                whose = "model" if row.kind == "full" else "base model: --model, or the one the checkpoint records"
                raise UsageError(f"cannot load the config of {name!r} (row {row.label!r}'s {whose}): "
                                 f"{cli.one_line(e)}") from None
        if row.kind == "steering":
            try:
                _, vectors = sv.read_checkpoint(row.path)
                sv.check_fits(vectors, configs[name], source=f"--checkpoint {row.path}", target=f"its base {name}")
            except sv.CheckpointError as e:
                raise UsageError(str(e)) from None
        if row.tokenizer not in tokenizers:
            _check_tokenizer(row, template)
            tokenizers.add(row.tokenizer)


def _check_tokenizer(row: RowSpec, template: Any) -> None:
    """The row's tokenizer loads (no weights: a few MB at most), and the template renders a prompt and finds its stops
    with it."""
    from steering.templates import TemplateError

    try:
        tokenizer = sv.load_tokenizer(row.tokenizer)
    except sv.SteeringError as e:
        raise UsageError(f"row {row.label!r}: {e}") from None
    try:
        template.render("1 + 1", tokenizer)
        template.stops(tokenizer)
    except TemplateError as e:
        raise UsageError(f"row {row.label!r}, tokenizer {row.tokenizer!r}: {e}") from None


def build_rows(checkpoints: Sequence[str], labels: Sequence[str], model: str | None, include_base: bool,
               base_greedy: bool) -> list[RowSpec]:
    """The rows to evaluate, checked (directories, kinds, base models) before anything loads."""
    if model is not None:
        cli.check_model_id(model)
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
