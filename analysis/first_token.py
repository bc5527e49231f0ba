"""``python -m analysis first-token``: where in the completion does a vector change the token probabilities, and is
its gain just a better first token?

With the chosen vectors (default: the checkpoint's last-layer vector alone, as in the paper) and without them, on the
same completions sampled *with* them, compare per-position token probabilities (teacher-forced):

- ``position_gain``: for completion position ``t`` (0 = first generated token), the mean over completions of
  ``p_steered(y_t) − p_base(y_t)`` for the sampled token ``y_t``, the mean ``|log p_steered(y_t) − log p_base(y_t)|``,
  and the mean KL(p_steered ‖ p_base) of the whole next-token distribution. ``first_position_share`` = the share of
  the summed KL that sits at ``t = 0``.
- ``first_token``: the next-token distribution right after the generation prompt, averaged over prompts, with and
  without the vectors: the tokens that gain (and lose) the most probability there.
- ``tokens_by_gain``: sampled tokens ranked by their summed probability gain over all positions (with counts).

The **substitution test**: append the top first-position token (or ``--substitute TEXT``) to the unsteered base's
prompt right after the generation prompt, and evaluate. The forced text counts as part of the answer (it is scored as
``TEXT + completion``, as it would be if the model had written it). It reports

    recovered = (acc_substituted − acc_base) / (acc_steered − acc_base)

the share of the steering gain that one token recovers (null when the vectors give no gain). The paper: the last-layer
vector mostly boosts the first token ("To" for Qwen), and substituting it recovers ~75% of the gain.

result.json::

    {"command": "first-token", "checkpoint", "base_model", "layers": [...],
     "position_gain": {"positions": [0..], "mean_prob_gain": [...], "mean_abs_logprob_change": [...],
                       "mean_kl": [...], "count": [...]},
     "first_position_share": float,
     "first_token": {"num_prompts", "kl", "top_gained": [{"token_id", "token", "p_steered", "p_base", "gain"}],
                     "top_lost": [...]},
     "tokens_by_gain": [{"token_id", "token", "total_gain", "mean_gain", "count", "first_position_count"}],
     "substitution": null | {"token", "token_id", "text", "source": "top_gained"|"argument",
                             "suffix_tokenization_matches": bool, "acc_base", "acc_steered", "acc_substituted",
                             "recovered", "detail": {...}},
     "num_sequences", "num_tokens", "settings", "plots"}

Plots: ``position_gain.png`` (gain and KL per position), ``first_token_gain.png`` (top gained first tokens),
``completion_highlight.png`` (a few sampled completions, each token coloured by its probability gain).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from analysis import _common
from analysis import cli, output, plots, settings
from analysis.table import relative_improvement
from steering.generation import pad_id_of
from steering.evaluation import EvalSettings, avg_at_k, mean_std
from steering.readout import first_token_gain


class SuffixTemplate:
    """A prompt template whose prompt ends with extra text right after the generation prompt."""

    def __init__(self, base: Any, suffix: str):
        self.base = base
        self.suffix = suffix
        self.name = f"{getattr(base, 'name', 'template')}+suffix"
        self.answer_format = base.answer_format

    def render(self, question: str, tokenizer: Any = None) -> str:
        return self.base.render(question, tokenizer=tokenizer) + self.suffix

    def stops(self, tokenizer: Any = None, model: Any = None):
        return self.base.stops(tokenizer, model)  # the completion still ends where the base template's does


def rescored_accuracy(acc: _common.Accuracy, prefix: str, evals: EvalSettings) -> tuple[float, dict[str, Any]]:
    """Accuracy of an evaluation whose every completion is scored as ``prefix + completion`` (graded as ``evals``
    says)."""
    from steering.rewards import score_batch

    per: dict[str, Any] = {}
    for name, res in acc.results.items():
        fmt = res.settings.get("answer_format")
        per_seed = []
        for seed in res.seeds:
            flat = [s for row in seed.samples for s in row]
            verdicts = iter(score_batch([prefix + s["completion"] for s in flat], [s["answer"] for s in flat],
                                        answer_format=fmt, timeout_s=evals.timeout_s, options=evals.grading))
            correct = [[bool(next(verdicts).correct) for _ in row] for row in seed.samples]
            per_seed.append(avg_at_k(correct))
        per[name] = {"accuracy": mean_std(per_seed)[0], "per_seed": per_seed}
    return sum(v["accuracy"] for v in per.values()) / len(per), per


@torch.no_grad()
def position_stats(model, seqs: _common.Sequences, vectors, *, max_positions: int, batch_size: int, pad: int,
                   quiet: bool = False
                   ) -> dict[str, Any]:
    device = next(model.parameters()).device
    P = max_positions
    gain = torch.zeros(P, dtype=torch.float64)
    abs_lp = torch.zeros(P, dtype=torch.float64)
    kl = torch.zeros(P, dtype=torch.float64)
    cnt = torch.zeros(P, dtype=torch.float64)
    kl_all = 0.0
    tok_gain: dict[int, float] = {}
    tok_count: dict[int, int] = {}
    tok_first: dict[int, int] = {}
    per_row: dict[int, list[float]] = {}
    for batch in output.progress(seqs.batches(batch_size, device, pad), desc="first-token", quiet=quiet,
                            total=-(-len(seqs) // batch_size)):
        with _common.use_vectors(model, vectors):
            ls = batch.forward(model).logits.float()
        with _common.use_vectors(model, {}):
            lb = batch.forward(model).logits.float()
        lps, lpb = ls.log_softmax(-1), lb.log_softmax(-1)
        kl_pos = (lps.exp() * (lps - lpb)).sum(-1)  # (B, S)
        for r in range(batch.input_ids.shape[0]):
            p0, n = int(batch.prompt_len[r]), int(batch.length[r])
            if n <= p0:
                continue
            pred = torch.arange(p0 - 1, n - 1, device=device)
            toks = batch.input_ids[r, p0:n]
            a = lps[r, pred, toks].double()
            b = lpb[r, pred, toks].double()
            g = (a.exp() - b.exp()).cpu()
            per_row[batch.rows[r]] = g.tolist()
            k = min(P, len(toks))
            gain[:k] += g[:k]
            abs_lp[:k] += (a - b).abs()[:k].cpu()
            kl[:k] += kl_pos[r, pred][:k].double().cpu()
            cnt[:k] += 1
            kl_all += float(kl_pos[r, pred].double().sum())
            for t, (tok, gv) in enumerate(zip(toks.tolist(), g.tolist())):
                tok_gain[tok] = tok_gain.get(tok, 0.0) + gv
                tok_count[tok] = tok_count.get(tok, 0) + 1
                if t == 0:
                    tok_first[tok] = tok_first.get(tok, 0) + 1
    safe = cnt.clamp_min(1)
    used = int((cnt > 0).sum())
    return {"positions": list(range(used)), "mean_prob_gain": (gain / safe)[:used].tolist(),
            "mean_abs_logprob_change": (abs_lp / safe)[:used].tolist(), "mean_kl": (kl / safe)[:used].tolist(),
            "count": cnt[:used].long().tolist(), "kl_total": kl_all, "kl_first": float(kl[0]) if used else 0.0,
            "tok_gain": tok_gain, "tok_count": tok_count, "tok_first": tok_first, "per_row": per_row}


def register(subparsers) -> None:
    p = cli.add_checkpoint_command(subparsers, "first-token", run, __doc__, forward_batch=True,
                                   help="per-position probability gain of a vector (default: the last layer's) and "
                                        "the first-token substitution test")
    p.add_argument("--layers", default="last",
                   help="which of the checkpoint's vectors are on: last (default), all, or a list like 26,27")
    p.add_argument("--k", type=int, default=15, help="tokens listed in the rankings (default 15)")
    p.add_argument("--max-positions", type=int, default=64, help="completion positions tracked (default 64)")
    p.add_argument("--samples-per-problem", type=int, default=1, help="completions sampled per problem (default 1)")
    p.add_argument("--substitute", default=None, metavar="TEXT",
                   help="text forced after the generation prompt (default: the top gained first token)")
    p.add_argument("--no-substitution", action="store_true", help="skip the substitution test (no evaluation)")


def run(args: argparse.Namespace) -> int:
    cli.check_positive(args, "k", "max_positions", "samples_per_problem")
    # "all": every layer the checkpoint steers
    o = cli.open_checkpoint(args, layers=None if args.layers == "all" else args.layers)
    model, tokenizer, benches, out, layers = o.model, o.tokenizer, o.benches, o.out, o.layers
    vectors = {layer: o.vectors[layer] for layer in layers}
    tmpl = cli.template(args)
    problems = _common.problems_of(benches)
    pad = pad_id_of(tokenizer)

    with _common.use_vectors(model, vectors):
        seqs = _common.sample_sequences(model, tokenizer, problems, tmpl, settings.from_args(args),
                                        progress=not args.no_progress, num_samples=args.samples_per_problem)
    st = position_stats(model, seqs, vectors, max_positions=args.max_positions, batch_size=args.forward_batch_size,
                        pad=pad, quiet=args.no_progress)
    prompts = [tmpl.render(p["question"], tokenizer=tokenizer) for p in problems]
    first = first_token_gain(model, tokenizer, prompts, vectors, k=args.k, batch_size=args.forward_batch_size)
    k = len(first["top_gained"])
    ranked = sorted(st["tok_gain"].items(), key=lambda kv: -kv[1])[:k]
    by_gain = [{"token_id": t, "token": tokenizer.decode([t]), "total_gain": g, "mean_gain": g / st["tok_count"][t],
                "count": st["tok_count"][t], "first_position_count": st["tok_first"].get(t, 0)} for t, g in ranked]
    share = st["kl_first"] / st["kl_total"] if st["kl_total"] > 0 else None

    subst = None
    if not args.no_substitution:
        if args.substitute is not None:
            text, source = args.substitute, "argument"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            token_id = int(ids[0]) if len(ids) == 1 else None
        else:
            token_id = first["top_gained"][0]["token_id"]
            text, source = tokenizer.decode([token_id]), "top_gained"
        probe = tokenizer(prompts[0] + text, add_special_tokens=True)["input_ids"]
        plain = tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        matches = token_id is not None and probe == plain + [token_id]
        bar = output.progress(total=3, desc="substitution test", quiet=args.no_progress)
        with _common.use_vectors(model, {}):
            acc_base = _common.accuracy(model, tokenizer, benches, settings.from_args(args), tmpl)
            bar.update(1)
            sub = _common.accuracy(model, tokenizer, benches, settings.from_args(args), SuffixTemplate(tmpl, text))
            acc_sub, sub_detail = rescored_accuracy(sub, text, settings.from_args(args))
            bar.update(1)
        with _common.use_vectors(model, vectors):
            acc_steered = _common.accuracy(model, tokenizer, benches, settings.from_args(args), tmpl)
            bar.update(1)
        bar.close()
        subst = {"token": text, "token_id": token_id, "text": text, "source": source,
                 "suffix_tokenization_matches": bool(matches), "acc_base": acc_base.accuracy,
                 "acc_steered": acc_steered.accuracy, "acc_substituted": acc_sub,
                 "recovered": relative_improvement(acc_sub, acc_base.accuracy, acc_steered.accuracy, scale=1.0),
                 "detail": {"base": acc_base.per_benchmark, "steered": acc_steered.per_benchmark,
                            "substituted": sub_detail}}

    files = [plots.line_plot(out / "position_gain.png", st["positions"],
                             {"mean p_steered(y_t) − p_base(y_t)": st["mean_prob_gain"],
                              "mean KL(steered ‖ base)": st["mean_kl"]},
                             title=f"per-position effect of the vectors at layers {layers}",
                             xlabel="completion position t (0 = first generated token)", ylabel="").name,
             plots.bar_plot(out / "first_token_gain.png", [plots.show_token(r["token"]) for r in first["top_gained"]],
                            [r["gain"] for r in first["top_gained"]],
                            title="probability gain of the first generated token", ylabel="Δp").name]
    blocks = []
    for row in sorted(st["per_row"])[:4]:
        toks = _common.decode_tokens(tokenizer, seqs.completion_ids[row])
        blocks.append((f"completion {row}", toks, st["per_row"][row], None))
    if blocks:
        span = max((abs(v) for _, _, vals, _ in blocks for v in vals), default=1.0) or 1.0
        files.append(plots.token_highlight(out / "completion_highlight.png", [], [], blocks=blocks, cmap="RdBu_r",
                                           vmin=-span, vmax=span, value_label="p_steered − p_base of the token").name)
    pos = {key: st[key] for key in ("positions", "mean_prob_gain", "mean_abs_logprob_change", "mean_kl", "count")}
    result = {"command": "first-token", "checkpoint": str(args.checkpoint), "base_model": o.base_id, "layers": layers,
              "position_gain": pos, "first_position_share": share, "first_token": first, "tokens_by_gain": by_gain,
              "substitution": subst, "num_sequences": len(seqs), "num_tokens": sum(len(c) for c in seqs.completion_ids),
              "settings": settings.record(args), "plots": files}
    msg = f"first-token: top first token {first['top_gained'][0]['token']!r}"
    if subst:
        msg += f", substitution recovers {subst['recovered']}"
    return output.finish(out, result, msg)
