"""Build the offline demo's base model: a small Qwen2 model trained from scratch on generated arithmetic.

No pretrained model can be downloaded offline, so the demo steers a model made here. It is built to behave like a
base model that holds a *latent skill RL can elicit*: it knows the answers to single-digit arithmetic facts
(``facts`` in :mod:`steering.tasks`: ``What is 7 * 8?``, ``Compute 3 - 9.``; 900 questions), but writes them in the
rewarded ``\\boxed{...}`` form only about a quarter of the time. Its training completions work the equation out in
one of four formats (:data:`FORMATS`), drawn at random independently of the question::

    \\(7 * 8 = \\boxed{56}\\)              27%   <- the only form the reward accepts
    So 7 * 8 = 56. The answer is 56.  45%
    We have 7 * 8 = 56.              15%
    7 * 8 = 56                       13%

so the first generated token alone decides the format: sampling at T=1 gives a boxed answer ~25% of the time, and
greedy decoding never does (it starts with ``S``). A steering vector that makes the first token ``\\`` lifts the
reward from ~0.25 to ~1, which echoes the paper's finding that the last-layer vector mostly acts on the first
generated token. Restating the equation before the result is the model's "reasoning": a tiny transformer learns to
copy the operands and then look the result up far faster than it learns to produce the result directly (a model
trained on bare answers was still at ~10% after the same budget).

Every training text is the ``qwen_math`` prompt, rendered by :mod:`steering.templates` (the chat template with the
system message :data:`SYSTEM_PROMPT`, the question as the user turn, and the generation prompt), then the completion
and ``<|im_end|>``; the loss is on the completion tokens only. The committed model pretrains on all 900 questions
(``pretrain_part="all"``): it knows every fact, so validation / test questions are known facts, and the statistics in
``build_info.json`` are measured on the questions of the held-out partition (:func:`steering.tasks.is_heldout`).
``pretrain_part="train"`` holds those 92 back instead: each of them asks a fact the model then learned in another
phrasing only.

The build is deterministic in the seed (fixed thread count, deterministic algorithms, seeded data stream). The
shared system-prompt prefix is run once per batch and its KV cache broadcast to the batch, which roughly halves the
cost of a step; gradients flow through it as usual.

Usage::

    python -m train.demo_base --out assets/demo-base              # the committed model (~9 min on 1 CPU core)
    python -m train.demo_base --out /tmp/db --steps 20            # a quick (useless) model
    python -m train.demo_base --out /tmp/db --sanity              # + the last-layer steering-vector check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steering.files import publish_dir, write_text_atomic
from steering.templates import get_template

# The demo base is pretrained on the prompts the demo's RL run steers it on: the ``qwen_math`` template's.
QWEN_MATH = get_template("qwen_math")
SYSTEM_PROMPT = QWEN_MATH.system

# (name, probability, format) of the training completions. Each one works the equation out (``eq`` is e.g. ``12 + 7``,
# ``a`` the answer); the first character decides the format, and only the boxed one earns reward.
FORMATS: tuple[tuple[str, float, str], ...] = (
    ("boxed", 0.27, "\\({eq} = \\boxed{{{a}}}\\)"),
    ("so", 0.45, "So {eq} = {a}. The answer is {a}."),
    ("we_have", 0.15, "We have {eq} = {a}."),
    ("bare", 0.13, "{eq} = {a}"),
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO_ROOT / "assets" / "demo-base"

# Everything the build depends on. ``build_demo_base`` takes any of these as keyword arguments.
DEFAULTS: dict[str, Any] = {
    # Single-digit facts (+, -, *): 900 distinct questions. The base pretrains on all of them, so it *knows* every
    # answer (its latent skill) and RL only has to elicit the rewarded format. The committed assets/demo-base was
    # built with exactly these values (its build_info.json records them).
    "task": "arithmetic",
    "task_kwargs": {"ops": ["+", "-", "*"], "digits": 1},
    "pretrain_part": "all",
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "intermediate_size": 384,
    "max_position_embeddings": 512,
    "steps": 800,
    "batch_size": 64,
    "lr": 3e-3,
    "min_lr_ratio": 0.05,
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "betas": [0.9, 0.98],
    "grad_clip": 1.0,
    # One thread: faster than two on a shared 2-core machine, and the same reduction order everywhere.
    "threads": 1,
    "eval_size": 80,
}

# AutoTokenizer ignores tokenizer_class for qwen2 models and rebuilds a Qwen2Tokenizer from tokenizer.json, which
# silently changes this character tokenizer's ids. An ``auto_map`` entry makes it load tokenizer.json as is (as a
# TokenizersBackend, or with trust_remote_code=True as this trivial subclass).
_TOKENIZER_MODULE = "tokenization_char"
_TOKENIZER_CODE = '''"""The demo base's character-level tokenizer: exactly what tokenizer.json describes (one token per character).

