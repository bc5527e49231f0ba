"""Exact properties of the mechanistic analyses (no generation, no accuracy): path patching, logit lens, persistence."""

import pytest
import torch

from analysis import _common
from analysis import logit_lens
from analysis import path_patching
from analysis import persistence
from steering import hooks
from steering import vectors as sv
from steering.tiny import tiny_model

ARCHS = ["qwen2", "llama"]


def ids(seed=3, batch=2, seq=11):
    return torch.randint(4, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def vec(seed=0, scale=2.0):
    return torch.randn(32, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------------------------------------------
# Path patching


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 1])
def test_path_patching_invariants(arch, layer):
    model = tiny_model(arch)
    s = vec(layer)
    x = ids()
    patcher = path_patching.Patcher(model, layer, s)
    summary, per_head = path_patching.build_variants(patcher.n_heads, patcher.n_kv)
    v = {variant.name: variant for variant in summary + per_head}
    assert patcher.n_kv < patcher.n_heads  # the tiny models are GQA: K/V heads are the kv heads
    assert sum(1 for n in v if n.startswith("remove-k-h")) == patcher.n_kv
    assert sum(1 for n in v if n.startswith("remove-q-h")) == patcher.n_heads
    T = layer + 1
    with torch.no_grad():
        logits = {name: patcher.logits(var, x) for name, var in v.items()}
        steered = sv.attach_steering(tiny_model(arch), layers=[layer], init={layer: s})
        # full = the checkpoint's vector as a real BEFT parameter; base = the unsteered model (both bit-identical)
        assert torch.equal(logits["full"], steered(x).logits)
        assert torch.equal(logits["base"], model(x).logits)
        assert not torch.allclose(logits["full"], logits["base"], atol=1e-3)
        # unsteered run's activations, for the by-hand references
        _, clean = hooks.run_with_cache(model, x,
                                        names=[f"blocks.{T}.ln1.hook_normalized", f"blocks.{T}.hook_resid_post"])
        # skip-attn = literally replacing what T's attention reads by the unsteered run's value
        unsteered_normalized = hooks.replace_with(clean[f"blocks.{T}.ln1.hook_normalized"])
        literal = hooks.run_with_hooks(steered, x,
                                       fwd_hooks=[(f"blocks.{T}.ln1.hook_normalized", unsteered_normalized)])
        assert torch.equal(logits["skip-attn"], literal.logits)
        # skip-layer = T unsteered, the vector added after it by hand (then the rest of the model as usual)
        by_hand = hooks.run_with_hooks(model, x, fwd_hooks=[(f"blocks.{T}.hook_resid_post", hooks.add_at(s))]).logits
        torch.testing.assert_close(logits["skip-layer"], by_hand, rtol=0, atol=1e-6)
        if T == hooks.num_layers(model) - 1:
            by_hand_last = hooks.unembed(model, clean[f"blocks.{T}.hook_resid_post"] + s)
            torch.testing.assert_close(logits["skip-layer"], by_hand_last, rtol=0, atol=1e-6)
        # removing the steering from every head of Q, K and V at once is skip-attn, exactly
        every = path_patching.Variant("remove-qkv-all", clean_heads={"q": list(range(patcher.n_heads)),
                                                                     "k": list(range(patcher.n_kv)),
                                                                     "v": list(range(patcher.n_kv))})
        assert torch.equal(patcher.logits(every, x), logits["skip-attn"])
        # per-head z: removing it from every head = skip-attn; injecting it into every head = full
        all_z = list(range(patcher.n_heads))
        torch.testing.assert_close(patcher.logits(path_patching.Variant("z-rm", z_mode="remove", z_heads=all_z), x),
                                   logits["skip-attn"], rtol=0, atol=1e-6)
        z_in = path_patching.Variant("z-in", skip_attn=True, z_mode="inject", z_heads=all_z)
        torch.testing.assert_close(patcher.logits(z_in, x), logits["full"], rtol=0, atol=1e-6)
        # inject-v-all = "the vector only in V": Q and K read the unsteered residual
        assert torch.equal(logits["inject-v-all"], patcher.logits(path_patching.Variant(
            "qk", clean_heads={"q": list(range(patcher.n_heads)), "k": list(range(patcher.n_kv))}), x))
        # single heads change something, but not everything
        for name in ("remove-v-h0", "remove-z-h1", "inject-q-h0"):
            assert not torch.equal(logits[name], logits["full" if name.startswith("remove") else "skip-attn"])


