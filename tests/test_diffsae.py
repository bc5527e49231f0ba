"""``analysis diffsae`` and ``steering.sae``: the SAE itself, a planted problem with a known answer, ΔF against the
persistence command's shift, the command end to end on the demo checkpoint, and bad input (exit 2 before any model
loads)."""

import json
from pathlib import Path

import pytest
import torch

from analysis import _common
from analysis import sae_activations, sae_features
from analysis.__main__ import main
from conftest import spy_on_weight_loaders
import steering.sae
from steering import separation
from steering import vectors as sv

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo-checkpoint"


# --------------------------------------------------------------------------------------------------------------------
# The SAE


def test_topk_sae_keeps_k_features_unit_decoder_and_exact_unscale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=g) * 5 + 3
    sae, info = steering.sae.train(steering.sae.SAEConfig(12, 40, "topk", k=3),
                                   steering.sae.TrainConfig(steps=30, batch_size=100, lr=3e-3),
                                   lambda: iter(x.split(100)), init_sample=x)
    assert info["epochs_completed"] == 4 and info["vectors_seen"] == 3000
    with torch.no_grad():
        a = sae.encode(x)
    assert int((a > 0).sum(-1).max()) <= 3 and bool((a >= 0).all())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(40))
    # unscale: an SAE trained on c·x, read on x, gives activations and reconstruction divided by c
    c = info["input_scale"]
    scaled = steering.sae.SparseAutoencoder(sae.cfg)
    scaled.load_state_dict(sae.state_dict())
    with torch.no_grad():
        scaled.b_enc *= c
        scaled.b_dec *= c
        xs_hat, a_s = scaled(x * c)
        x_hat, a2 = sae(x)
    torch.testing.assert_close(a2, a_s / c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_hat, xs_hat / c, rtol=1e-4, atol=1e-4)


def test_saelens_layout_round_trip(tmp_path):
    sae = steering.sae.SparseAutoencoder(steering.sae.SAEConfig(8, 16, "topk", k=2),
                                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    steering.sae.save_saelens(sae, tmp_path / "sae", hook_name="blocks.1.hook_resid_post", model_name="m")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # the fields SAELens 6's TopKSAEConfig / load_from_disk read (sae_lens 6.54.12 opens this, see docs/analysis.md)
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 8 and cfg["d_sae"] == 16 and cfg["k"] == 2
    assert cfg["apply_b_dec_to_input"] is True and cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"].startswith("6.")
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (8, 16), "b_enc": (16,), "W_dec": (16, 8),
                                                         "b_dec": (8,)}
    back = steering.sae.load_saelens(tmp_path / "sae")
    x = torch.randn(20, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], sae(x)[0], rtol=0, atol=0)
    with pytest.raises(steering.sae.SAEError):
        steering.sae.SAEConfig(8, 16, "topk", k=17)


def test_mid_ranks_auroc_and_corrections_against_definitions():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 4, (30, 5), generator=g).float()  # many ties
    y = torch.rand(30, generator=g) < 0.4
    a = separation.auroc(v, y)
    for f in range(5):
        pos, neg = v[y, f], v[~y, f]
        pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
        assert float(a[f]) == pytest.approx(float(pairs.mean()), abs=1e-12)
    p = torch.tensor([0.01, 0.04, 0.03, 0.5], dtype=torch.float64)
    torch.testing.assert_close(separation.holm(p), torch.tensor([0.04, 0.09, 0.09, 0.5], dtype=torch.float64))
    torch.testing.assert_close(separation.benjamini_hochberg(p), torch.tensor([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5],
                                                                           dtype=torch.float64))
    groups = torch.arange(30) // 3
    perm = separation.permuted_labels(y, groups, 50, g)
    for b in range(50):  # within-group shuffles keep each group's number of positives
        assert torch.equal(torch.zeros(10, dtype=torch.long).index_add_(0, groups, perm[:, b].long()),
                           torch.zeros(10, dtype=torch.long).index_add_(0, groups, y.long()))