Only here so that ``AutoTokenizer.from_pretrained(path, trust_remote_code=True)`` keeps these ids too; without
trust_remote_code, AutoTokenizer loads the same tokenizer.json as a plain ``TokenizersBackend``."""

from transformers import PreTrainedTokenizerFast


class CharTokenizer(PreTrainedTokenizerFast):
    pass
'''


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Save the character tokenizer so that ``AutoTokenizer.from_pretrained(out_dir)`` gives back the same ids."""
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    (out / f"{_TOKENIZER_MODULE}.py").write_text(_TOKENIZER_CODE)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, f"{_TOKENIZER_MODULE}.CharTokenizer"]}
    cfg["padding_side"] = "left"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


_INT_RE = re.compile(r"-?\d+")


# --------------------------------------------------------------------------------------------------------------------
# Prompts and completions


def build_prompt(tokenizer, question: str) -> str:
    """The ``qwen_math`` prompt: chat template, system message, question, generation prompt."""
    return QWEN_MATH.render(question, tokenizer)


def make_completion(question: str, answer: str, rng: random.Random) -> tuple[str, str]:
    """``(format name, completion text)`` for a question and its answer, the format drawn from :data:`FORMATS`."""
    from steering.tasks import equation_of

    eq = equation_of(question)
    if eq is None:
        raise ValueError(f"the demo base trains on the procedural arithmetic / word tasks only, not {question!r}")
    u, acc = rng.random(), 0.0
    for name, p, fmt in FORMATS:
        acc += p
        if u < acc:
            break
    return name, fmt.format(eq=eq, a=answer)


def boxed_completion(question: str, answer: str) -> str:
    """The training completion in the boxed (rewarded) format."""
    from steering.tasks import equation_of

    return FORMATS[0][2].format(eq=equation_of(question), a=answer)


def last_integer(text: str) -> str | None:
    found = _INT_RE.findall(text)
    return found[-1] if found else None


def score_completion(completion: str, answer: str) -> dict[str, bool]:
    """``boxed``: has a ``\\boxed{}``; ``number_correct``: its last integer is the answer;
    ``boxed_correct``: the last boxed content is the answer (what the reward pays for)."""
    from steering.rewards import extract_answer

    boxed = extract_answer(completion, "boxed")
    return {
        "boxed": boxed is not None,
        "number_correct": last_integer(completion) == answer,
        "boxed_correct": boxed is not None and boxed.strip() == answer,
    }


# --------------------------------------------------------------------------------------------------------------------
# Batches


