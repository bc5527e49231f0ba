"""Every analysis command, run end to end (in-process, offline) on tiny models: result.json numbers and plots.

Accuracy-based commands run on a *toy world* built here in a few seconds: a tiny Qwen2 base trained so that its
greedy completion depends on which known "key" vectors are added: none -> ``B\\boxed{2}``; layer 0's key ->
``A\\boxed{1}``; layer 1's -> ``C\\boxed{3}``; layer 2's -> ``B\\boxed{2}``; all three -> ``A\\boxed{1}`` on the
questions ending in "?" and ``B\\boxed{2}`` on those ending in "!". Four problems have answer 1 (the "?" ones) and
two answer 2, so accuracies differ between base (2/6), single layers, pairs and all layers (6/6), and the first
generated token decides the answer (as for the paper's last-layer vector). The tests compare each command's numbers
with independent evaluations and with the formulas the commands document.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from analysis.__main__ import main
from steering import hooks
from steering import vectors as sv
from steering.tiny import build_char_tokenizer, tiny_model
from conftest import corrupt_checkpoint

QUESTIONS = [("What is 1+0?", "1"), ("What is 0+1?", "1"), ("What is 3-2?", "1"), ("What is 2-1?", "1"),
             ("What is 1+1!", "2"), ("What is 3-1!", "2")]
A, B, C = "A\\boxed{1}<|im_end|>", "B\\boxed{2}<|im_end|>", "C\\boxed{3}<|im_end|>"
# (layers whose keys are on, completion of each problem)
CONDITIONS = [((), [B] * 6), ((0,), [A] * 6), ((1,), [C] * 6), ((2,), [B] * 6), ((0, 1, 2), [A] * 4 + [B] * 2)]


def _save_base(model, path):
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from steering.vectors import load_tokenizer

    from steering.templates import get_template

    root = tmp_path_factory.mktemp("toy")
    base_dir = root / "toy-base"
    model = tiny_model("qwen2", seed=0)
    _save_base(model, base_dir)
    tok = load_tokenizer(base_dir)  # exactly the tokenizer the commands will load
    (root / "toy.txt").write_text("{question}=")
    tmpl = get_template(str(root / "toy.txt"))
    (root / "toy.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    prompts = [tok(tmpl.render(q, tokenizer=tok))["input_ids"] for q, _ in QUESTIONS]

    rows, labels, on = [], [], {layer: [] for layer in range(3)}
    for layers, completions in CONDITIONS:
        for p, comp in zip(prompts, completions):
            c = tok(comp, add_special_tokens=False)["input_ids"]
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
            for layer in range(3):
                on[layer].append(layer in layers)
    w = max(map(len, rows))
    ids = torch.tensor([r + [0] * (w - len(r)) for r in rows])
    labels = torch.tensor([lab + [-100] * (w - len(lab)) for lab in labels])
    g = torch.Generator().manual_seed(0)
    keys = {layer: torch.randn(32, generator=g) for layer in range(3)}
    # one batch holds every condition: each layer's key is added on the rows of the conditions that use it
    key_hooks = [(f"blocks.{layer}.hook_mlp_out",
                  hooks.add_at(keys[layer], torch.tensor(on[layer])[:, None].expand(-1, w))) for layer in range(3)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        with hooks.hooks(model, key_hooks):
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(base_dir)
    cks = {}
    for name, vecs in [("all", keys)] + [(layer, {layer: keys[layer]}) for layer in range(3)]:
        m = sv.attach_steering(sv.load_base_model(str(base_dir), dtype="float32"), layers=sorted(vecs), init=vecs)
        cks[name] = sv.save_checkpoint(m, root / f"ck-{name}", base_model=str(base_dir), step=1,
                                       training_config={"template": str(root / "toy.txt")})
    return {"root": root, "base": base_dir, "bench": root / "toy.jsonl", "template": root / "toy.txt", "cks": cks,
            "keys": keys}


def eval_args(toy, max_new=14):
    return ["--benchmarks", f"file:{toy['bench']}", "--template", str(toy["template"]), "--temperature", "0",
            "--max-new-tokens", str(max_new), "--no-progress"]


def evaluate(toy, vectors=None, base_dir=None, max_new=14):
    """Independent greedy evaluation: a freshly loaded model with exactly these vectors (None: the plain base)."""
    from steering.evaluation import evaluate_model
    from steering.vectors import load_tokenizer
    from steering.generation import SamplingParams
    from steering.templates import get_template

    base_dir = str(base_dir or toy["base"])
    model = sv.load_base_model(base_dir, dtype="float32")
    if vectors:
        model = sv.attach_steering(model, layers=sorted(vectors), init=vectors)
    problems = [{"question": q, "answer": a} for q, a in QUESTIONS]
    return evaluate_model(model.eval(), load_tokenizer(base_dir), problems,
                          template=get_template(str(toy["template"])),
                          params=SamplingParams(max_new_tokens=max_new, temperature=0.0), num_samples=1, seeds=[0])


def read(out):
    r = json.loads((Path(out) / "result.json").read_text())
    for name in r.get("plots", []):
        assert (Path(out) / name).stat().st_size > 1000, name
    return r


# --------------------------------------------------------------------------------------------------------------------
# Readouts on the shared tiny checkpoint (random vectors)


def test_logit_lens_command(tiny_checkpoint, tiny_base_dir, tmp_path):
    out = tmp_path / "ll"
    assert main(["logit-lens", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--k", "5", "--benchmarks",
                 "procedural:arithmetic:2", "--max-new-tokens", "4", "--no-progress"]) == 0
    r = read(out)
    assert {"top_tokens.png", "bottom_tokens.png", "non_latin_share.png"} <= set(r["plots"])
    model = sv.load_steered_model(tiny_checkpoint, base=str(tiny_base_dir), dtype="float32")
    vectors = sv.get_vectors(model)
    assert [e["layer"] for e in r["layers"]] == [0, 1, 2]
    for e in r["layers"]:
        with torch.no_grad():
            scores = hooks.unembed(model, vectors[e["layer"]])
        assert [t["token_id"] for t in e["top"]] == torch.topk(scores, 5).indices.tolist()
        assert [t["token_id"] for t in e["bottom"]] == torch.topk(-scores, 5).indices.tolist()
        assert e["top"][0]["value"] == pytest.approx(float(scores.max()), rel=1e-5)
        assert e["vector_norm"] == pytest.approx(float(vectors[e["layer"]].norm()), rel=1e-6)
        assert e["bottom_non_latin_share"] == 0.0  # the char tokenizer is ASCII only
    assert r["vocab"]["size"] == 100 and r["final_shift"]["num_tokens"] > 0 and r["final_shift"]["norm"] > 0
    assert main(["logit-lens", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "ns"), "--no-shift",
                 "--no-progress"]) == 0
    assert read(tmp_path / "ns")["final_shift"] is None


def test_persistence_and_unembed_similarity_commands(tiny_checkpoint, tmp_path):
    common = ["--checkpoint", str(tiny_checkpoint), "--benchmarks", "procedural:arithmetic:2", "--max-new-tokens", "5",
              "--no-progress"]
    assert main(["persistence", *common, "--out", str(tmp_path / "p")]) == 0
    p = read(tmp_path / "p")
    assert p["steer_layers"] == [0, 1, 2] and p["target_layers"] == [0, 1, 2]
    for i in range(3):
        assert p["cos_to_vector"][i][i] == pytest.approx(1.0, abs=1e-5)
        assert p["delta_norm"][i][i] == pytest.approx(p["vector_norms"][str(i)], rel=1e-4)
        for j in range(3):
            if j < i:
                assert p["cos_to_mean"][i][j] is None
            else:
                assert -1 <= p["cos_to_mean"][i][j] <= 1 + 1e-9
    assert p["num_tokens"] > 20

    assert main(["unembed-similarity", *common, "--out", str(tmp_path / "u"), "--k", "4"]) == 0
    u = read(tmp_path / "u")
    assert u["labels"] == ["0", "1", "2", "all"]
    cos = torch.tensor(u["cosine"])
    torch.testing.assert_close(cos, cos.T)
    torch.testing.assert_close(torch.diag(cos), torch.ones(4, dtype=cos.dtype))
    assert u["num_tokens"] == p["num_tokens"]  # same problems, same sampling settings, same sequences
    for row in u["readouts"]:
        assert row["norm"] == pytest.approx(u["shift_norms"][row["label"]])
        assert len(row["top"]) == 4
    # the shift of the last layer's own vector is the vector itself (nothing after it but the final norm)
    assert u["shift_norms"]["2"] == pytest.approx(p["vector_norms"]["2"], rel=1e-4)


def test_a_zero_vector_has_a_null_cosine_in_similarity_and_unembed_similarity(tiny_base_dir, tiny_checkpoint,
                                                                               tmp_path):
    """The one cosine (steering.readout.cosine_matrix): NaN for a zero vector, written as null by both commands."""
    from steering import readout

    cos = readout.cosine_matrix([torch.zeros(4), torch.ones(4), -torch.ones(4)])
    assert cos[0].isnan().all() and cos[:, 0].isnan().all() and cos[1, 2].item() == pytest.approx(-1.0)
    assert readout.none_for_nan(cos)[0] == [None, None, None] and readout.none_for_nan(cos)[1][1:] == [1.0, -1.0]
    model = sv.attach_steering(sv.load_base_model(str(tiny_base_dir), dtype="float32"))
    vectors = sv.load_vectors(tiny_checkpoint)
    sv.set_vectors(model, {**vectors, 1: torch.zeros_like(vectors[1])})  # layer 1 zero: its shift is exactly zero
    zero_at_1 = sv.save_checkpoint(model, tmp_path / "zero-at-1", base_model=str(tiny_base_dir), step=1)
    sv.set_vectors(model, {layer: torch.zeros_like(v) for layer, v in vectors.items()})
    all_zero = sv.save_checkpoint(model, tmp_path / "all-zero", base_model=str(tiny_base_dir), step=1)

    assert main(["similarity", "--vectors", f"zero={all_zero}", f"rl={tiny_checkpoint}", "--out",
                 str(tmp_path / "s")]) == 0
    s = read(tmp_path / "s")
    for mat in [*s["per_layer"].values(), s["concatenated"]]:
        assert mat[0] == [None, None] and mat[1][0] is None and mat[1][1] == pytest.approx(1.0)

    assert main(["unembed-similarity", "--checkpoint", str(zero_at_1), "--benchmarks", "procedural:arithmetic:2",
                 "--max-new-tokens", "5", "--no-progress", "--out", str(tmp_path / "u"), "--k", "4"]) == 0
    u = read(tmp_path / "u")
    assert u["labels"] == ["0", "1", "2", "all"] and u["shift_norms"]["1"] == 0.0
    assert u["cosine"][1] == [None] * 4 and [row[1] for row in u["cosine"]] == [None] * 4
    assert u["cosine"][0][0] == pytest.approx(1.0) and u["cosine"][2][3] is not None


# --------------------------------------------------------------------------------------------------------------------
# Accuracy-based commands on the toy world


def test_compose_command(toy, tmp_path):
    cks = toy["cks"]
    out = tmp_path / "compose"
    assert main(["compose", "--checkpoint", str(cks["all"]), "--singles", *(str(cks[i]) for i in range(3)),
                 "--out", str(out), *eval_args(toy)]) == 0
    r = read(out)
    assert r["isolated"] is True and r["layers"] == [0, 1, 2]
    assert r["base_accuracy"] == pytest.approx(evaluate(toy).accuracy)
    assert r["all_layer_accuracy"] == pytest.approx(evaluate(toy, toy["keys"]).accuracy)
    assert r["all_layer_accuracy"] > r["base_accuracy"]  # the toy learned its keys
    singles = {s["layer"]: s["accuracy"] for s in r["singles"]}
    assert singles[0] == pytest.approx(evaluate(toy, {0: toy["keys"][0]}).accuracy)
    pair = next(p for p in r["pairs"] if p["layers"] == [1, 2])
    assert pair["accuracy"] == pytest.approx(evaluate(toy, {1: toy["keys"][1], 2: toy["keys"][2]}).accuracy)
    for p in r["pairs"]:
        i, j = p["layers"]
        best = max(singles[i], singles[j])
        assert p["max_single"] == best
        expect = None if r["all_layer_accuracy"] == best else (p["accuracy"] - best) / (r["all_layer_accuracy"] - best)
        assert p["score"] == (pytest.approx(expect) if expect is not None else None)
        assert r["score_matrix"][i][j] == r["score_matrix"][j][i] == p["score"]
    assert r["score_matrix"][0][0] is None


def test_transfer_command(toy, tmp_path, capsys):
    cks = toy["cks"]
    other = _save_base(tiny_model("qwen2", seed=1), tmp_path / "other-base")  # same shape, never trained
    out = tmp_path / "transfer"
    assert main(["transfer", "--checkpoint", str(cks["all"]), "--donors", str(cks[0]), "--recipients",
                 str(toy["base"]), str(other), "--self-trained", f"{toy['base']}={cks['all']}", "--out", str(out),
                 *eval_args(toy)]) == 0
    r = read(out)
    own = evaluate(toy, toy["keys"])
    # transfer onto its own base reproduces the checkpoint's own evaluation exactly
    assert r["accuracy"][0][0] == own.accuracy
    key = f"{cks['all']}|{toy['base']}"
    assert r["detail"][key][next(iter(r["detail"][key]))]["accuracy"] == own.accuracy
    rec = r["recipients"]
    assert rec[0]["base_accuracy"] == evaluate(toy).accuracy and rec[0]["self_trained_accuracy"] == own.accuracy
    assert r["score"][0][0] == pytest.approx(1.0)
    expect = (r["accuracy"][1][0] - rec[0]["base_accuracy"]) / (own.accuracy - rec[0]["base_accuracy"])
    assert r["score"][1][0] == pytest.approx(expect)
    assert r["accuracy"][0][1] == evaluate(toy, toy["keys"], base_dir=other).accuracy
    assert rec[1]["self_trained"] is None and r["score"][0][1] is None

    wide = _save_base(tiny_model("qwen2", seed=0, hidden_size=48, intermediate_size=96), tmp_path / "wide")
    code = main(["transfer", "--checkpoint", str(cks["all"]), "--recipients", str(wide), "--out",
                 str(tmp_path / "bad"), *eval_args(toy)])
    err = capsys.readouterr().err
    assert code == 2 and "hidden size 32 != 48" in err and "3 layers x hidden size 48" in err
    assert not (tmp_path / "bad" / "result.json").exists()


def test_first_token_command(toy, tmp_path):
    cks = toy["cks"]
    out = tmp_path / "ft"
    assert main(["first-token", "--checkpoint", str(cks["all"]), "--layers", "all", "--out", str(out), "--k", "5",
                 *eval_args(toy)]) == 0
    r = read(out)
    assert r["layers"] == [0, 1, 2]
    top = r["first_token"]["top_gained"][0]
    assert top["token"] == "A" and top["gain"] > 0.2  # the keys move the first token from B to A
    assert r["first_token"]["top_lost"][0]["token"] == "B"
    assert top["gain"] == pytest.approx(top["p_steered"] - top["p_base"])
    pg = r["position_gain"]
    assert pg["positions"][0] == 0 and pg["count"][0] == 6
    assert pg["mean_kl"][0] == max(pg["mean_kl"])  # the effect concentrates on the first generated token
    s = r["substitution"]
    assert s["text"] == "A" and s["suffix_tokenization_matches"]
    assert s["acc_base"] == evaluate(toy).accuracy
    assert s["acc_steered"] == evaluate(toy, toy["keys"]).accuracy
    assert s["recovered"] == pytest.approx((s["acc_substituted"] - s["acc_base"]) / (s["acc_steered"] - s["acc_base"]))
    assert s["acc_substituted"] in [k / 6 for k in range(7)]


def test_path_patching_command(toy, tmp_path):
    cks = toy["cks"]
    out = tmp_path / "pp"
    assert main(["path-patching", "--checkpoint", str(cks["all"]), "--out", str(out), *eval_args(toy)]) == 0
    r = read(out)
    assert r["layer"] == 1 and r["target_layer"] == 2  # default: L-2 into the last block
    assert r["attention"] == {"n_heads": 4, "n_kv_heads": 2, "head_dim": 8}
    rows = {v["name"]: v for v in r["variants"]}
    assert rows["full"]["kl_to_full"] == 0.0 and rows["base"]["kl_to_full"] > 0
    assert all(v["kl_to_full"] >= 0 for v in r["variants"])
    assert rows["full"]["accuracy"] == evaluate(toy, {1: toy["keys"][1]}).accuracy
    assert rows["base"]["accuracy"] == evaluate(toy).accuracy
    assert rows["remove-q-h0"]["accuracy"] is None  # per-head accuracy only with --head-accuracy
    assert [len(r["heads"]["remove"][p]) for p in "qkvz"] == [4, 2, 2, 4]
    assert r["heads"]["inject"]["v"][1] == rows["inject-v-h1"]["kl_to_full"]
    assert main(["path-patching", "--checkpoint", str(cks["all"]), "--layer", "2", "--out", str(tmp_path / "x"),
                 *eval_args(toy)]) == 2


def test_layer_ablation_make_and_collect(toy, tmp_path):
    cks = toy["cks"]
    make = tmp_path / "make"
    runs = tmp_path / "runs"
    assert main(["layer-ablation", "make", "--model", str(toy["base"]), "--dataset", "procedural:mixed",
                 "--out", str(make), "--runs-dir", str(runs), "--set", "max_steps=7", "--lr", "1=0.5"]) == 0
    r = read(make)
    assert [x["layer"] for x in r["runs"]] == [0, 1, 2] and r["schedule"] == "qwen"
    cfg = [yaml.safe_load((make / "configs" / f"layer_{i:02d}.yaml").read_text()) for i in range(3)]
    assert [c["layers"] for c in cfg] == [[0], [1], [2]]
    assert cfg[0]["learning_rate"] == pytest.approx(3e-3) and cfg[2]["learning_rate"] == pytest.approx(0.1)
    assert cfg[1]["learning_rate"] == 0.5 and cfg[0]["max_steps"] == 7 and cfg[0]["dataset"] == "procedural:mixed"
    assert cfg[2]["output_dir"] == str(runs / "layer_02")
    launch = (make / "launch.sh").read_text()
    assert "accelerate launch --config_file launch/single_gpu.yaml -m train --config" in launch
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "accelerate").write_text('#!/usr/bin/env bash\necho "ACCELERATE $*"\n')
    (fake / "accelerate").chmod(0o755)
    import os
    import subprocess

    ran = subprocess.run(["bash", str(make / "launch.sh"), "1"], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert ran.returncode == 0, ran.stderr
    assert (f"ACCELERATE launch --config_file launch/single_gpu.yaml -m train --config "
            f"{make / 'configs' / 'layer_01.yaml'}") in ran.stdout and "layer_00" not in ran.stdout
    sweep = yaml.safe_load((make / "sweep.yaml").read_text())
    assert sweep["command"][:2] == ["accelerate", "launch"] and sweep["command"][-3:] == ["-m", "train", "${args}"]
    assert sweep["parameters"]["config"]["values"] == [x["config"] for x in r["runs"]]
    # a Llama-family schedule: 5e-4 .. 7e-3
    assert main(["layer-ablation", "make", "--model", str(toy["base"]), "--dataset", "d", "--schedule", "llama",
                 "--out", str(tmp_path / "llama"), "--num-layers", "32"]) == 0
    lrs = [x["learning_rate"] for x in read(tmp_path / "llama")["runs"]]
    assert lrs[0] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(7e-3) and lrs == sorted(lrs)

    # fake finished runs: layer 0 via the latest marker, layer 1 via the highest checkpoint-N, layer 2 missing;
    # each checkpoint completed by its manifest, as training completes them
    from train import checkpointing as ckpt_io

    for src, dst in [(cks[0], runs / "layer_00" / "checkpoint-7"), (cks[2], runs / "layer_01" / "checkpoint-3"),
                     (cks[1], runs / "layer_01" / "checkpoint-9")]:  # checkpoint-3: older, wrong layer: not picked
        ckpt_io.write_manifest(Path(shutil.copytree(src, dst)))
    (runs / "layer_00" / "latest").write_text(json.dumps({"checkpoint": "checkpoint-7"}))
    out = tmp_path / "collect"
    assert main(["layer-ablation", "collect", "--runs", str(make), "--all-layers", str(cks["all"]), "--out", str(out),
                 "--benchmarks", f"file:{toy['bench']}", "--template", str(toy["template"]), "--max-new-tokens", "14",
                 "--temperature", "1.0", "--num-samples", "2", "--no-progress"]) == 0
    c = read(out)
    rows = {x["layer"]: x for x in c["runs"]}
    assert rows[1]["checkpoint"].endswith("checkpoint-9") and rows[2]["checkpoint"] is None and c["missing"] == [2]
    assert rows[0]["accuracy"]["T=0"] == evaluate(toy, {0: toy["keys"][0]}).accuracy
    assert rows[1]["accuracy"]["T=0"] == evaluate(toy, {1: toy["keys"][1]}).accuracy
    assert c["base"]["T=0"] == evaluate(toy).accuracy
    assert c["all_layers"]["T=0"] == evaluate(toy, toy["keys"]).accuracy
    assert 0 <= rows[0]["accuracy"]["T=1"] <= 1 and c["temperatures"] == [0.0, 1.0]
    assert rows[0]["detail"]["T=1"][next(iter(rows[0]["detail"]["T=1"]))]["num_samples"] == 2


def test_usage_errors_exit_2_before_loading(tiny_checkpoint, tmp_path, capsys):
    cases = [
        (["persistence", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--benchmarks",
          "procedural:arithmetic:2"], "no such directory"),
        (["persistence", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")], "--benchmarks"),
        (["logit-lens", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--benchmarks",
          "nonsense"], "unknown benchmark"),
        (["compose", "--checkpoint", str(tiny_checkpoint), "--singles", str(tmp_path), "--out", str(tmp_path / "o"),
          "--benchmarks", "procedural:arithmetic:2"], "not a steering checkpoint"),
        (["layer-ablation", "collect", "--runs", str(tmp_path), "--out", str(tmp_path / "o"), "--benchmarks",
          "procedural:arithmetic:2"], "runs.json"),
        (["layer-ablation", "make", "--model", "x", "--dataset", "d", "--num-layers", "4", "--lr-anchors", "0.2:1",
          "--out", str(tmp_path / "o")], "include 0 and 1"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv


@pytest.mark.parametrize("command", ["logit-lens", "persistence", "first-token", "unembed-similarity"])
@pytest.mark.parametrize("kind, message", [("wrong hidden size", "width [48]"), ("nan", "NaN or Inf")])
def test_a_corrupt_checkpoint_is_refused_before_the_base_loads_or_out_is_made(command, kind, message, tiny_checkpoint,
                                                                                tmp_path, capsys, weight_loads):
    """Issue 25: these commands refused a corrupt checkpoint only after the base loaded, leaving an empty --out."""
    out = tmp_path / "out"
    code = main([command, "--checkpoint", str(corrupt_checkpoint(kind, tiny_checkpoint, tmp_path)), "--out", str(out),
                 "--benchmarks", "procedural:arithmetic:2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and weight_loads == []

