"""``python -m analysis export`` and the control-vector GGUF files (steering/gguf_vectors.py): what is written, the
layer numbering docs/export.md states, shapes, the merged Llama directory, init_from from a GGUF file, and (where
llama-cpp-python is installed) llama.cpp's own logits with and without the exported vector."""

from __future__ import annotations

import ctypes
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import spy_on_weight_loaders
from steering import gguf_vectors as gv
from steering import vectors as sv
from steering.tiny import build_char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS = 32, 3
TOKENS = [5, 17, 42, 3, 60, 8, 11, 29]


def run(argv, capsys):
    from analysis.__main__ import main

    rc = main(["export", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A tiny random-weight Llama + char tokenizer saved like a Hub model."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", seed=3)
    model.save_pretrained(out)
    build_char_tokenizer().save_pretrained(out)
    return out


def distinct_vectors(layers, seed=0):
    """Random vectors whose layer is readable from their values: layer l's has mean l + 1."""
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(HIDDEN, generator=g) * 0.5 + (l + 1) for l in layers}


def make_checkpoint(path, base_dir, vectors, layers=None):
    base = sv.load_base_model(str(base_dir), dtype="float32")
    model = sv.attach_steering(base, layers=layers if layers is not None else sorted(vectors))
    sv.set_vectors(model, vectors)
    return sv.save_checkpoint(model, path, base_model=str(base_dir), step=1)


@pytest.fixture(scope="module")
def llama_ckpt(llama_base, tmp_path_factory):
    """Vectors on layers 1 and 2 (llama.cpp can express them all) and a zero one on layer 0."""
    vecs = {**distinct_vectors([1, 2]), 0: torch.zeros(HIDDEN)}
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "checkpoint-1", llama_base, vecs)


@pytest.fixture(scope="module")
def llama_ckpt_layer0(llama_base, tmp_path_factory):
    """A nonzero vector on every layer, layer 0 included."""
    return make_checkpoint(tmp_path_factory.mktemp("ck0") / "checkpoint-1", llama_base, distinct_vectors([0, 1, 2]))


def read_raw(path):
    """The file as gguf's own reader sees it: {key: value}, {name: (type, shape, values)}."""
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        part = f.parts[f.data[0]]
        fields[name] = bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else part[0].item()
    tensors = {t.name: (t.tensor_type, [int(s) for s in t.shape], torch.from_numpy(t.data.copy())) for t in r.tensors}
    return fields, tensors


# --------------------------------------------------------------------------------------------------------------------
# GGUF: what is written


@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_gguf_holds_exactly_the_scaled_vectors(llama_ckpt, llama_base, tmp_path, capsys, scale):
    import gguf

    out = tmp_path / "v.gguf"
    rc, stdout, err = run(["--checkpoint", llama_ckpt, "--to", "gguf", "--out", out, "--scale", scale], capsys)
    assert rc == 0, err
    assert "direction.1, direction.2" in stdout and "--control-vector" in stdout
    fields, tensors = read_raw(out)
    assert fields == {"general.architecture": "controlvector", "controlvector.model_hint": "llama",
                      "controlvector.layer_count": 2, "controlvector.base_model": str(llama_base),
                      "controlvector.scale": scale}
    # Layer 0's vector is zero, so it is left out (llama.cpp rejects a file holding direction.0).
    assert sorted(tensors) == ["direction.1", "direction.2"]
    want = sv.load_vectors(llama_ckpt)
    for layer in (1, 2):
        dtype, shape, values = tensors[f"direction.{layer}"]
        assert dtype == gguf.GGMLQuantizationType.F32 and shape == [HIDDEN] and values.dtype == torch.float32
        assert torch.equal(values, want[layer] * scale)  # bit for bit: one fp32 multiplication