class Batcher:
    """Deterministic training batches: a shared token prefix (system turn) plus right-padded suffixes."""

    def __init__(self, tokenizer, task: str, task_kwargs: Mapping[str, Any], seed: int, part: str | None = "train"):
        from steering.tasks import stream

        self.tok = tokenizer
        self.rows = stream(task, seed, part=part, **dict(task_kwargs))
        self.rng = random.Random(f"train.demo_base:formats:{seed}")
        self.pad_id = tokenizer.pad_token_id
        self.eos = tokenizer.eos_token
        # The prefix every prompt shares: everything up to the question's first character.
        a = build_prompt(tokenizer, "A")
        b = build_prompt(tokenizer, "B")
        n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        self.prefix_text = a[:n]
        self.prefix_ids = tokenizer(self.prefix_text, add_special_tokens=False)["input_ids"]

    def encode(self, question: str, completion: str) -> tuple[list[int], list[int]]:
        """Suffix ids (after the shared prefix) and labels (-100 on prompt tokens)."""
        prompt = build_prompt(self.tok, question)
        assert prompt.startswith(self.prefix_text)
        p_ids = self.tok(prompt[len(self.prefix_text):], add_special_tokens=False)["input_ids"]
        c_ids = self.tok(completion + self.eos, add_special_tokens=False)["input_ids"]
        return p_ids + c_ids, [-100] * len(p_ids) + c_ids

    def next(self, batch_size: int) -> dict[str, torch.Tensor]:
        seqs = []
        for _ in range(batch_size):
            row = next(self.rows)
            _, completion = make_completion(row["question"], row["answer"], self.rng)
            seqs.append(self.encode(row["question"], completion))
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def prefix_shared_loss(model, prefix_ids: Sequence[int], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy on labelled suffix tokens; the shared prefix runs once and its KV cache is
    repeated over the batch (exactly the same loss as running every full sequence, at a fraction of the cost)."""
    from transformers import DynamicCache

    from steering import compat

    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    bsz = input_ids.shape[0]
    prefix = torch.tensor([list(prefix_ids)], dtype=torch.long)
    cache = DynamicCache(config=model.config)
    key = compat.cache_kwarg(model)
    pre = model(input_ids=prefix, use_cache=True, **{key: cache})
    cache.batch_repeat_interleave(bsz)
    full_mask = torch.cat([torch.ones(bsz, prefix.shape[1], dtype=mask.dtype), mask], dim=1)
    out = model(input_ids=input_ids, attention_mask=full_mask, use_cache=True, **{key: cache})
    # The logit predicting suffix token 0 is the prefix's last position.
    logits = torch.cat([pre.logits[:, -1:].expand(bsz, -1, -1), out.logits[:, :-1]], dim=1)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def generate(model, tokenizer, questions: Sequence[str], *, temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int = 24, batch_size: int = 256) -> list[str]:
    """Completions of the ``qwen_math`` prompts; greedy when ``temperature`` is 0, else sampling (top-p 1, no
    top-k) with ``torch.manual_seed(seed)``."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    out: list[str] = []
    try:
        for i in range(0, len(questions), batch_size):
            prompts = [build_prompt(tokenizer, q) for q in questions[i : i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            kw: dict[str, Any] = {"do_sample": False}
            if temperature > 0:
                kw = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **kw)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def heldout_stats(model, tokenizer, rows: Sequence[Mapping[str, str]], *, temperature: float, seed: int = 0,
                  ) -> dict[str, float]:
    """Rates over ``rows``: ``p_boxed``, ``number_correct`` (last integer right), ``boxed_correct`` (the reward's
    notion of accuracy) and ``correct_given_boxed``."""
    comps = generate(model, tokenizer, [r["question"] for r in rows], temperature=temperature, seed=seed)
    scores = [score_completion(c, r["answer"]) for c, r in zip(comps, rows)]
    n = max(len(scores), 1)
    n_boxed = sum(s["boxed"] for s in scores)
    return {
        "n": len(scores),
        "p_boxed": n_boxed / n,
        "number_correct": sum(s["number_correct"] for s in scores) / n,
        "boxed_correct": sum(s["boxed_correct"] for s in scores) / n,
        "correct_given_boxed": (sum(s["boxed_correct"] for s in scores) / n_boxed) if n_boxed else float("nan"),
    }


def heldout_rows(n: int, *, task: str = "facts", seed: int = 12345, **task_kwargs: Any) -> list[dict[str, str]]:
    """Up to ``n`` questions of the held-out partition (fewer where the task has fewer: ``facts`` has 92)."""
    from steering.tasks import make_tasks

    return make_tasks(task, n, seed, part="heldout", allow_fewer=True, **task_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Build


def _lr_at(step: int, cfg: Mapping[str, Any]) -> float:
    warm, total = int(cfg["warmup_steps"]), int(cfg["steps"])
    if step < warm:
        return cfg["lr"] * (step + 1) / warm
    frac = (step - warm) / max(total - warm, 1)
    lo = cfg["lr"] * cfg["min_lr_ratio"]
    return lo + (cfg["lr"] - lo) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _set_determinism(seed: int, threads: int) -> None:
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    random.seed(seed)


def build_demo_base(out_dir: str | os.PathLike, *, seed: int = 0, progress: bool = True, **overrides: Any) -> Path:
    """Train the demo base model from scratch and save it (atomically) to ``out_dir``; return the path.

    ``overrides`` are any keys of :data:`DEFAULTS` (``steps``, ``batch_size``, ``lr``, model sizes, ...)."""
    from steering.tiny import build_char_tokenizer

    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"build_demo_base: unknown options {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **overrides}
    out = Path(out_dir)
    t0 = time.perf_counter()
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    _set_determinism(seed, cfg["threads"])
    try:
        tokenizer = build_char_tokenizer()
        model = _new_model(cfg, seed)
        losses = _pretrain(model, tokenizer, cfg, seed, progress)
        train_s = time.perf_counter() - t0
        _finish(model, tokenizer)
        stats = _heldout(model, tokenizer, cfg)
        info = _build_info(cfg, seed, model, losses, stats, train_s, time.perf_counter() - t0)
        with publish_dir(out) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            save_tokenizer(build_char_tokenizer(), tmp)  # a fresh one: generate() left padding switched on in this one
            (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    if progress:
        _print_summary(out, info)
    return out


def _new_model(cfg: Mapping[str, Any], seed: int) -> torch.nn.Module:
    """A randomly initialised tiny Qwen2 of the configured size (seeded), in training mode."""
    from transformers import AutoModelForCausalLM

    from steering.tiny import tiny_config

    config = tiny_config(
        "qwen2", hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"], max_position_embeddings=cfg["max_position_embeddings"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    return model


def _pretrain(model: torch.nn.Module, tokenizer: Any, cfg: Mapping[str, Any], seed: int, progress: bool
              ) -> list[float]:
    """AdamW (no weight decay on embeddings and 1-d parameters) on the task's formatted examples; the step losses."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=1e-8,
    )
    batcher = Batcher(tokenizer, cfg["task"], cfg["task_kwargs"], seed, part=cfg["pretrain_part"])
    losses: list[float] = []
    bar = tqdm(range(int(cfg["steps"])), desc="demo base", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = batcher.next(int(cfg["batch_size"]))
        loss = prefix_shared_loss(model, batcher.prefix_ids, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg["steps"] - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{_lr_at(step, cfg):.1e}")
    bar.close()
    return losses


def _finish(model: torch.nn.Module, tokenizer: Any) -> None:
    """Evaluation mode, a name, and the tokenizer's end and padding tokens in the generation config."""
    model.eval()
    model.config.name_or_path = "demo-base"
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = None


def _heldout(model: torch.nn.Module, tokenizer: Any, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Greedy and T=1 accuracy on ``eval_size`` held-out problems (none when it is 0)."""
    if cfg["eval_size"] <= 0:
        return {}
    rows = heldout_rows(int(cfg["eval_size"]), task=cfg["task"], **cfg["task_kwargs"])
    return {
        "greedy": heldout_stats(model, tokenizer, rows, temperature=0.0),
        "sample_t1": heldout_stats(model, tokenizer, rows, temperature=1.0, seed=0),
    }


def _build_info(cfg: Mapping[str, Any], seed: int, model: torch.nn.Module, losses: Sequence[float],
                stats: Mapping[str, Any], train_s: float, wall_s: float) -> dict[str, Any]:
    """``build_info.json``: how the base was made and what it scores."""
    import transformers

    return {
        "script": "python -m train.demo_base",
        "args": {k: cfg[k] for k in DEFAULTS},
        "seed": seed,
        "system_prompt": SYSTEM_PROMPT,
        "formats": [{"name": n, "p": p, "format": f} for n, p, f in FORMATS],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_loss_first10": sum(losses[:10]) / max(len(losses[:10]), 1),
        "train_loss_last20": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        "heldout": {"task": cfg["task"], "seed": 12345, **stats},
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(wall_s, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _print_summary(out: Path, info: Mapping[str, Any]) -> None:
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"demo base written to {out} ({size / 1e6:.2f} MB, {info['num_parameters']:,} parameters) "
          f"in {info['wall_seconds']:.0f} s; train loss {info['train_loss_first10']:.3f} -> "
          f"{info['train_loss_last20']:.3f}")
    held = info["heldout"]
    for mode in ("greedy", "sample_t1"):
        if mode in held:
            s = held[mode]
            print(f"  held-out {mode:9s} (n={s['n']}): P(boxed)={s['p_boxed']:.2f}  number correct="
                  f"{s['number_correct']:.2f}  boxed & correct={s['boxed_correct']:.2f}  "
                  f"correct|boxed={s['correct_given_boxed']:.2f}")


def is_built(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (
        p / "tokenizer_config.json").is_file()


def ensure_demo_base(path: str | os.PathLike = DEFAULT_PATH, **kwargs: Any) -> Path:
    """Return ``path``, building the demo base there first if it is not there yet."""
    p = Path(path)
    if is_built(p):
        return p
    return build_demo_base(p, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Steering sanity check


def built_task(model_dir: str | os.PathLike = DEFAULT_PATH) -> tuple[str, dict[str, Any]]:
    """``(task, task_kwargs)`` the base at ``model_dir`` was pretrained on (from its ``build_info.json``)."""
    info_path = Path(model_dir) / "build_info.json"
    args = json.loads(info_path.read_text())["args"] if info_path.is_file() else DEFAULTS
    return args["task"], dict(args["task_kwargs"])


def steering_sanity_check(model_dir: str | os.PathLike = DEFAULT_PATH, *, n_train: int = 32, steps: int = 40,
                          lr: float = 0.3, n_eval: int = 200, seed: int = 0) -> dict[str, Any]:
    """Fit a last-layer steering vector by plain cross-entropy on a few boxed examples and return the held-out
    boxed-correct rate at T=1 before and after (how far a vector that fixes the format can lift the reward)."""
    from transformers import AutoModelForCausalLM

    from steering.tasks import make_tasks
    from steering.vectors import attach_steering, load_tokenizer, vector_norms

    task, task_kwargs = built_task(model_dir)
    tok = load_tokenizer(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    n_layers = base.config.num_hidden_layers
    model = attach_steering(base, layers=[n_layers - 1])
    rows = heldout_rows(n_eval, task=task, **task_kwargs)
    before = heldout_stats(model, tok, rows, temperature=1.0, seed=seed)

    torch.manual_seed(seed)
    batcher = Batcher(tok, task, task_kwargs, seed)
    train_rows = make_tasks(task, n_train, seed + 1, part="train", **task_kwargs)
    seqs = [batcher.encode(r["question"], boxed_completion(r["question"], r["answer"])) for r in train_rows]
    width = max(len(s) for s, _ in seqs)
    batch = {
        "input_ids": torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in seqs]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs]),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = prefix_shared_loss(model, batcher.prefix_ids, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = heldout_stats(model, tok, rows, temperature=1.0, seed=seed)
    return {"layer": n_layers - 1, "steps": steps, "lr": lr, "n_train": n_train, "final_loss": loss.item(),
            "vector_norm": vector_norms(model)[n_layers - 1], "before": before, "after": after}


# --------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo_base", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_PATH), help="output directory (default: assets/demo-base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    ap.add_argument("--eval-size", type=int, default=DEFAULTS["eval_size"])
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--sanity", action="store_true",
                    help="afterwards, fit a last-layer steering vector on boxed examples and print before/after")
    args = ap.parse_args(argv)
    out = build_demo_base(args.out, seed=args.seed, progress=not args.no_progress, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, threads=args.threads, eval_size=args.eval_size)
    if args.no_progress:  # the summary is printed either way
        _print_summary(out, json.loads((out / "build_info.json").read_text()))
    if args.sanity:
        res = steering_sanity_check(out)
        info_path = out / "build_info.json"
        info = json.loads(info_path.read_text())
        info["steering_sanity_check"] = res
        write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")
        b, a = res["before"], res["after"]
        print(f"steering sanity check (layer {res['layer']}, {res['steps']} Adam steps at lr {res['lr']}, "
              f"|v|={res['vector_norm']:.2f}): boxed & correct at T=1 {b['boxed_correct']:.2f} -> "
              f"{a['boxed_correct']:.2f} (P(boxed) {b['p_boxed']:.2f} -> {a['p_boxed']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