@pytest.mark.parametrize("variant", ["skip-attn", "remove-v-h1", "remove-z-h2", "inject-z-h0", "skip-layer"])
def test_path_patching_in_cached_generation_matches_teacher_forcing(variant):
    """The online unsteered stream (and the shadow attention's KV cache) give, token by token during generation, the
    same logits as one teacher-forced pass over the finished sequence."""
    model = tiny_model("qwen2")
    patcher = path_patching.Patcher(model, 1, vec(1, 3.0))
    summary, per_head = path_patching.build_variants(patcher.n_heads, patcher.n_kv)
    v = {x.name: x for x in summary + per_head}[variant]
    prompt = ids(seed=5, batch=1, seq=7)
    with torch.no_grad(), patcher.apply(v):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    seq = out.sequences
    reference = {"skip-attn": "full", "skip-layer": "full", "remove-v-h1": "full", "remove-z-h2": "full",
                 "inject-z-h0": "skip-attn"}[variant]
    with torch.no_grad():
        tf = patcher.logits(v, seq)[0, prompt.shape[1] - 1: seq.shape[1] - 1]
        other = patcher.logits({x.name: x for x in summary}[reference], seq)[0, prompt.shape[1] - 1: seq.shape[1] - 1]
    steps = torch.stack(out.scores, dim=1)[0]  # (new, vocab)
    assert (tf - other).abs().max() > 1e-4  # the variant matters on these tokens (the check below can fail)
    torch.testing.assert_close(steps, tf, rtol=0, atol=2e-6)


def test_path_patching_needs_a_block_after_the_vector():
    from analysis.cli import UsageError

    with pytest.raises(UsageError, match="block after"):
        path_patching.Patcher(tiny_model("qwen2"), 2, vec())


# --------------------------------------------------------------------------------------------------------------------
# Logit lens


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_lens_of_last_residual_is_the_model_output(arch):
    model = sv.attach_steering(tiny_model(arch), init={l: vec(l) for l in range(3)})
    with torch.no_grad():
        out, cache = hooks.run_with_cache(model, ids(), names=["blocks.2.hook_resid_post"])
        assert torch.equal(logit_lens.lens(model, cache["blocks.2.hook_resid_post"], "norm"), out.logits)
        # raw = lm_head only; cosine is scale-free and bounded
        v = vec(7)
        torch.testing.assert_close(logit_lens.lens(model, v, "raw"), hooks.causal_lm(model).lm_head(v))
        cos = logit_lens.lens(model, v, "cosine")
        torch.testing.assert_close(cos, logit_lens.lens(model, 5 * v, "cosine"))
        assert cos.abs().max() <= 1 + 1e-6


def test_token_classes_and_readout_shares():
    assert logit_lens.token_class("the") == (False, False)
    assert logit_lens.token_class(" café") == (False, True)  # accented Latin: non-English, still Latin
    assert logit_lens.token_class("日本") == (True, True)
    assert logit_lens.token_class("при") == (True, True)
    assert logit_lens.token_class("\ufffd") == (True, True)  # a byte-level fragment of a multi-byte character
    assert logit_lens.token_class("123 +") == (False, False)

    class Tok:
        texts = ["a", "b", "日", "é", "c", "д"]

        def __len__(self):
            return len(self.texts)

        def batch_decode(self, rows):
            return [self.texts[r[0]] for r in rows]

    vocab = logit_lens.Vocab(Tok(), vocab_rows=8)  # two padding rows beyond the tokenizer are never ranked
    assert vocab.size == 6 and vocab.shares()["non_latin_share"] == pytest.approx(2 / 6)
    scores = torch.tensor([5.0, 4.0, -3.0, -2.0, 0.0, -1.0, 100.0, -100.0])
    r = logit_lens.readout(scores, vocab, k=3)
    assert [t["token"] for t in r["top"]] == ["a", "b", "c"]
    assert [t["token"] for t in r["bottom"]] == ["日", "é", "д"]
    assert r["bottom_non_latin_share"] == pytest.approx(2 / 3)
    assert r["bottom_non_english_share"] == pytest.approx(1.0)
    assert r["top_non_latin_share"] == 0.0