def test_layer_numbering_is_the_documented_one(llama_ckpt_layer0, tmp_path, capsys):
    """docs/export.md: direction.N holds layer N (0-based); layer 0 cannot be written unless dropped explicitly."""
    doc = (ROOT / "docs" / "export.md").read_text()
    assert "`direction.N` holds layer `N`" in doc
    assert [gv.tensor_name(l) for l in range(3)] == ["direction.0", "direction.1", "direction.2"]

    rc, _, err = run(["--checkpoint", llama_ckpt_layer0, "--to", "gguf", "--out", tmp_path / "a.gguf"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "layer 0" in err and "--drop-layer-0" in err
    assert not (tmp_path / "a.gguf").exists()

    rc, stdout, err = run(["--checkpoint", llama_ckpt_layer0, "--to", "gguf", "--out", tmp_path / "b.gguf",
                           "--drop-layer-0"], capsys)
    assert rc == 0, err
    assert "dropped" in stdout
    _, tensors = read_raw(tmp_path / "b.gguf")
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for n in (1, 2):  # layer l's vector has mean l + 1: direction.N is layer N, not N - 1 or N + 1
        assert abs(float(tensors[f"direction.{n}"][2].mean()) - (n + 1)) < 0.5


def test_direction_n_added_to_layer_n_output_is_the_steered_model(llama_ckpt, llama_base, tmp_path, capsys):
    """The numbering's meaning (llama.cpp's build_cvec / repeng's ControlModule): direction.N added to the output of
    model.layers[N] gives this project's steered logits."""
    out = tmp_path / "v.gguf"
    assert run(["--checkpoint", llama_ckpt, "--to", "gguf", "--out", out], capsys)[0] == 0
    cv = gv.read_control_vector(out)
    plain = sv.load_base_model(str(llama_base), dtype="float32")

    def add(direction):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + direction
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    handles = [plain.model.layers[n].register_forward_hook(add(d)) for n, d in cv.vectors.items()]
    x = torch.tensor([TOKENS])
    with torch.no_grad():
        by_hooks = plain(x).logits
        for h in handles:
            h.remove()
        steered = sv.load_steered_model(llama_ckpt, str(llama_base), dtype="float32")(x).logits
        unsteered = plain(x).logits
    assert (steered - unsteered).abs().max() > 1e-2
    torch.testing.assert_close(by_hooks, steered, rtol=0, atol=1e-5)


def test_round_trip_reads_back_the_exact_vectors(llama_ckpt, tmp_path, capsys):
    out = tmp_path / "v.gguf"
    assert run(["--checkpoint", llama_ckpt, "--to", "gguf", "--out", out], capsys)[0] == 0
    want = sv.load_vectors(llama_ckpt)
    cv = gv.read_control_vector(out)
    assert cv.model_hint == "llama" and cv.layer_count == 2 and cv.scale == 1.0 and cv.hidden_size == HIDDEN
    got = sv.load_vectors(out)  # the loader init_from uses
    assert sorted(got) == [1, 2]
    for layer in got:
        assert torch.equal(got[layer], want[layer]) and torch.equal(cv.vectors[layer], want[layer])


def test_a_repeng_style_file_reads_with_layer_0_and_bad_files_are_one_line_errors(tmp_path):
    import gguf
    import numpy as np

    def write(path, tensors, arch="controlvector"):
        w = gguf.GGUFWriter(str(path), arch)
        w.add_string(f"{arch}.model_hint", "llama")
        for name, a in tensors.items():
            w.add_tensor(name, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    ones = np.ones(HIDDEN, dtype=np.float32)
    got = gv.read_control_vector(write(tmp_path / "r.gguf", {"direction.0": ones, "direction.2": 2 * ones}))
    assert sorted(got.vectors) == [0, 2] and torch.equal(got.vectors[2], torch.full((HIDDEN,), 2.0))
    assert got.layer_count is None  # repeng writes it; a file without it is still a control vector
    bad = {
        "model.gguf": ({"direction.1": ones}, "llama", "architecture 'llama'"),
        "other.gguf": ({"blk.0.attn_q.weight": ones}, "controlvector", "only direction.N"),
        "f16.gguf": ({"direction.1": ones.astype(np.float16)}, "controlvector", "F16"),
        "2d.gguf": ({"direction.1": np.ones((2, HIDDEN), dtype=np.float32)}, "controlvector", "1-D"),
        "sizes.gguf": ({"direction.1": ones, "direction.2": np.ones(8, dtype=np.float32)}, "controlvector",
                       "different sizes [8, 32]"),
        "nan.gguf": ({"direction.1": np.full(HIDDEN, np.nan, dtype=np.float32)}, "controlvector", "NaN"),
    }
    for name, (tensors, arch, needle) in bad.items():
        with pytest.raises(gv.ControlVectorError, match=re.escape(needle)) as e:
            gv.read_control_vector(write(tmp_path / name, tensors, arch))
        assert "\n" not in str(e.value)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(sv.CheckpointError, match="not a readable GGUF"):
        sv.load_vectors(tmp_path / "junk.gguf")


# --------------------------------------------------------------------------------------------------------------------
# init_from: a GGUF file seeds training, its shape checked against the base before any weights load


def train_config(tmp_path, base, init_from):
    import yaml

    from train.config import parse_config

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(model_name_or_path=str(base), build_demo_base=False, procedural_size=50, val_size=4, val_steps=0,
               output_dir=str(tmp_path / "run"), plot_curves=False, init_from=str(init_from), report_to="none")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return parse_config(["--config", str(path)])


def test_init_from_a_gguf_file_loads_the_exact_vectors(llama_ckpt, llama_base, tmp_path, capsys):
    from train.__main__ import build_model, prepare_inputs

    out = tmp_path / "v.gguf"
    assert run(["--checkpoint", llama_ckpt, "--to", "gguf", "--out", out], capsys)[0] == 0
    config = train_config(tmp_path, llama_base, out)
    inputs = prepare_inputs(config)
    want = sv.load_vectors(llama_ckpt)
    assert sorted(inputs.init_vectors) == [1, 2]
    model = build_model(config, inputs)
    got = sv.get_vectors(model)
    assert sorted(got) == [0, 1, 2] and torch.equal(got[0], torch.zeros(HIDDEN))
    for layer in (1, 2):
        assert torch.equal(inputs.init_vectors[layer], want[layer]) and torch.equal(got[layer], want[layer])


@pytest.mark.parametrize("case", ["hidden size", "layer count", "not a gguf"])
def test_init_from_a_gguf_of_the_wrong_shape_is_one_line_naming_both(case, llama_base, tmp_path, capsys,
                                                                      monkeypatch):
    from train.__main__ import cli

    loads = spy_on_weight_loaders(monkeypatch)
    path = tmp_path / "v.gguf"
    if case == "hidden size":
        gv.write_control_vector(path, {1: torch.ones(48), 2: torch.ones(48)}, model_hint="llama")
        needles = ["init_from", "hidden size [48]", "3 layers x hidden size 32"]
    elif case == "layer count":
        gv.write_control_vector(path, {1: torch.ones(HIDDEN), 5: torch.ones(HIDDEN)}, model_hint="llama")
        needles = ["init_from", "layers [1, 5]", "3 layers x hidden size 32"]
    else:
        path = tmp_path / "v.bin"
        path.write_bytes(b"x")
        needles = ["init_from", "neither a directory nor a .gguf file"]
    (tmp_path / "c.yaml").write_text(
        f"model_name_or_path: {llama_base}\ndataset: procedural:arithmetic\noutput_dir: {tmp_path}/o\n"
        f"use_cpu: true\nbf16: false\nprocedural_size: 50\nval_size: 4\nreport_to: none\ninit_from: {path}\n")
    assert cli(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert loads == []


# --------------------------------------------------------------------------------------------------------------------
# merged: a plain Llama directory whose logits are the steered model's


def test_merged_llama_gives_the_steered_logits_with_plain_transformers(llama_ckpt_layer0, llama_base, tmp_path,
                                                                       capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    rc, stdout, err = run(["--checkpoint", llama_ckpt_layer0, "--to", "merged", "--out", out, "--scale", 1.5],
                          capsys)
    assert rc == 0, err
    assert "from_pretrained" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] is True and config["model_type"] == "llama"
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").read_bytes() == (llama_base / "tokenizer.json").read_bytes()
    record = json.loads((out / "steering_export.json").read_text())
    assert record["scale"] == 1.5 and record["layers"] == [0, 1, 2] and record["dtype"] == "float32"

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no project code
    want = sv.load_vectors(llama_ckpt_layer0)
    for layer in range(LAYERS):
        mlp = merged.model.layers[layer].mlp
        assert torch.equal(mlp.down_proj.bias, want[layer] * 1.5)
        assert not mlp.gate_proj.bias.any() and not mlp.up_proj.bias.any()
    steered = sv.load_steered_model(llama_ckpt_layer0, str(llama_base), dtype="float32")
    x = torch.tensor([TOKENS, TOKENS[::-1]])
    with torch.no_grad(), sv.steering_scale(steered, 1.5):
        a, b = merged(x).logits, steered(x).logits
    diff = float((a - b).abs().max())
    assert diff <= 1e-6, diff  # measured 2026-12-01: 0.0 (bit-identical)
    assert AutoTokenizer.from_pretrained(out)("12+3")["input_ids"] == build_char_tokenizer()("12+3")["input_ids"]


def test_merged_refuses_qwen2_saying_why_and_what_instead(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    loads = spy_on_weight_loaders(monkeypatch)
    rc, _, err = run(["--checkpoint", tiny_checkpoint, "--to", "merged", "--out", tmp_path / "m"], capsys)
    assert rc == 2 and err.count("\n") == 1
    for needle in ("Qwen2", "mlp_bias", "--to peft", "PeftModel.from_pretrained", "docs/vllm.md"):
        assert needle in err, (needle, err)
    assert not (tmp_path / "m").exists() and loads == []


def test_peft_is_the_native_format_copied(llama_ckpt, llama_base, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "adapter"
    rc, stdout, err = run(["--checkpoint", llama_ckpt, "--to", "peft", "--out", out], capsys)
    assert rc == 0, err
    assert "already is a PEFT BEFT adapter" in stdout
    assert sorted(p.name for p in out.iterdir()) == [sv.ADAPTER_CONFIG_FILE, sv.ADAPTER_WEIGHTS_FILE, sv.META_FILE]
    model = PeftModel.from_pretrained(sv.load_base_model(str(llama_base), dtype="float32"), str(out))
    got, want = sv.get_vectors(model), sv.load_vectors(llama_ckpt)
    assert all(torch.equal(got[l], want[l]) for l in want)


@pytest.mark.parametrize("base, reason", [
    ("/cluster/models/gone-base", "no such directory (and not a Hub id like Org/Name)"),
    ("some-org/not-in-the-offline-cache", None),  # a Hub id offline (the tests run with HF_HUB_OFFLINE=1)
])
def test_peft_copies_a_checkpoint_whose_recorded_base_is_unreadable_with_one_warning(
        base, reason, llama_ckpt, tmp_path, capsys, monkeypatch):
    """The PEFT export is a file copy: a recorded base this machine cannot read (the training cluster's path, a Hub id
    offline) is one warning line, and the adapter is copied; only a readable base that does not fit refuses."""
    ck = shutil.copytree(llama_ckpt, tmp_path / "checkpoint-1")
    meta = json.loads((ck / sv.META_FILE).read_text())
    (ck / sv.META_FILE).write_text(json.dumps({**meta, "base_model": base}))
    loads = spy_on_weight_loaders(monkeypatch)
    out = tmp_path / "adapter"
    rc, stdout, err = run(["--checkpoint", ck, "--to", "peft", "--out", out], capsys)
    assert rc == 0, err
    head = f"export: cannot read the recorded base {base}'s config ("
    tail = "); the vectors' fit to it was not checked\n"
    assert err.startswith(head) and err.endswith(tail) and err.count("\n") == 1, err
    if reason is not None:
        assert err == head + reason + tail, err
    assert "already is a PEFT BEFT adapter" in stdout and loads == []
    assert all((out / name).read_bytes() == (ck / name).read_bytes()
               for name in (sv.ADAPTER_CONFIG_FILE, sv.ADAPTER_WEIGHTS_FILE, sv.META_FILE))


def test_peft_refuses_a_readable_recorded_base_the_vectors_do_not_fit(llama_ckpt, tmp_path, capsys, monkeypatch):
    from steering.tiny import tiny_config

    wide = tmp_path / "wide"
    tiny_config("llama", hidden_size=48, intermediate_size=96).save_pretrained(wide)
    ck = shutil.copytree(llama_ckpt, tmp_path / "checkpoint-1")
    meta = json.loads((ck / sv.META_FILE).read_text())
    (ck / sv.META_FILE).write_text(json.dumps({**meta, "base_model": str(wide)}))
    loads = spy_on_weight_loaders(monkeypatch)
    rc, _, err = run(["--checkpoint", ck, "--to", "peft", "--out", tmp_path / "adapter"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "hidden size 48" in err, err
    assert not (tmp_path / "adapter").exists() and loads == []


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any model loads


BAD = {
    "missing checkpoint": (lambda t, c: ["--checkpoint", t / "nope", "--to", "gguf", "--out", t / "v.gguf"],
                           "no such directory"),
    "not a checkpoint": (lambda t, c: ["--checkpoint", t, "--to", "gguf", "--out", t / "v.gguf"],
                         "not a complete steering checkpoint"),
    "gguf name": (lambda t, c: ["--checkpoint", c, "--to", "gguf", "--out", t / "v.bin"], "must end in .gguf"),
    "gguf is a dir": (lambda t, c: (t / "d.gguf").mkdir() or ["--checkpoint", c, "--to", "gguf", "--out",
                                                             t / "d.gguf"], "is a directory"),
    "gguf file exists": (lambda t, c: (t / "old.gguf").write_bytes(b"an earlier export") and
                         ["--checkpoint", c, "--to", "gguf", "--out", t / "old.gguf"], "exists; remove it"),
    "nan scale": (lambda t, c: ["--checkpoint", c, "--to", "gguf", "--out", t / "v.gguf", "--scale", "nan"],
                  "not a finite number"),
    "overflowing scale": (lambda t, c: ["--checkpoint", c, "--to", "merged", "--out", t / "m", "--scale", "1e39"],
                          "overflows float32"),
    "dtype for gguf": (lambda t, c: ["--checkpoint", c, "--to", "gguf", "--out", t / "v.gguf", "--dtype",
                                     "bfloat16"], "--dtype applies to --to merged only"),
    "drop layer 0 for merged": (lambda t, c: ["--checkpoint", c, "--to", "merged", "--out", t / "m",
                                              "--drop-layer-0"], "--drop-layer-0 applies to --to gguf only"),
    "merged into a full dir": (lambda t, c: (t / "m").mkdir() or (t / "m" / "x").write_text("x") and
                               ["--checkpoint", c, "--to", "merged", "--out", t / "m"], "not empty"),
    "merged onto a missing base": (lambda t, c: ["--checkpoint", c, "--to", "merged", "--out", t / "m", "--model",
                                                 t / "nobase"], "no such directory"),
    "gguf against a base of another shape": (lambda t, c: ["--checkpoint", c, "--to", "gguf", "--out",
                                                           t / "v.gguf", "--model", t / "wide"],
                                             "but the model has 3 layers x hidden size 48"),
    "peft with a scale": (lambda t, c: ["--checkpoint", c, "--to", "peft", "--out", t / "p", "--scale", "2"],
                          "--scale applies to gguf and merged"),
    "token-scaling checkpoint": (lambda t, c: ["--checkpoint", _with_gates(t, c), "--to", "gguf", "--out",
                                               t / "v.gguf"], "token-scaling checkpoint"),
}


def _with_gates(tmp: Path, ckpt: Path) -> Path:
    from steering import token_scaling as ts

    copy = tmp / "gated"
    shutil.copytree(ckpt, copy)
    (copy / ts.GATE_FILE).write_bytes(b"")  # its presence is what marks a token-scaling checkpoint
    return copy


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_before_any_model_loads(case, llama_ckpt, tmp_path, capsys, monkeypatch):
    if case == "gguf against a base of another shape":
        wide = tmp_path / "wide"
        wide.mkdir()
        from steering.tiny import tiny_config

        tiny_config("llama", hidden_size=48, intermediate_size=96).save_pretrained(wide)

    loads = spy_on_weight_loaders(monkeypatch)
    argv, needle = BAD[case]
    rc, stdout, err = run(argv(tmp_path, llama_ckpt), capsys)
    assert rc == 2, (stdout, err)
    assert err.startswith("python -m analysis export: error: ") and err.count("\n") == 1, err
    assert needle in err, (needle, err)
    if case == "gguf file exists":  # refused, and the earlier file is left as it was
        assert (tmp_path / "old.gguf").read_bytes() == b"an earlier export"
    else:
        assert not list(tmp_path.glob("*.gguf")) or case == "gguf is a dir"
    assert loads == []


# --------------------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python, built from source; skipped where it is not installed)

# fp32 weights, an F32 KV cache and flash attention off (with it on, the unsteered difference was 1.2e-4): what is
# left is float summation order. Measured 2026-12-01, llama-cpp-python 0.3.36 on CPU: max |diff| 7.5e-8 unsteered,
# 1.2e-7 steered.
LLAMA_CPP_ATOL = 1e-5


def _permute(w, n_head: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k rows into llama.cpp's interleaved RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path) -> Path:
    """A tiny HF Llama as an F32 llama.cpp model file, as llama.cpp's convert_hf_to_gguf.py writes it (tensor names
    from gguf's own map, q/k permuted), with no tokenizer ("none": token ids go in directly)."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("none")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, c.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name, name
        w.add_tensor(gguf_name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_cvec_buffer(path: Path):
    """What llama.cpp's common_control_vector_load_one (common/common.cpp) makes of the file, read with gguf's reader
    alone: direction.N at offset n_embd * (N - 1) of one buffer (direction.0 is rejected). The C++ loader is not in
    llama.cpp's C API, so it is mirrored here; llama_set_adapter_cvec then takes the buffer as llama.cpp does."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    dirs = {int(t.name.split(".", 1)[1]): np.array(t.data, dtype=np.float32) for t in r.tensors}
    assert min(dirs) >= 1
    n_embd = len(next(iter(dirs.values())))
    buf = np.zeros(n_embd * max(dirs), dtype=np.float32)
    for n, d in dirs.items():
        buf[n_embd * (n - 1): n_embd * n] += d
    return buf, n_embd


def llama_cpp_logits(L, model_path: Path, tokens, n_vocab: int, cvec=None):
    import numpy as np

    model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
    assert model, "llama.cpp could not load the model file"
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.n_threads = cp.n_threads_batch = 1
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    assert ctx
    try:
        if cvec is not None:
            buf, n_embd = cvec
            # il_start 1, il_end n_layer: common_init_from_params' defaults for --control-vector
            rc = L.llama_set_adapter_cvec(ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size, n_embd,
                                          1, L.llama_model_n_layer(model))
            assert rc == 0
        batch = L.llama_batch_init(len(tokens), 0, 1)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        assert L.llama_decode(ctx, batch) == 0
        out = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                        for i in range(len(tokens))])
        L.llama_batch_free(batch)
        return torch.from_numpy(out).double()
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)


@pytest.mark.llama_cpp
def test_llama_cpp_logits_match_ours_with_and_without_the_exported_vector(llama_ckpt, llama_base, tmp_path, capsys):
    L = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def quiet(level, text, user_data):  # llama.cpp logs every tensor it loads; keep the test output readable
        pass

    L.llama_log_set(quiet, ctypes.c_void_p())
    L.llama_backend_init()
    model_file = write_llama_gguf(sv.load_base_model(str(llama_base), dtype="float32"), tmp_path / "model-f32.gguf")
    steered = sv.load_steered_model(llama_ckpt, str(llama_base), dtype="float32")
    cv_file = tmp_path / "v.gguf"
    assert run(["--checkpoint", llama_ckpt, "--to", "gguf", "--out", cv_file], capsys)[0] == 0
    x = torch.tensor([TOKENS])
    with torch.no_grad():
        ours_steered = steered(x).logits[0].double()
        with sv.steering_disabled(steered):
            ours_base = steered(x).logits[0].double()
        # The same vectors one layer off (direction.N on layer N - 1): what a wrong numbering would give.
        vecs = sv.load_vectors(llama_ckpt)
        shifted = {l: torch.zeros(HIDDEN) for l in vecs}
        shifted.update({l - 1: vecs[l] for l in (1, 2)})
        sv.set_vectors(steered, shifted)
        ours_shifted = steered(x).logits[0].double()
    n_vocab = steered.config.vocab_size
    theirs_base = llama_cpp_logits(L, model_file, TOKENS, n_vocab)
    theirs_steered = llama_cpp_logits(L, model_file, TOKENS, n_vocab, cvec=llama_cpp_cvec_buffer(cv_file))
    base_diff = float((theirs_base - ours_base).abs().max())
    steered_diff = float((theirs_steered - ours_steered).abs().max())
    print(f"llama.cpp vs ours: unsteered max |diff| {base_diff:.3g}, steered {steered_diff:.3g}")
    assert base_diff <= LLAMA_CPP_ATOL and steered_diff <= LLAMA_CPP_ATOL, (base_diff, steered_diff)
    assert float((ours_steered - ours_base).abs().max()) > 100 * LLAMA_CPP_ATOL  # the vector matters
    assert float((theirs_steered - ours_shifted).abs().max()) > 100 * LLAMA_CPP_ATOL  # and its layer does
    assert math.isfinite(steered_diff)