def test_benjamini_hochberg_is_scipys_and_holm_controls_like_bonferroni_step_down():
    from scipy.stats import false_discovery_control

    g = torch.Generator().manual_seed(3)
    for m in (1, 7, 200):
        p = torch.rand(m, generator=g, dtype=torch.float64) ** 3  # many small p-values, some ties after rounding
        p = torch.round(p * 1000) / 1000
        expected = torch.from_numpy(false_discovery_control(p.numpy(), method="bh"))
        torch.testing.assert_close(separation.benjamini_hochberg(p), expected, rtol=0, atol=1e-12)
        adjusted = separation.holm(p)
        assert bool((adjusted >= p).all()) and bool((adjusted <= torch.clamp(p * m, max=1.0)).all())
        order = torch.argsort(p)
        assert bool((adjusted[order][1:] >= adjusted[order][:-1]).all())  # step-down: monotone in the raw p


# --------------------------------------------------------------------------------------------------------------------
# A planted problem


def planted(tmp_path, *, shuffle_labels: bool):
    """ΔF = μ + Σ_i z_i d_i + noise over 6 orthonormal directions d_i; z_i is active on ~20% of tokens with a size
    in [1, 2], except d_0, which appears only in the "correct" completions. 60 problems x 4 samples x 12 tokens;
    problems 0-5 are held out."""
    g = torch.Generator().manual_seed(0)
    d, n_dirs, problems, k, tokens = 32, 6, 60, 4, 12
    dirs = torch.linalg.qr(torch.randn(d, n_dirs, generator=g))[0].T
    mu = torch.randn(d, generator=g) * 2
    n = problems * k
    problem = torch.arange(n) // k
    correct = torch.rand(n, generator=g) < 0.5
    writers = {s: sae_activations.ChunkWriter(tmp_path, s, 500) for s in sae_activations.SPLITS}
    for r in range(n):
        z = (torch.rand(tokens, n_dirs, generator=g) < 0.2).float() * (1 + torch.rand(tokens, n_dirs, generator=g))
        if not correct[r]:
            z[:, 0] = 0
        x = mu + z @ dirs + 0.02 * torch.randn(tokens, d, generator=g)
        split = "heldout" if int(problem[r]) < 6 else "train"
        writers[split].add({"x": x, "row": torch.full((tokens,), r), "pos": torch.arange(tokens),
                            "token": torch.zeros(tokens, dtype=torch.long)})
    for w in writers.values():
        w.flush()
    files = {s: w.files for s, w in writers.items()}
    gen = torch.Generator().manual_seed(0)
    cfg = steering.sae.SAEConfig(d, 48, "topk", k=3)
    sae, _ = steering.sae.train(cfg, steering.sae.TrainConfig(steps=400, batch_size=128, lr=3e-3),
                                sae_activations.batch_stream(files["train"], 128, gen),
                                init_sample=sae_activations.read_chunk(files["train"][0])["x"])
    st = sae_activations.feature_pass(sae, files, n, top_m=3, input_kind="diff")
    labels = correct[torch.randperm(n, generator=gen)] if shuffle_labels else correct
    tested = torch.nonzero(st.alive).reshape(-1)
    sep = separation.separation(st.row_means()[:, tested], labels, problem, permutations=199, correction="maxt",
                             alpha=0.05, generator=gen)
    rows = sae_features.ranked_table(sep, tested, st.row_means(), labels, st.fires.double() / st.count)
    return sae, st, rows, dirs, sep


