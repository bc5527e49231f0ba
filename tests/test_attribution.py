"""Attribution patching for the layer choice: the estimates agree with the exact forward-pass change."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from analysis import attribution as at
from analysis.__main__ import main as analysis_main
from steering import compat
from steering import diffmean as dm
from steering.tiny import build_char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "traces.jsonl"


@pytest.fixture(scope="module")
def setup64():
    """A float64 tiny model, three backtracking examples and the DiffMean vectors of every layer."""
    model, tok = tiny_model("qwen2", seed=0, dtype=torch.float64), build_char_tokenizer()
    traces = dm.load_traces(EXAMPLES)
    u = dm.collect(model, tok, traces).vectors("backtracking")
    vectors = {l: u[l] for l in range(3)}
    examples = at.make_examples(tok, traces, "backtracking", dm.PositionSpec(), max_examples=3)
    return model, tok, vectors, examples


def test_kl_is_a_real_kl_and_not_the_public_misuse():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    want = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(at.kl_from_logp(logp, logq), want)
    zero = torch.zeros(5, dtype=torch.float64)
    assert (want > 0).all() and torch.allclose(at.kl_from_logp(logp, logp), zero, atol=1e-15)
    # what the public code computed: log-probabilities passed as the target without log_target -> not a KL
    misuse = F.kl_div(logq, logp, reduction="none").sum(-1)
    assert not torch.allclose(misuse, want)
    assert not torch.allclose(F.kl_div(logp, logp, reduction="none").sum(-1), zero)


def test_examples_positions(setup64):
    _, tok, _, examples = setup64
    ex = examples[0]
    enc = ex.encoded
    assert ex.positions == sorted({p for sp in enc.spans for p in sp.positions})
    assert ex.open_positions == sorted(sp.t0 - 1 for sp in enc.spans)
    assert ex.open_targets == [ex.input_ids[0, p + 1].item() for p in ex.open_positions]
    assert all(sp.label == "backtracking" for sp in enc.spans)


def _ratios(model, examples, vectors, eps):
    r = at.attribution(model, examples, vectors, coef=eps, estimates=["fisher", "logprob", "exact"])
    s = r["scores"]
    kl = [f / e for f, e in zip(s["fisher"], s["exact_kl"])]
    lp = [f / e for f, e in zip(s["logprob"], s["exact_logprob"])]
    return kl, lp, s


def test_estimates_match_the_exact_forward_change_for_small_vectors(setup64):
    model, _, vectors, examples = setup64
    kl_big, lp_big, _ = _ratios(model, examples, vectors, 0.1)
    kl, lp, s = _ratios(model, examples, vectors, 0.01)
    for layer in range(3):
        # second order: 1/2 u^T F u against the exact KL(p || p_steered)
        assert abs(kl[layer] - 1) < 2e-3, (layer, kl)
        # first order: c * grad . u against the exact change of log p(opening token)
        assert abs(lp[layer] - 1) < 1e-2, (layer, lp)
        # the gap is the next-order term: it shrinks with the scale
        assert abs(kl[layer] - 1) < abs(kl_big[layer] - 1)
        assert s["exact_kl"][layer] > 0 and s["fisher"][layer] > 0
    # reverse mode (one backward for every layer) and the JVP give the same first-order number
    torch.testing.assert_close(torch.tensor(s["logprob"]), torch.tensor(s["logprob_jvp"]), rtol=1e-5, atol=0)


def test_per_example_agreement_and_quadratic_scaling(setup64):
    model, _, vectors, examples = setup64
    ex = examples[1]
    logp, _ = at.clean_logp(model, ex)
    small = at.fisher_scores(model, ex, vectors, 1e-2, logp)
    double = at.fisher_scores(model, ex, vectors, 2e-2, logp)
    exact = at.exact_scores(model, ex, vectors, 1e-2, logp)
    for layer in range(3):
        assert math.isclose(double[layer]["fisher"], 4 * small[layer]["fisher"], rel_tol=1e-9)
        assert math.isclose(double[layer]["logprob_jvp"], 2 * small[layer]["logprob_jvp"], rel_tol=1e-9)
        assert math.isclose(small[layer]["fisher"], exact[layer]["exact_kl"], rel_tol=5e-3)


def test_jvp_works_on_an_sdpa_model_and_restores_it():
    model, tok = tiny_model("llama", seed=2), build_char_tokenizer()
    assert compat.attn_implementation(model) == "sdpa"
    ex = at.make_examples(tok, dm.load_traces(EXAMPLES), "deduction", dm.PositionSpec(), max_examples=1)[0]
    u = torch.randn(32, generator=torch.Generator().manual_seed(0))
    primal, tangent = at.jvp_logits(model, ex, 1, u, 1e-3)
    assert compat.attn_implementation(model) == "sdpa"
    with torch.no_grad():
        a = model(ex.input_ids).logits[0]
    torch.testing.assert_close(primal, a, rtol=0, atol=1e-4)
    assert tangent.abs().max() > 0


def test_embedding_flags_exclude_layers_from_the_choice(setup64):
    model, tok, vectors, _ = setup64
    emb = model.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(1)
    vecs = {0: 3 * emb[40].clone(), 1: torch.randn(32, generator=g, dtype=torch.float64),
            2: torch.randn(32, generator=g, dtype=torch.float64)}
    cos = at.embedding_cosines(model, vecs)
    assert math.isclose(cos[0], 1.0, rel_tol=1e-6) and cos[1] < 0.9 and cos[2] < 0.9
    traces = dm.load_traces(EXAMPLES)
    res = at.run_attribution(model, tok, traces, vecs, label="backtracking", embed_threshold=0.9, max_examples=2)
    assert 0 in res["flagged_layers"] and res["chosen_layer"] in res["eligible_layers"]
    fisher = dict(zip(res["layers"], res["scores"]["fisher"]))
    assert res["chosen_layer"] == max(res["eligible_layers"], key=fisher.get)
    res = at.run_attribution(model, tok, traces, vecs, label="backtracking", embed_threshold=0.9, skip_first=2,
                             max_examples=2, estimates=["fisher"])
    assert res["flagged_layers"][:2] == [0, 1] and res["chosen_layer"] == 2
    assert at.choose_layer([0, 1], [1.0, 2.0], flagged=[0, 1]) == (1, True)
    assert at.choose_layer([0, 1, 2], [5.0, float("nan"), 1.0], flagged=[0]) == (2, False)


# --------------------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def dm_ckpt(tiny_base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "dm"
    assert analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--label",
                          "backtracking", "--out", str(out)]) == 0
    return out


def test_cli_end_to_end(dm_ckpt, tmp_path):
    out = tmp_path / "attr"
    rc = analysis_main(["attribution", "--vectors", str(dm_ckpt), "--traces", str(EXAMPLES), "--estimates", "fisher",
                        "logprob", "exact", "--max-examples", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["label"] == "backtracking" and res["layers"] == [0, 1, 2] and res["select_by"] == "fisher"
    assert set(res["scores"]) >= {"fisher", "logprob", "exact_kl", "exact_logprob"}
    assert all(len(v) == 3 and all(math.isfinite(x) for x in v) for v in res["scores"].values())
    assert res["n_examples"] == 3
    assert res["chosen_layer"] in (res["eligible_layers"] or res["layers"])
    assert len(res["embedding"]["max_cos_embedding_rows"]) == 3 and len(res["fisher_over_exact_kl"]) == 3
    assert (out / "attribution.png").stat().st_size > 0


def test_cli_usage_errors(dm_ckpt, tmp_path, capsys):
    rc = analysis_main(["attribution", "--vectors", str(dm_ckpt), "--traces", str(EXAMPLES), "--select", "exact",
                        "--out", str(tmp_path / "a")])
    assert rc == 2 and "--select exact" in capsys.readouterr().err
    other = tmp_path / "t.jsonl"
    other.write_text(json.dumps({"text": "So 1 + 1 = 2.", "spans": [{"start": 0, "end": 13, "label": "deduction"}]})
                     + "\n")
    rc = analysis_main(["attribution", "--vectors", str(dm_ckpt), "--traces", str(other), "--out", str(tmp_path / "a")])
    assert rc == 2 and "no span is labelled 'backtracking'" in capsys.readouterr().err
    rc = analysis_main(["attribution", "--vectors", str(tmp_path), "--traces", str(EXAMPLES),
                        "--out", str(tmp_path / "a")])
    assert rc == 2 and "holds none" in capsys.readouterr().err
