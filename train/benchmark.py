"""GRPO step benchmark: our rollout path against TRL's default GRPOTrainer, same process, same shape, same batch.

    python -m train.benchmark --shape qwen2.5-math-1.5b                 # the issue's setting (needs a GPU)
    python -m train.benchmark --shape tiny --device cpu                 # seconds, on a laptop
    python -m train.benchmark --memory-check                            # Qwen2.5-Math-7B shape, 16 x 4096, ours only
    python -m train.benchmark --mode generate --shape qwen2.5-math-1.5b --prompts 256 --generations 1

The model is random-weight, built from a hard-coded copy of the real config (no download), with one fp32 steering
vector (PEFT BEFT bias on ``down_proj``) on every layer. Prompts are random token ids of exactly ``--prompt-len``
tokens, spelled through a synthetic whitespace tokenizer with the model's vocabulary size. Rewards are random, so the
advantages are non-zero and every step does a real backward. A random-weight model almost never samples EOS, so every
completion runs to ``--new-tokens``: the worst case for time and memory.

Reported per trainer: GRPO step time (median over the steps after the first, which includes compilation), rollout
decode tokens/s (completion tokens / rollout wall time), train tokens/s (prompt+completion tokens / the rest of the
step), and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS so far, so only the first trainer's
figure is its own).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import torch

# Real configs (config.json of the Hub checkpoints), copied so the benchmark needs no network.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-math-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=4096, max_window_layers=21,
        use_sliding_window=False, hidden_act="silu", attention_dropout=0.0,
    ),
    "qwen2.5-math-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096, max_window_layers=28,
        use_sliding_window=False, hidden_act="silu", attention_dropout=0.0,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=32768, max_window_layers=21,
        use_sliding_window=False, hidden_act="silu", attention_dropout=0.0,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
        head_dim=128,
    ),
    "tiny": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act="silu",
    ),
}
PAD_ID, EOS_ID = 0, 1
MEMORY_BUDGET_GIB = 79.0


def build_config(shape: str):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise SystemExit(f"unknown --shape {shape!r}; choose one of {sorted(SHAPES)}")
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    spec.update(bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return AutoConfig.for_model(model_type, **spec)


def build_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    """Random-weight causal LM of a real shape, built directly on ``device``, frozen."""
    from transformers import AutoModelForCausalLM

    config = build_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = f"random-{shape}"
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_tokenizer(vocab_size: int):
    """Whitespace tokenizer over ``<pad> <eos> t2 .. t{V-1}``: any id decodes, ``"t5 t9"`` encodes to [5, 9]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<pad>")
    fast.padding_side = "left"
    return fast


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(2, vocab_size)}" for _ in range(length)) for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reserved(device: str) -> float | None:
    return torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else None