def test_planted_direction_is_the_top_feature(tmp_path):
    sae, st, rows, dirs, sep = planted(tmp_path, shuffle_labels=False)
    top = rows[0]
    cos = float(torch.nn.functional.cosine_similarity(sae.W_dec[top["feature"]].detach(), dirs[0], dim=0))
    assert cos > 0.9 and top["auroc"] > 0.9 and top["significant"] and top["direction"] == "correct"
    # the stated reconstruction quality on held-out completions (problems the SAE never saw)
    held = st.recon["heldout"].metrics()
    assert held["num_vectors"] == 6 * 4 * 12 and held["explained_variance"] >= 0.9 and held["l0"] <= 3
    # every other planted direction is a feature too, and none of them separates
    best = (sae.W_dec.detach() @ dirs.T).max(0)
    assert float(best.values.min()) > 0.9
    others = {int(f) for f in best.indices[1:]}
    assert not any(r["significant"] for r in rows if r["feature"] in others)
    # the ΔF variance share along the planted direction's feature is about its share of the planted variance
    along, explained = st.delta_shares(True)
    assert 0.05 < float(along[top["feature"]]) < 0.4 and 0.05 < float(explained[top["feature"]]) < 0.4


def test_planted_with_shuffled_labels_passes_nothing(tmp_path):
    _, _, rows, _, sep = planted(tmp_path, shuffle_labels=True)
    assert not any(r["significant"] for r in rows)
    assert all(r["p_maxt"] > 0.05 for r in rows)
    assert max(r["auroc"] for r in rows) < 0.5 + sep["threshold"]


# --------------------------------------------------------------------------------------------------------------------
# ΔF is zero without vectors and is persistence's shift


def _seqs():
    return _common.Sequences([[5, 6, 7, 8], [9, 10, 11], [12, 13]], [[14, 15, 16], [17, 18], [19, 20, 21, 22]],
                             [0, 1, 2])


def _collected(tmp_path, model, vectors, layer):
    w = sae_activations.ChunkWriter(tmp_path, "train", 4)
    sae_activations.collect(model, _seqs(), vectors, layer, input_kind="diff", positions="completion",
                            writers={"train": w}, split_of_row=["train"] * 3, batch_size=2, pad=0)
    return {k: torch.cat([sae_activations.read_chunk(f)[k] for f in w.files]) for k in ("x", "row", "pos")}