# --------------------------------------------------------------------------------------------------------------------
# Persistence


def test_persistence_stats_match_brute_force():
    model = sv.attach_steering(tiny_model("llama"))
    vectors = {l: vec(l, 1.5) for l in range(3)}
    seqs = _common.Sequences([[5, 6, 7, 8], [9, 10, 11]], [[12, 13, 14], [15, 16]], [0, 1])
    stats = persistence.shift_stats(model, seqs, vectors, [0, 1, 2], batch_size=2, pad=0)
    mats = persistence.matrices(stats, vectors, [0, 1, 2], [0, 1, 2])
    for i in range(3):
        assert mats["cos_to_vector"][i][i] == pytest.approx(1.0, abs=1e-6)  # Δ_i(t) = s_i at every token
        assert mats["cos_to_mean"][i][i] == pytest.approx(1.0, abs=1e-6)
        assert all(mats["cos_to_vector"][i][j] is None for j in range(i))
    # brute force: explicit per-token shifts on unpadded sequences
    for i in (0, 1):
        for j in range(i, 3):
            deltas = []
            for p, c in zip(seqs.prompt_ids, seqs.completion_ids):
                x = torch.tensor([p + c])
                name = f"blocks.{j}.hook_resid_post"
                with torch.no_grad(), _common.use_vectors(model, {i: vectors[i]}):
                    _, a = hooks.run_with_cache(model, x, names=[name])
                with torch.no_grad(), _common.use_vectors(model, {}):
                    _, b = hooks.run_with_cache(model, x, names=[name])
                deltas.append((a[name] - b[name])[0].double())
            d = torch.cat(deltas)
            mean = d.mean(0)
            cos = torch.nn.functional.cosine_similarity
            assert mats["cos_to_mean"][i][j] == pytest.approx(float(cos(d, mean[None]).mean()), abs=1e-6)
            assert mats["cos_to_vector"][i][j] == pytest.approx(float(cos(d, vectors[j].double()[None]).mean()),
                                                                abs=1e-6)
            assert mats["delta_norm"][i][j] == pytest.approx(float(d.norm(dim=-1).mean()), rel=1e-6)
            torch.testing.assert_close(stats[i][j].mean, mean, rtol=1e-6, atol=1e-8)


def test_use_vectors_restores_and_zero_is_base():
    model = sv.attach_steering(tiny_model("qwen2"), init={0: vec(0)})
    before = sv.get_vectors(model)
    x = ids()
    with torch.no_grad(), _common.use_vectors(model, {}):
        assert torch.equal(model(x).logits, tiny_model("qwen2")(x).logits)
    assert all(torch.equal(before[k], v) for k, v in sv.get_vectors(model).items())


def test_batches_right_pad_and_position_masks():
    seqs = _common.Sequences([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [0, 1])
    b = next(seqs.batches(2, "cpu", pad_id=0))
    assert b.input_ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert b.positions("prompt").tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert b.positions("completion").tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert b.positions("predict").tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    # right padding leaves the real tokens' logits unchanged
    model = tiny_model("qwen2")
    with torch.no_grad():
        padded = b.forward(model).logits[1, :4]
        alone = model(torch.tensor([[8, 11, 12, 13]])).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_resid_mid(arch):
    """The hook point added for path patching: the residual between attention and MLP, bit-exact."""
    model = sv.attach_steering(tiny_model(arch), init={1: vec(1)})
    with torch.no_grad():
        _, c = hooks.run_with_cache(model, ids(), names=lambda n: n.startswith("blocks.1."))
    assert torch.equal(c["blocks.1.hook_resid_mid"], c["blocks.1.hook_resid_pre"] + c["blocks.1.hook_attn_out"])
    assert torch.equal(c["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_mid"] + c["blocks.1.hook_mlp_out"])
    assert "blocks.0.hook_resid_mid" in hooks.hook_point_names(model)
