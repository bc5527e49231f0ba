"""DiffMean behaviour vectors: positions, clipping, streaming means, rescaling, the checkpoint, the CLI, similarity."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from analysis.__main__ import main as analysis_main
from steering import diffmean as dm
from steering import readout
from steering import vectors as sv
from steering.tiny import build_char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "traces.jsonl"

# The char tokenizer makes one token per character, so character i of a trace is token prefix + i.
TRACES = [
    {"prompt": "P:", "text": "abcdefghij",
     "spans": [{"start": 0, "end": 3, "label": "A"},     # at the very start of the trace
               {"start": 5, "end": 8, "label": "B"},
               {"start": 8, "end": 10, "label": "A"}]},  # at the very end
    {"text": "klmnopq",
     "spans": [{"start": 1, "end": 4, "label": "B"},
               {"start": 6, "end": 7, "label": "A"},
               {"start": 2, "end": 4, "label": "C"}]},
]
# Hand-worked positive positions in sequence coordinates (trace 0 has a 2-token prompt, trace 1 none).
# shift: [t0-1, t1-1) clipped to the trace's own tokens ([2, 12) and [0, 7)).
SHIFT = [[("A", [2, 3]), ("B", [6, 7, 8]), ("A", [9, 10])],            # A: position 1 (the prompt) is dropped
         [("B", [0, 1, 2]), ("A", [5]), ("C", [1, 2])]]
# window K=3, W=2: [t0-3, t0-1)
WINDOW = [[("B", [4, 5]), ("A", [7, 8])],                               # A at the start: [-1, 1) -> nothing, skipped
          [("A", [3, 4]), ("C", [0])]]                                  # B: [-2, 0) skipped; C: [-1, 1) -> [0]
NEG = [list(range(2, 12)), list(range(0, 7))]


def hidden_states(model, tok, trace):
    ids = tok(trace.get("prompt", ""))["input_ids"] + tok(trace["text"], add_special_tokens=False)["input_ids"]
    # plain forward hooks on the decoder layers (independent of steering.hooks): the output of each layer
    outs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
               for layer in model.model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return torch.stack(outs).double()  # (layers, seq, d)


def hand_means(model, tok, expected, weighting):
    acts = [hidden_states(model, tok, t) for t in TRACES]
    neg = torch.cat([a[:, NEG[i]] for i, a in enumerate(acts)], dim=1).mean(1)
    pos = {}
    for i, spans in enumerate(expected):
        for label, positions in spans:
            pos.setdefault(label, []).append(acts[i][:, positions])
    if weighting == "span":
        pos = {k: torch.stack([x.mean(1) for x in v]).mean(0) for k, v in pos.items()}
    else:
        pos = {k: torch.cat(v, dim=1).mean(1) for k, v in pos.items()}
    return pos, neg


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model("qwen2", seed=0), build_char_tokenizer()


def test_position_spec_clipping_rules():
    shift, window = dm.PositionSpec("shift"), dm.PositionSpec("window", 12, 5)
    assert list(window.raw(20, 25)) == [8, 9, 10, 11, 12]  # offsets -12..-8
    assert shift.positions(0, 3, 0, 10) == [0, 1]            # start-1 < 0 is dropped
    assert shift.positions(5, 6, 5, 10) == []                # a one-token span at the trace start has no position
    assert window.positions(14, 15, 5, 30) == [5, 6]          # window partly before the trace keeps its inside part
    assert window.positions(3, 4, 0, 30) == []
    assert dm.PositionSpec("window", 2, 5).positions(10, 12, 0, 11) == [8, 9, 10]  # clipped at the end too
    with pytest.raises(ValueError):
        dm.PositionSpec("middle")
    assert dm.span_token_range([(0, 1), (1, 3), (3, 3), (3, 6)], 2, 4) == (1, 4)  # partial overlap; zero-width ignored
    assert dm.span_token_range([(0, 1)], 1, 2) is None


@pytest.mark.parametrize("mode,expected", [("shift", SHIFT), ("window", WINDOW)])
def test_encode_trace_positions_match_hand_worked(model_tok, mode, expected):
    _, tok = model_tok
    spec = dm.PositionSpec(mode, 3, 2)
    for trace, exp, neg in zip(TRACES, expected, NEG):
        enc = dm.encode_trace(tok, trace, spec)
        assert [(s.label, s.positions) for s in enc.spans] == exp
        assert list(enc.trace_positions) == neg
        assert enc.skipped_spans == len(trace["spans"]) - len(exp)


@pytest.mark.parametrize("weighting", ["span", "token"])
@pytest.mark.parametrize("mode,expected", [("shift", SHIFT), ("window", WINDOW)])
def test_diffmean_equals_hand_computed_means(model_tok, mode, expected, weighting):
    model, tok = model_tok
    pos, neg = hand_means(model, tok, expected, weighting)
    acc = dm.collect(model, tok, TRACES, spec=dm.PositionSpec(mode, 3, 2), weighting=weighting, batch_size=2)
    assert acc.names == [f"blocks.{l}.hook_resid_post" for l in range(3)]
    assert acc.neg_count == 17 and acc.n_traces == 2
    torch.testing.assert_close(acc.neg_mean(), neg, rtol=0, atol=1e-5)
    assert acc.labels == sorted(pos)
    for label in pos:
        torch.testing.assert_close(acc.pos_mean(label), pos[label], rtol=0, atol=1e-5)
        torch.testing.assert_close(acc.raw_vectors(label), pos[label] - neg, rtol=0, atol=1e-5)
    assert acc.skipped_spans == (0 if mode == "shift" else 2)


def test_streaming_batch_size_does_not_change_the_result(model_tok):
    model, tok = model_tok
    traces = dm.load_traces(EXAMPLES)
    one = dm.collect(model, tok, traces, batch_size=1)
    many = dm.collect(model, tok, iter(traces), batch_size=3)  # a generator is fine: one pass
    for label in one.labels:
        torch.testing.assert_close(one.vectors(label), many.vectors(label), rtol=0, atol=1e-5)
    # the state is fixed-size: running sums, not a list of activations
    assert one.neg_sum.shape == (3, 32) and all(v.shape == (3, 32) for v in one.pos_sum.values())


def test_rescaled_norm_equals_mean_activation_norm(model_tok):
    model, tok = model_tok
    acc = dm.collect(model, tok, dm.load_traces(EXAMPLES))
    neg = acc.neg_mean()
    for label in acc.labels:
        raw, u = acc.raw_vectors(label), acc.vectors(label)
        torch.testing.assert_close(u.norm(dim=-1), neg.norm(dim=-1), rtol=1e-12, atol=0)
        cos = (u * raw).sum(-1) / (u.norm(dim=-1) * raw.norm(dim=-1))
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-12)
        torch.testing.assert_close(acc.vectors(label, rescale=False), raw)
    assert torch.equal(dm.rescale_to(torch.zeros(2, 3), torch.ones(2, 3)), torch.zeros(2, 3))


def test_trace_validation_errors(tmp_path):
    with pytest.raises(dm.TraceError, match="span 0 .* inside the text"):
        dm.validate_trace({"text": "abc", "spans": [{"start": 2, "end": 9, "label": "x"}]})
    with pytest.raises(dm.TraceError, match="integer"):
        dm.validate_trace({"text": "abc", "spans": [{"start": "0", "end": 1, "label": "x"}]})
    with pytest.raises(dm.TraceError, match="'text'"):
        dm.validate_trace({"spans": []})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "spans": []}\n{not json\n')
    with pytest.raises(dm.TraceError, match="bad.jsonl:2: not valid JSON"):
        dm.load_traces(bad)


# --------------------------------------------------------------------------------------------------------------------
# The command and its checkpoint


@pytest.fixture(scope="module")
def diffmean_out(tiny_base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dm") / "out"
    rc = analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--out", str(out),
                        "--label", "backtracking", "deduction", "--batch-size", "3"])
    assert rc == 0
    return out


def test_cli_writes_checkpoints_and_means(diffmean_out, tiny_base_dir):
    res = json.loads((diffmean_out / "result.json").read_text())
    assert sorted(res["labels"]) == ["backtracking", "deduction"]
    assert res["hook"] == "blocks.{layer}.hook_resid_post" and res["layers"] == [0, 1, 2]
    assert (diffmean_out / "diffmean.png").stat().st_size > 0
    meta = sv.read_meta(diffmean_out / "backtracking")
    assert meta["base_model"] == str(tiny_base_dir) and meta["layers"] == [0, 1, 2]
    assert meta["diffmean"]["label"] == "backtracking" and meta["diffmean"]["positions"]["mode"] == "shift"
    # the saved vectors are the rescaled DiffMean of the same traces
    model = sv.load_base_model(str(tiny_base_dir), dtype="float32")
    from steering.vectors import load_tokenizer

    acc = dm.collect(model, load_tokenizer(tiny_base_dir), dm.load_traces(EXAMPLES))
    got = sv.load_vectors(diffmean_out / "backtracking")
    for l in range(3):
        torch.testing.assert_close(got[l].double(), acc.vectors("backtracking")[l], rtol=0, atol=1e-5)
    from safetensors.torch import load_file

    means = load_file(str(diffmean_out / "means.safetensors"))
    torch.testing.assert_close(means["neg_mean"].double(), acc.neg_mean(), rtol=0, atol=1e-5)


def test_checkpoint_loads_through_peft_like_load_steered_model(diffmean_out, tiny_base_dir):
    ckpt = diffmean_out / "backtracking"
    ours = sv.load_steered_model(ckpt, dtype="float32")
    peft = PeftModel.from_pretrained(sv.load_base_model(str(tiny_base_dir), dtype="float32"), str(ckpt)).eval()
    x = torch.randint(4, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x).logits, peft(x).logits
        base = sv.load_base_model(str(tiny_base_dir), dtype="float32")(x).logits
    assert torch.equal(a, b)
    assert (a - base).abs().max() > 1e-3  # the vectors do something


def test_layers_subset_and_window_mode(tiny_base_dir, tmp_path):
    out = tmp_path / "w"
    rc = analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--out", str(out),
                        "--label", "backtracking", "--layers", "1", "--positions", "window", "--window-offset", "12",
                        "--window-width", "5"])
    assert rc == 0
    meta = sv.read_meta(out / "backtracking")
    assert meta["layers"] == [1]
    assert meta["diffmean"]["positions"] == {"mode": "window", "offset": 12, "width": 5,
                                             "positions": "[t0-12, t0-12+5)"}


def test_activations_from_another_model_of_the_same_shape(tiny_base_dir, tmp_path, diffmean_out):
    other = tmp_path / "other"
    tiny_model("qwen2", seed=1).save_pretrained(other)
    build_char_tokenizer().save_pretrained(other)
    out = tmp_path / "x"
    rc = analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--activations-model",
                        str(other), "--label", "backtracking", "--out", str(out)])
    assert rc == 0
    meta = sv.read_meta(out / "backtracking")
    assert meta["base_model"] == str(tiny_base_dir) and meta["diffmean"]["activations_model"] == str(other)
    a, b = sv.load_vectors(out / "backtracking"), sv.load_vectors(diffmean_out / "backtracking")
    assert not torch.allclose(a[1], b[1])
    sv.load_steered_model(out / "backtracking", dtype="float32")  # steers the --model


def test_shape_mismatch_and_bad_input_exit_2(tiny_base_dir, tmp_path, capsys):
    wide = tmp_path / "wide"
    tiny_model("qwen2", hidden_size=48).save_pretrained(wide)
    build_char_tokenizer().save_pretrained(wide)
    rc = analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--activations-model",
                        str(wide), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "3 layers x hidden size 48" in err and "same shape" in err
    rc = analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--label", "summary",
                        "--out", str(tmp_path / "o")])
    assert rc == 2 and "labels present" in capsys.readouterr().err
    rc = analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(tiny_base_dir), "--layers", "7",
                        "--out", str(tmp_path / "o")])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc", "spans": [{"start": 0, "end": 5, "label": "x"}]}\n')
    rc = analysis_main(["diffmean", "--traces", str(bad), "--model", str(tiny_base_dir), "--out", str(tmp_path / "o")])
    assert rc == 2 and "bad.jsonl:1: span 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # every check ran before anything was written


def test_diffmean_checkpoint_seeds_a_training_run(diffmean_out, tiny_base_dir, tmp_path):
    pytest.importorskip("steering.templates")
    yaml = pytest.importorskip("yaml")
    from train.__main__ import build_trainer, parse_config

    init = diffmean_out / "backtracking"
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(model_name_or_path=str(tiny_base_dir), build_demo_base=False, procedural_size=64, val_size=4,
               val_steps=0, num_generations=2, per_device_train_batch_size=4, max_completion_length=4, max_steps=2,
               save_steps=2, output_dir=str(tmp_path / "run"), plot_curves=False, learning_rate=1e-3,
               init_from=str(init), init_scale={0: 0.0, 1: 0.5, 2: 2.0})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    trainer = build_trainer(parse_config(["--config", str(path)]))
    start = sv.get_vectors(trainer.model)
    want = sv.load_vectors(init)
    for l, scale in {0: 0.0, 1: 0.5, 2: 2.0}.items():
        torch.testing.assert_close(start[l], want[l] * scale, rtol=0, atol=1e-6)
    trainer.train()
    assert trainer.state.global_step == 2
    end = sv.get_vectors(trainer.model)
    for l in range(3):
        assert torch.isfinite(end[l]).all()
        # two Adam steps of lr 1e-3 move each coordinate by at most ~2e-3
        assert (end[l] - start[l]).abs().max() < 5e-3


# --------------------------------------------------------------------------------------------------------------------
# similarity


def test_similarity_matrix_and_heatmap(diffmean_out, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "sim"
    rc = analysis_main(["similarity", "--vectors", str(diffmean_out), f"rl={tiny_checkpoint}", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["names"] == ["backtracking", "deduction", "rl"] and res["layers"] == [0, 1, 2]
    vecs = {n: sv.load_vectors(p) for n, p in res["paths"].items()}
    for l in range(3):
        mat = torch.tensor(res["per_layer"][str(l)])
        assert torch.allclose(mat.diagonal(), torch.ones(3), atol=1e-6) and torch.allclose(mat, mat.T)
        want = readout.cosine(vecs["backtracking"][l], vecs["rl"][l])
        assert abs(mat[0, 2].item() - want) < 1e-6
    flat = torch.cat([vecs["deduction"][l] for l in range(3)]), torch.cat([vecs["rl"][l] for l in range(3)])
    assert abs(res["concatenated"][1][2] - readout.cosine(*flat)) < 1e-6
    assert (out / "similarity.png").stat().st_size > 0
    rc = analysis_main(["similarity", "--vectors", str(diffmean_out), "--layer", "1", "--out", str(tmp_path / "s1")])
    assert rc == 0 and json.loads((tmp_path / "s1" / "result.json").read_text())["layer"] == 1
    rc = analysis_main(["similarity", "--vectors", str(diffmean_out), "--layer", "9", "--out", str(tmp_path / "s2")])
    assert rc == 2 and "shared layers" in capsys.readouterr().err
    rc = analysis_main(["similarity", "--vectors", str(tiny_checkpoint), "--out", str(tmp_path / "s3")])
    assert rc == 2 and "at least two" in capsys.readouterr().err


def test_generate_mode_with_a_fake_chat_judge(tiny_base_dir, tmp_path, monkeypatch):
    """--generate: the model answers held-out tasks, the (faked) chat endpoint labels them, the vectors follow."""
    from steering import annotate

    seen = []

    def fake_transport(url, payload, headers, timeout):
        body = payload["messages"][-1]["content"]
        text = body.split("The reasoning chain to analyze:\n", 1)[1].rsplit("\n\nAnswer only", 1)[0]
        seen.append((url, text))
        half = max(2, len(text) // 2)
        return {"choices": [{"message": {"content": f'["backtracking"]{text[half:]}["end-section"]'}}]}

    monkeypatch.setattr(annotate, "urllib_transport", fake_transport)
    out = tmp_path / "gen"
    rc = analysis_main(["diffmean", "--generate", "3", "--model", str(tiny_base_dir), "--task", "arithmetic",
                        "--max-new-tokens", "24", "--annotator", "chat", "--annotator-url", "http://judge.invalid/v1",
                        "--out", str(out)])
    assert rc == 0
    traces = dm.load_traces(out / "traces.jsonl")
    assert len(traces) == 3 == len(seen) and seen[0][0] == "http://judge.invalid/v1/chat/completions"
    for t, (_, text) in zip(traces, seen):
        assert t["text"] == text and t["prompt"].endswith("<|im_start|>assistant\n") and t["question"] in t["prompt"]
        sp = t["spans"][0]
        assert sp["label"] == "backtracking"
        assert t["text"][sp["start"]:sp["end"]] == text[max(2, len(text) // 2):].strip()
    assert sv.read_meta(out / "backtracking")["diffmean"]["spans"] >= 1