def test_delta_is_zero_without_vectors_and_equals_persistence_shift(tiny_checkpoint, tmp_path):
    from analysis import cli
    from analysis.persistence import shift_stats

    import argparse

    args = argparse.Namespace(device="cpu", dtype="float32")
    model, _ = cli.load_steerable(sv.read_meta(tiny_checkpoint)["base_model"], args)
    vectors = cli.checkpoint_vectors(tiny_checkpoint, model)
    (tmp_path / "z").mkdir()
    zero = _collected(tmp_path / "z", model, {}, 2)
    assert zero["x"].shape == (9, 32) and torch.count_nonzero(zero["x"]) == 0
    assert zero["row"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2] and zero["pos"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    for i in (0, 1):
        (tmp_path / str(i)).mkdir()
        got = _collected(tmp_path / str(i), model, {i: vectors[i]}, 2)["x"].double()
        st = shift_stats(model, _seqs(), vectors, [i], [2], positions="completion", batch_size=2)[i][2]
        assert st.count == got.shape[0] == 9
        torch.testing.assert_close(got.sum(0), st.sum_delta, rtol=1e-6, atol=1e-6)
        assert float(got.norm(dim=-1).sum()) == pytest.approx(st.sum_norm, rel=1e-6)
        assert float(got.norm(dim=-1).min()) > 0


def test_command_delta_is_the_persistence_commands_shift(tiny_checkpoint, tmp_path):
    """The two commands, given the same sampling flags, see the same tokens; with one vector on, diffsae's stored ΔF
    at layer 2 has persistence's mean norm and mean direction there."""
    common = ["--checkpoint", str(tiny_checkpoint), "--benchmarks", "procedural:arithmetic:3", "--max-new-tokens", "6",
              "--no-progress"]
    assert main(["persistence", *common, "--out", str(tmp_path / "p"), "--layers", "0", "--positions", "completion",
                 "--samples-per-problem", "2"]) == 0
    assert main(["diffsae", *common, "--out", str(tmp_path / "d"), "--layer", "2", "--steer-layers", "0",
                 "--samples-per-problem", "2", "--heldout-fraction", "0", "--dict-size", "16", "--topk", "2",
                 "--steps", "5", "--sae-batch-size", "4", "--permutations", "19"]) == 0
    p = json.loads((tmp_path / "p" / "result.json").read_text())
    out = tmp_path / "d"
    chunks = sorted((out / "activations").glob("train-*.safetensors"))
    x = torch.cat([sae_activations.read_chunk(f)["x"] for f in chunks]).double()
    assert x.shape[0] == p["num_tokens"] > 0
    assert float(x.norm(dim=-1).mean()) == pytest.approx(p["delta_norm"][0][2], rel=1e-6)
    vec2 = sv.load_vectors(tiny_checkpoint)[2].double().reshape(-1)
    cos = float(x.mean(0) @ vec2 / (x.mean(0).norm() * vec2.norm()))
    assert cos == pytest.approx(p["mean_shift_cos_to_vector"][0][2], abs=1e-6)


def test_command_steered_input_l1_global_permutations_all_positions(tiny_checkpoint, tmp_path):
    """The other choices run end to end: --input steered stores the steered residual and ΔF beside it, --positions all
    adds the prompt tokens (pos < 0) to the SAE's data but not to the per-completion means."""
    common = ["--checkpoint", str(tiny_checkpoint), "--benchmarks", "procedural:arithmetic:4", "--max-new-tokens", "6",
              "--samples-per-problem", "2", "--heldout-fraction", "0.25", "--dict-size", "24", "--topk", "3",
              "--steps", "5", "--sae-batch-size", "8", "--permutations", "19", "--no-progress", "--layer", "1"]
    assert main(["diffsae", *common, "--out", str(tmp_path / "diff")]) == 0
    assert main(["diffsae", *common, "--out", str(tmp_path / "st"), "--input", "steered", "--sparsity", "l1",
                 "--permutation", "global", "--correction", "bh", "--positions", "all"]) == 0
    r = json.loads((tmp_path / "st" / "result.json").read_text())
    assert r["input"] == "steered" and r["sae"]["sparsity"] == "l1" and r["sae"]["k"] is None
    assert json.loads((tmp_path / "st" / "sae" / "cfg.json").read_text())["architecture"] == "standard"

    def chunks(name):
        files = sorted((tmp_path / name / "activations").glob("*.safetensors"))
        return {k: torch.cat([sae_activations.read_chunk(f)[k] for f in files])
                for k in sae_activations.read_chunk(files[0])}

    diff, st = chunks("diff"), chunks("st")
    assert set(st) == {"x", "delta", "row", "pos", "token"} and set(diff) == {"x", "row", "pos", "token"}
    assert bool((st["pos"] < 0).any()) and bool((diff["pos"] >= 0).all())
    comp = st["pos"] >= 0
    key = lambda c, m: sorted(zip(c["row"][m].tolist(), c["pos"][m].tolist()))  # noqa: E731
    assert key(st, comp) == key(diff, diff["pos"] >= 0)
    order_st = torch.argsort(st["row"][comp] * 1000 + st["pos"][comp])
    order_diff = torch.argsort(diff["row"] * 1000 + diff["pos"])
    torch.testing.assert_close(st["delta"][comp][order_st], diff["x"][order_diff], rtol=0, atol=0)
    assert not torch.allclose(st["x"][comp][order_st], diff["x"][order_diff])
    assert r["data"]["train_tokens"] + r["data"]["heldout_tokens"] == st["x"].shape[0]
    if r["separation"] is not None:
        assert r["separation"]["correction"] == "bh" and r["separation"]["permutation"] == "global"
        assert all(row["significant"] == (row["q_bh"] <= 0.05) for row in r["features"])
    else:
        assert r["separation_skipped"] and r["features"] == [] and r["top_features"] == []


# --------------------------------------------------------------------------------------------------------------------
# The command


pytestmark_demo = pytest.mark.skipif(not (DEMO / "steering.json").is_file(), reason=f"no demo checkpoint at {DEMO}")


@pytestmark_demo
def test_command_on_demo_checkpoint(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "d"
    assert main(["diffsae", "--checkpoint", str(DEMO), "--layer", "2", "--out", str(out), "--benchmarks",
                 "procedural:facts:12", "--samples-per-problem", "4", "--max-new-tokens", "24", "--dict-size", "48",
                 "--topk", "4", "--steps", "60", "--sae-batch-size", "128", "--permutations", "99", "--top-features",
                 "2", "--examples", "3", "--heldout-fraction", "0.25", "--no-progress"]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["command"] == "diffsae" and r["layer"] == 2 and r["hook_name"] == "blocks.2.hook_resid_post"
    assert r["input"] == "diff" and r["steer_layers"] == [0, 1, 2] and r["settings"]["temperature"] == 1.0
    data, sae_m = r["data"], r["sae"]
    assert data["num_completions"] == 48 and len(data["heldout_problems"]) == 3
    assert data["train_tokens"] + data["heldout_tokens"] > 48 and data["heldout_tokens"] > 0
    assert sae_m["d_in"] == 96 and sae_m["d_sae"] == 48 and sae_m["k"] == 4
    for split in ("train", "heldout"):
        m = sae_m[split]
        assert 0 < m["l0"] <= 4 and m["mse"] > 0 and 0 < m["explained_variance"] < 1
    assert 0 <= sae_m["dead_features"] < 48 and sae_m["dead_fraction"] == sae_m["dead_features"] / 48
    for name in r["plots"]:
        assert (out / name).stat().st_size > 1000, name
    assert {"sae_training.png", "cards/feature_01_%d.png" % r["features"][0]["feature"]} <= set(r["plots"])
    index = json.loads((out / "activations" / "index.json").read_text())
    assert index["tokens"] == {"train": data["train_tokens"], "heldout": data["heldout_tokens"]}

    # the per-completion means come from the saved SAE applied to the saved chunks, and the AUROC from them
    sae = steering.sae.load_saelens(out / "sae")
    cf = load_file(str(out / "completion_features.safetensors"))
    sums = torch.zeros(48, 48)
    for split in ("train", "heldout"):
        for name in index["chunks"][split]:
            chunk = sae_activations.read_chunk(out / "activations" / name)
            with torch.no_grad():
                sums.index_add_(0, chunk["row"], sae.encode(chunk["x"]))
    torch.testing.assert_close(cf["mean_activation"], sums / cf["completion_tokens"][:, None].float(), rtol=1e-5,
                               atol=1e-6)
    assert int(cf["correct"].sum()) == data["num_correct"]
    assert 0 < data["num_correct"] < 48 and r["separation"] is not None and r["separation_skipped"] is None
    rows = r["features"]
    assert [x["rank"] for x in rows] == list(range(1, r["separation"]["num_tested"] + 1))
    assert all(a["effect"] >= b["effect"] for a, b in zip(rows, rows[1:]))
    y = cf["correct"].bool()
    for row in rows[:3]:
        v = cf["mean_activation"][:, row["feature"]]
        pos, neg = v[y], v[~y]
        pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
        assert row["auroc"] == pytest.approx(float(pairs.mean()), abs=1e-9)
        assert 1 / 100 <= row["p_value"] <= row["p_maxt"] <= 1 and row["p_value"] <= row["p_holm"]
        assert row["significant"] == (row["p_maxt"] <= 0.05)
    top = r["top_features"]
    assert len(top) == 2 and set(top[0]["cos_to_vectors"]) == {"0", "1", "2"}
    vectors = sv.load_vectors(DEMO)
    f = top[0]["feature"]
    assert top[0]["cos_to_vectors"]["2"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(sae.W_dec[f].detach(), vectors[2].reshape(-1), dim=0)), abs=1e-5)
    assert len(top[0]["lens"]["top"]) == 10 and 0 <= top[0]["delta_variance_along"] <= 1
    ex = top[0]["examples"][0]
    assert ex["activation"] > 0 and any(c["activation"] == pytest.approx(ex["activation"]) for c in ex["context"])


def test_the_default_sae_batch_adapts_to_small_data_and_says_so(tiny_checkpoint, tmp_path, capsys):
    """Issue 25: with the default --sae-batch-size (4096) a small benchmark sampled, recorded, then refused; now every
    recorded vector makes the batch, with a note. An explicit batch larger than the data is still refused."""
    common = ["--checkpoint", str(tiny_checkpoint), "--benchmarks", "procedural:arithmetic:3", "--max-new-tokens", "6",
              "--samples-per-problem", "2", "--heldout-fraction", "0", "--dict-size", "16", "--topk", "2", "--steps",
              "3", "--permutations", "19", "--no-progress", "--layer", "2"]
    assert main(["diffsae", *common, "--out", str(tmp_path / "d")]) == 0
    result = json.loads((tmp_path / "d" / "result.json").read_text())
    assert 0 < result["settings"]["sae_batch_size"] == result["data"]["train_tokens"] < 4096
    assert "fewer than the default --sae-batch-size 4096" in capsys.readouterr().err
    assert main(["diffsae", *common, "--out", str(tmp_path / "e"), "--sae-batch-size", "4096"]) == 2
    assert "--sae-batch-size 4096 is more than the" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["diffsae", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in ("ΔF", "--layer", "--input", "--dict-size", "--topk", "--l1-coeff", "--steps", "--lr",
                "--sae-batch-size", "--chunk-size", "--samples-per-problem", "--temperature", "--correction",
                "--permutations", "--sae-seed", "--no-progress", "result.json", "Westfall"):
        assert key in text, key


@pytestmark_demo
def test_bad_input_exits_2_before_any_model_loads(tmp_path, monkeypatch, capsys):
    demo_base = str(REPO / "assets" / "demo-base")
    model = sv.attach_steering(sv.load_base_model(demo_base, dtype="float32"), layers=[2])
    only_last = sv.save_checkpoint(model, tmp_path / "only-last", base_model=demo_base, step=1)
    capsys.readouterr()  # the loading output of this checkpoint's own model

    loads = spy_on_weight_loaders(monkeypatch)  # after only_last, whose model this test loads itself
    (tmp_path / "empty.jsonl").write_text("")
    common = ["--out", str(tmp_path / "o"), "--benchmarks", "procedural:facts:4"]
    demo = ["--checkpoint", str(DEMO), *common]
    cases = [
        (["--layer", "3", *demo], "--layer 3: out of range"),
        (["--layer", "-4", *demo], "out of range"),
        (["--layer", "1", "--checkpoint", str(only_last), *common], "no steered layer at or before"),
        (["--layer", "1", "--steer-layers", "2", *demo], "no steered layer at or before"),
        (["--layer", "2", "--steer-layers", "2", *demo], "only steered layer"),
        (["--layer", "2", "--checkpoint", str(DEMO), "--out", str(tmp_path / "o"), "--benchmarks",
          str(tmp_path / "empty.jsonl")], "holds no rows"),
        (["--layer", "2", "--checkpoint", str(DEMO), "--out", str(tmp_path / "o"), "--benchmarks",
          "procedural:facts:0"], "must be >= 1"),
        (["--layer", "2", "--topk", "0", *demo], "--topk must be >= 1"),
        (["--layer", "2", "--dict-size", "8", "--topk", "9", *demo], "larger than the dictionary"),
        (["--layer", "2", "--lr", "0", *demo], "--lr must be in"),
        (["--layer", "2", "--lr", "nan", *demo], "--lr must be in"),
        (["--layer", "2", "--alpha", "1.5", *demo], "--alpha must be in"),
        (["--layer", "2", "--heldout-fraction", "1", *demo], "--heldout-fraction must be in"),
        (["--layer", "2", "--permutations", "10", *demo], "cannot reach --alpha"),
        (["--layer", "2", "--steps", "0", *demo], "--steps must be >= 1"),
        (["--layer", "2", "--num-samples", "4", *demo], "--samples-per-problem"),
        (["--layer", "2", "--temperature", "-1", *demo], "temperature"),
    ]
    for argv, msg in cases:
        assert main(["diffsae", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists() and loads == []