def _peak_memory(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (2**20 if sys.platform != "darwin" else 2**30)  # KiB on Linux, bytes on macOS
    except ImportError:  # pragma: no cover
        return float("nan")


# --------------------------------------------------------------------------------------------------------------------
# GRPO trainers


class GenerateTimer:
    """Times one model's ``generate`` calls: wall time and token counts of every rollout, whichever path makes it
    (TRL's own ``model.generate``, or our static path, which is ``model.generate(custom_generate=...)`` too)."""

    def __init__(self, model: Any, device: str):
        from steering.generation import end_completions

        self.calls: list[dict[str, float]] = []
        inner = model.generate

        def timed(*args: Any, **kwargs: Any):
            _sync(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync(device)
            seconds = time.perf_counter() - start
            input_ids, mask, cfg = kwargs["input_ids"], kwargs.get("attention_mask"), kwargs["generation_config"]
            eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
            completions, _ = end_completions(out[:, input_ids.shape[1]:], [e for e in eos if e is not None])
            self.calls.append({"seconds": seconds, "completion_tokens": sum(len(c) for c in completions),
                               "prompt_tokens": int(mask.sum()) if mask is not None else int(input_ids.numel())})
            return out

        model.generate = timed  # on this model instance only


class StepTimer:
    """Wall time of each optimizer step (a ``transformers.TrainerCallback``, built lazily)."""

    def __new__(cls, device: str):
        from transformers import TrainerCallback

        class _StepTimer(TrainerCallback):
            def __init__(self):
                self.device, self.start, self.times = device, 0.0, []

            def on_step_begin(self, args, state, control, **kwargs):
                _sync(self.device)
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync(self.device)
                self.times.append(time.perf_counter() - self.start)

        return _StepTimer()


def run_grpo(kind: str, ns: argparse.Namespace) -> dict[str, Any]:
    """One GRPO run of ``ns.steps`` steps; ``kind`` is "trl" (TRL's default generate) or "ours"."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from steering import compat
    from steering.vectors import attach_steering, enable_activation_checkpointing, parse_dtype
    from train.rollout import Rollouts

    dtype = parse_dtype(ns.dtype)
    device = ns.device
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = attach_steering(build_model(ns.shape, dtype, device, seed=ns.seed))
    if ns.gradient_checkpointing:
        enable_activation_checkpointing(model)
    vocab = model.config.vocab_size
    tokenizer = build_tokenizer(vocab)
    rows = ns.prompts * ns.generations
    micro = ns.micro_batch or rows
    if rows % micro:
        raise SystemExit(f"--micro-batch {micro} must divide prompts x generations = {rows}")
    dataset = Dataset.from_dict({"prompt": random_prompts(ns.prompts * ns.steps, ns.prompt_len, vocab, ns.seed)})
    rng = random.Random(ns.seed)

    def reward(completions, **kwargs):
        return [rng.random() for _ in completions]

    on_cuda = device.startswith("cuda")
    args = GRPOConfig(
        output_dir=os.path.join(ns.work_dir, f"bench-{kind}"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro,
        num_generations=ns.generations,
        max_completion_length=ns.new_tokens,
        max_steps=ns.steps,
        learning_rate=1e-3,
        beta=0.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=ns.seed,
        bf16=on_cuda and dtype == torch.bfloat16,
        use_cpu=not on_cuda,
        disable_dropout=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        disable_tqdm=True,
        # enabled above (non-reentrant, see steering.vectors) when asked for
        **{compat.training_arg_name("gradient_checkpointing"): False},
    )
    static = kind == "ours" and ns.backend == "static"
    timer = StepTimer(device)
    rollouts = GenerateTimer(model, device)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer],
                          rollout_func=Rollouts(compile=ns.compile) if static else None)
    trainer.remove_callback(PrinterCallback)  # per-step log dicts; the summary is printed at the end
    error = None
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError as e:  # the memory check reports an OOM instead of crashing
        error = f"CUDA out of memory: {str(e).splitlines()[0]}"
    peak = _peak_memory(device)
    result = summarize(kind, trainer, timer.times, rollouts.calls, peak, ns)
    if on_cuda:
        result["peak_reserved_gib"] = round(_peak_reserved(device), 3)
    if error:
        result["error"] = error
    del trainer, model
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def summarize(kind: str, trainer: Any, step_times: list[float], rollouts: list[dict[str, float]], peak_gib: float,
              ns) -> dict[str, Any]:
    steady = step_times[1:] or step_times
    steady_rollouts = rollouts[1:] or rollouts

    def rate(tokens: float, seconds: float) -> float:
        return tokens / seconds if seconds > 0 else float("nan")

    step = statistics.median(steady) if steady else float("nan")
    roll_s = sum(r["seconds"] for r in steady_rollouts)
    comp = sum(r["completion_tokens"] for r in steady_rollouts)
    total = sum(r["completion_tokens"] + r["prompt_tokens"] for r in steady_rollouts)
    train_s = sum(steady) - roll_s
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "trainer": kind if kind == "trl" else f"ours[{ns.backend}]",
        "step_times_s": [round(t, 4) for t in step_times],
        "step_time_s": round(step, 4),
        "first_step_s": round(step_times[0], 4) if step_times else None,
        "rollout_s_per_step": round(roll_s / max(len(steady_rollouts), 1), 4),
        "rollout_decode_tok_per_s": round(rate(comp, roll_s), 1),
        "train_tok_per_s": round(rate(total, train_s), 1),
        "completion_tokens_per_step": comp // max(len(steady_rollouts), 1),
        "peak_memory_gib": round(peak_gib, 3),
        "final_loss": losses[-1] if losses else None,
    }


# --------------------------------------------------------------------------------------------------------------------
# Generation only


def run_generate(backend: str, ns: argparse.Namespace) -> dict[str, Any]:
    from steering.generation import SamplingParams, generate
    from steering.vectors import attach_steering, parse_dtype

    device = ns.device
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = attach_steering(build_model(ns.shape, parse_dtype(ns.dtype), device, seed=ns.seed)).eval()
    vocab = model.config.vocab_size
    tokenizer = build_tokenizer(vocab)
    prompts = random_prompts(ns.prompts, ns.prompt_len, vocab, ns.seed)
    params = SamplingParams(max_new_tokens=ns.new_tokens, temperature=1.0)
    options: dict[str, Any] = {"compile": ns.compile} if backend == "static" else {}
    engine_start = None
    if backend == "vllm":
        start = time.perf_counter()
        model = vllm_engine_for(model, tokenizer, ns)
        engine_start = round(time.perf_counter() - start, 1)
    times, tokens = [], []
    for i in range(ns.steps):
        res = generate(model, tokenizer, prompts, params, num_return_sequences=ns.generations, seed=ns.seed + i,
                       backend=backend, **options)
        times.append(res.seconds)
        tokens.append(res.num_completion_tokens)
    steady = list(zip(times, tokens))[1:] or list(zip(times, tokens))
    secs = sum(t for t, _ in steady)
    out = {
        "backend": backend,
        "call_times_s": [round(t, 4) for t in times],
        "decode_tok_per_s": round(sum(n for _, n in steady) / secs, 1) if secs else float("nan"),
        "rows": ns.prompts * ns.generations,
        "peak_memory_gib": round(_peak_memory(device), 3),
    }
    if engine_start is not None:
        out["engine_start_s"] = engine_start
    del model
    gc.collect()
    return out


def vllm_engine_for(model: Any, tokenizer: Any, ns: argparse.Namespace) -> Any:
    """The same random-weight model (vectors included, as a steering checkpoint) served by a vLLM engine."""
    import tempfile

    from steering import vectors as sv
    from steering.vllm_engine import VLLMModel

    from steering.vectors import parse_dtype

    base_dir = tempfile.mkdtemp(prefix="bench-vllm-", dir=ns.work_dir)
    # The same random base (same seed), saved without the PEFT wrappers the steered model carries.
    build_model(ns.shape, parse_dtype(ns.dtype), "cpu", seed=ns.seed).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    checkpoint = sv.save_checkpoint(model, os.path.join(base_dir, "checkpoint"), base_model=base_dir, step=0)
    device = "cuda" if ns.device.startswith("cuda") else "cpu"
    return VLLMModel(base_dir, checkpoint, dtype=ns.dtype, device=device, seed=ns.seed,
                     max_model_len=ns.prompt_len + ns.new_tokens)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=None, help=f"model shape: {', '.join(SHAPES)} (default qwen2.5-math-1.5b)")
    p.add_argument("--mode", choices=["grpo", "generate"], default="grpo")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 32; 1 with --memory-check)")
    p.add_argument("--generations", type=int, default=None, help="generations per prompt (default 8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="max new tokens (default 512)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per trainer (default 3)")
    p.add_argument("--backend", default="static",
                   help="our rollout backend; with --mode generate, a comma-separated list is measured side by side "
                        "in one process (e.g. hf,static,vllm)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", default=None, choices=["auto", "on", "off"],
                   help="static backend: torch.compile + CUDA graphs (auto = on CUDA only)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per forward/backward (per_device_train_batch_size); default all rows at once")
    p.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument("--skip-trl", action="store_true", help="run only our trainer")
    p.add_argument("--memory-check", action="store_true",
                   help="Qwen2.5-Math-7B shape, 1 prompt x 16 generations x 4096 tokens (512 prompt + 3584 new), "
                        "micro-batch 2, gradient checkpointing, ours only; reports whether the peak fits in 80 GB")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 for tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="scratch output dir for the trainers (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    ns = p.parse_args(argv)
    unknown = set(ns.backend.split(",")) - {"hf", "static", "vllm"}
    if unknown or (ns.mode == "grpo" and "," in ns.backend):
        p.error(f"--backend {ns.backend}: give one of hf, static, vllm (a comma-separated list with --mode generate)")
    mem = ns.memory_check
    if ns.shape is None:
        ns.shape = "qwen2.5-math-7b" if mem else "qwen2.5-math-1.5b"
    if mem:
        defaults = dict(prompts=1, generations=16, prompt_len=512, new_tokens=3584, steps=1, micro_batch=2)
    elif ns.shape == "tiny":  # seconds on a CPU
        defaults = dict(prompts=4, generations=4, prompt_len=16, new_tokens=24, steps=3, threads=1)
    else:  # the setting
        defaults = dict(prompts=32, generations=8, prompt_len=128, new_tokens=512, steps=3)
    for key, value in defaults.items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if mem:
        ns.gradient_checkpointing = True
        ns.skip_trl = True
    if ns.device is None:
        ns.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ns.dtype is None:
        ns.dtype = "bfloat16" if ns.device.startswith("cuda") else "float32"
    ns.compile = {"on": True, "off": False}.get(ns.compile or "auto")
    return ns


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import tempfile

    ns = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = ns.work_dir or tempfile.mkdtemp(prefix="steering-bench-")
    ns.work_dir = work
    import transformers
    import trl

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(ns.device),
        "command": "python -m train.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "shape": ns.shape, "mode": ns.mode, "prompts": ns.prompts, "generations": ns.generations,
        "prompt_len": ns.prompt_len, "new_tokens": ns.new_tokens, "steps": ns.steps, "dtype": ns.dtype,
        "micro_batch": ns.micro_batch, "gradient_checkpointing": ns.gradient_checkpointing,
    }
    results: list[dict[str, Any]] = []
    if ns.mode == "generate":
        backends = ns.backend.split(",")
        if not ns.skip_trl and "hf" not in backends:
            backends.insert(0, "hf")
        for backend in backends:
            results.append(run_generate(backend, ns))
    else:
        if not ns.skip_trl:
            results.append(run_grpo("trl", ns))
        results.append(run_grpo("ours", ns))
    report = {**meta, "results": results}
    if ns.mode == "grpo" and len(results) == 2 and results[1]["step_time_s"] > 0:
        report["speedup_step"] = round(results[0]["step_time_s"] / results[1]["step_time_s"], 2)
    if ns.mode == "generate" and len(results) == 2 and results[0]["decode_tok_per_s"] > 0:
        report["speedup_decode"] = round(results[1]["decode_tok_per_s"] / results[0]["decode_tok_per_s"], 2)
    if ns.memory_check:
        # An "80 GB" H100 exposes about 79 GiB to torch; judge the allocator's reserved peak, which is what OOMs.
        peak = results[-1].get("peak_reserved_gib") or results[-1]["peak_memory_gib"]
        report["memory_budget_gib"] = MEMORY_BUDGET_GIB
        report["fits_80gb"] = bool("error" not in results[-1] and peak < MEMORY_BUDGET_GIB)
    print_report(report)
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"# {report['date']} | {report['device']} | {report['command']}")
    print(f"# shape={report['shape']} prompts={report['prompts']} x generations={report['generations']} "
          f"prompt_len={report['prompt_len']} new_tokens={report['new_tokens']} dtype={report['dtype']}")
    for r in report["results"]:
        if "trainer" in r:
            print(f"{r['trainer']:>14}: step {r['step_time_s']:.3f} s (first {r['first_step_s']:.3f} s) | rollout "
                  f"{r['rollout_decode_tok_per_s']:.0f} tok/s | train {r['train_tok_per_s']:.0f} tok/s | peak "
                  f"{r['peak_memory_gib']:.2f} GiB" + (f" | {r['error']}" if "error" in r else ""))
        else:
            print(f"{r['backend']:>14}: decode {r['decode_tok_per_s']:.0f} tok/s | calls {r['call_times_s']} | peak "
                  f"{r['peak_memory_gib']:.2f} GiB")
    for key in ("speedup_step", "speedup_decode", "fits_80gb"):
        if key in report:
            print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
