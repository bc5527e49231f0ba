"""Issue 25: every analysis command checks all its inputs before any weights load and before --out is made.

Each case runs ``python -m analysis`` in-process with bad input and asserts: exit code 2, exactly one line on stderr
(``python -m analysis <command>: error: ...``, with the expected words), no model weights loaded (the loaders are
spies that raise), and --out either never made or, where it existed, byte-identical.
"""

import json
import shutil

import pytest
import torch

from analysis.__main__ import main
from conftest import WeightsLoaded, corrupt_checkpoint
from steering import diffmean as dm
from steering import vectors as sv

BENCH = ["--benchmarks", "procedural:arithmetic:2", "--no-progress"]


@pytest.fixture(scope="module")
def world(tiny_base_dir, tiny_checkpoint, tmp_path_factory):
    """Inputs for the cases: a one-layer checkpoint (layer 0 only), a checkpoint whose base is missing, corrupt
    checkpoints, traces, a layer-ablation runs.json, and folders that are not any kind of table row."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("early")
    config = AutoConfig.from_pretrained(str(tiny_base_dir))
    one = dm.save_vectors_checkpoint({0: torch.ones(config.hidden_size)}, root / "one-layer", config,
                                     base_model=str(tiny_base_dir), extra={"diffmean": {"label": "x"}})
    no_base = root / "no-base"
    shutil.copytree(tiny_checkpoint, no_base)
    meta = json.loads((no_base / sv.META_FILE).read_text())
    meta["base_model"] = str(root / "gone-base")
    (no_base / sv.META_FILE).write_text(json.dumps(meta))
    traces = root / "traces.jsonl"
    traces.write_text(json.dumps({"prompt": "Q: ", "text": "a b c d e f", "spans": [
        {"start": 2, "end": 5, "label": "x"}]}) + "\n")
    runs = root / "runs.json"
    runs.write_text(json.dumps({"model": str(tiny_base_dir), "dataset": "procedural:arithmetic", "runs": []}))
    no_meta = root / "beft-without-steering-json"  # a steering checkpoint that lost its steering.json
    shutil.copytree(tiny_checkpoint, no_meta)
    (no_meta / sv.META_FILE).unlink()
    empty = root / "empty"
    empty.mkdir()
    gate_wide = _with_gates(tiny_checkpoint, root / "gate-wide", {0: 48})  # the base's hidden size is 32
    gate_unsteered = _with_gates(one, root / "gate-unsteered", {1: config.hidden_size})  # it steers layer 0 only
    return {"gate_wide": str(gate_wide), "gate_unsteered": str(gate_unsteered),"base": str(tiny_base_dir), "ck": str(tiny_checkpoint), "one": str(one), "no_base": str(no_base),
            "traces": str(traces), "runs": str(runs), "no_meta": str(no_meta), "empty": str(empty),
            "hidden": str(corrupt_checkpoint("wrong hidden size", tiny_checkpoint, root)),
            "truncated": str(corrupt_checkpoint("truncated", tiny_checkpoint, root)),
            "nan": str(corrupt_checkpoint("nan", tiny_checkpoint, root))}


def _with_gates(ckpt, dest, widths: dict[int, int]):
    """A copy of steering checkpoint ``ckpt`` with token-scaling gates of the given widths on the given layers."""
    from safetensors.torch import save_file

    from steering import token_scaling as ts

    shutil.copytree(ckpt, dest)
    save_file({f"layers.{layer}.{ts.GATE_MODULE}.{name}": torch.zeros(width if name == "weight" else 1)
               for layer, width in widths.items() for name in ("weight", "bias")}, str(dest / ts.GATE_FILE))
    return dest


def lora_with_manifest(tmp_path, base: str, *, tamper: bool):
    """A LoRA training checkpoint (adapter_config.json, weights, training state, checksums.json), its adapter weights
    tampered after its manifest was written when ``tamper``."""
    from safetensors.torch import save_file

    d = tmp_path / "lora-checkpoint-2"
    d.mkdir()
    (d / sv.ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base,
                                                        "r": 1, "target_modules": ["down_proj"]}))
    save_file({"x": torch.zeros(2)}, str(d / "adapter_model.safetensors"))
    with_training_state(d)
    if tamper:
        save_file({"x": torch.ones(2)}, str(d / "adapter_model.safetensors"))
    return d


def with_training_state(d):
    """``d`` made a training checkpoint: the training state transformers and DeepSpeed write beside the model
    (optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, a global_step*/ shard), then checksums.json."""
    from train import checkpointing as ckpt_io

    torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
    torch.save({"last_epoch": 2}, d / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, d / "rng_state.pth")
    (d / ckpt_io.TRAINER_STATE).write_text('{"global_step": 2}')
    (d / "global_step2").mkdir()
    torch.save({"state": {}}, d / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ckpt_io.write_manifest(d)
    return d


# (command line with {names} of the world's inputs, words the one error line holds)
CASES = {
    # --layers out of range or without a vector: refused only after the base loaded before
    "logit-lens --layers out of range": (
        "logit-lens --checkpoint {ck} --layers 7", "--layers 7: layers [7] out of range"),
    "logit-lens --layers without a vector": (
        "logit-lens --checkpoint {one} --layers 1", "the checkpoint has no vector at layers [1]"),
    "persistence --layers out of range": (
        "persistence --checkpoint {ck} --layers 0,9", "--layers 0,9: layers [9] out of range"),
    "persistence --layers not a list": ("persistence --checkpoint {ck} --layers x", "expected layer indices"),
    "first-token --layers out of range": ("first-token --checkpoint {ck} --layers 5", "layers [5] out of range"),
    "first-token default last layer without a vector": (
        "first-token --checkpoint {one}", "the checkpoint has no vector at layers [2]"),
    "unembed-similarity --layers out of range": (
        "unembed-similarity --checkpoint {ck} --layers -9", "out of range"),
    "compose --layers out of range": ("compose --checkpoint {ck} --layers 0,8", "layers [8] out of range"),
    "compose one single": ("compose --checkpoint {ck} --layers 1", "need at least two single-layer vectors"),
    "compose --singles of another shape": (
        "compose --checkpoint {ck} --singles {hidden}", "width [48]"),
    "path-patching default layer without a vector": (
        "path-patching --checkpoint {one}", "the checkpoint has no vector at layer 1"),
    # the base cannot be found
    "logit-lens recorded base missing": ("logit-lens --checkpoint {no_base}", "cannot read its config"),
    "logit-lens --model missing": ("logit-lens --checkpoint {ck} --model {empty}/nope", "cannot read its config"),
    # corrupt checkpoints, checked against the base's config.json
    "diffsae wrong hidden size": ("diffsae --checkpoint {hidden} --layer 2", "width [48]"),
    "diffsae truncated": ("diffsae --checkpoint {truncated} --layer 2", "truncated or tampered"),
    "diffsae --steer-layers without a vector": (
        "diffsae --checkpoint {one} --layer 2 --steer-layers 1", "--steer-layers 1: the checkpoint has no vector"),
    "attribution wrong hidden size": (
        "attribution --vectors {hidden} --label x --traces {traces} --model {base}", "width [48]"),
    "attribution --coef nan": ("attribution --vectors {one} --traces {traces} --coef nan", "--coef nan"),
    "attribution --embed-threshold": (
        "attribution --vectors {one} --traces {traces} --embed-threshold 2", "--embed-threshold must be in [0, 1]"),
    "attribution --max-length 0": ("attribution --vectors {one} --traces {traces} --max-length 0",
                                   "--max-length must be >= 1"),
    "attribution spans clipped away": ("attribution --vectors {one} --traces {traces} --max-length 2",
                                       "no span labelled 'x' keeps a position inside its trace"),
    "behavior --coefs nan": ("behavior --vectors {one} --layer 0 --coefs 1 nan", "give one or more finite"),
    "behavior --gen-batch-size 0": ("behavior --vectors {one} --layer 0 --gen-batch-size 0",
                                    "--gen-batch-size must be >= 1"),
    "diffmean --gen-batch-size 0": ("diffmean --generate 2 --model {base} --gen-batch-size 0",
                                    "--gen-batch-size must be >= 1"),
    "diffmean --max-length 0": ("diffmean --traces {traces} --model {base} --max-length 0",
                                "--max-length must be >= 1"),
    "token-scaling --k 0": ("token-scaling --checkpoint {ck} --k 0", "--k must be >= 1"),
    "token-scaling gate of another hidden size": (
        "token-scaling --checkpoint {gate_wide}", "gate of layer 0 has shapes {'bias': (1,), 'weight': (48,)}, "
                                                 "expected weight (32,)"),
    "token-scaling gate on an unsteered layer": (
        "token-scaling --checkpoint {gate_unsteered}", "has gates for layers [1], not among its steered layers [0]"),
    "layer-ablation collect --all-layers corrupt": (
        "layer-ablation collect --runs {runs} --all-layers {nan}", "NaN or Inf"),
    "transfer truncated donor": ("transfer --donors {ck} {truncated}", "truncated or tampered"),
    "transfer --self-trained nan": ("transfer --donors {ck} --self-trained {base}={nan}", "NaN or Inf"),
    # rows of evaluate: the kind is explicit
    "evaluate steering checkpoint without steering.json": (
        "evaluate --checkpoint {no_meta}", "peft_type 'BEFT' and there is no steering.json"),
    "evaluate folder of no kind": ("evaluate --checkpoint {empty}", "not a checkpoint; expected a steering"),
}
NO_BENCH = {"attribution", "behavior", "diffmean"}  # commands without --benchmarks / --no-progress


def _argv(line: str, world, out) -> list[str]:
    argv = [word.format(**world) for word in line.split()] + ["--out", str(out)]
    return argv + ([] if argv[0] in NO_BENCH else BENCH)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m analysis {command}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_any_weights_load_or_out_is_made(case, world, weight_loads, tmp_path, capsys):
    line, words = CASES[case]
    out = tmp_path / "out"
    argv = _argv(line, world, out)
    assert main(argv) == 2, argv
    err = _one_error_line(capsys, argv[0])
    assert words in err, err
    assert weight_loads == [] and not out.exists()


@pytest.mark.parametrize("case", ["logit-lens --layers out of range", "evaluate folder of no kind",
                                  "diffsae wrong hidden size"])
def test_an_existing_out_is_left_byte_identical(case, world, weight_loads, tmp_path, capsys):
    line, words = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"earlier": true}\n')
    argv = _argv(line, world, out)
    assert main(argv) == 2
    assert words in _one_error_line(capsys, argv[0])
    assert weight_loads == [] and sorted(p.name for p in out.iterdir()) == ["result.json"]
    assert (out / "result.json").read_bytes() == b'{"earlier": true}\n'


def test_grader_report_refuses_a_bad_timeout_before_grading(capsys):
    assert main(["grader-report", "--timeout", "nan"]) == 2
    assert "--timeout must be > 0" in _one_error_line(capsys, "grader-report")


@pytest.mark.parametrize("tamper", [True, False])
def test_a_lora_row_with_checksums_is_verified_before_weights_load(tamper, world, weight_loads, tmp_path, capsys):
    """A LoRA training checkpoint's checksums.json is checked; an intact one passes every check, and the first thing
    after the checks is loading the row's weights (the spy)."""
    lora = lora_with_manifest(tmp_path, world["base"], tamper=tamper)
    out = tmp_path / "out"
    argv = ["evaluate", "--checkpoint", f"lora={lora}", "--out", str(out), *BENCH]
    if tamper:
        assert main(argv) == 2
        assert "adapter_model.safetensors does not match its checksum" in _one_error_line(capsys, "evaluate")
        assert weight_loads == [] and not out.exists()
    else:
        with pytest.raises(WeightsLoaded):
            main(argv)
        assert weight_loads == ["analysis.evaluate.load_row_model"]


def _delete(path):
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# What users do to a finished run's checkpoints to save disk, or what may differ without changing the model.
TRAINING_STATE_DAMAGE = {
    "optimizer.pt deleted": ("optimizer.pt", _delete),
    "optimizer.pt tampered": ("optimizer.pt", _flip_last_byte),
    "every training state file deleted": (None, None),
}


@pytest.mark.parametrize("damage", list(TRAINING_STATE_DAMAGE))
@pytest.mark.parametrize("kind", ["lora", "steering"])
def test_a_row_needs_only_the_model_files_of_a_training_checkpoint(kind, damage, world, weight_loads, tmp_path):
    """A row verifies the files a model load reads, not the training state (train.checkpointing.TRAINING_STATE): a
    checkpoint whose optimizer state was deleted or differs passes every check and gets as far as loading the row."""
    from train import checkpointing as ckpt_io

    if kind == "lora":
        d = lora_with_manifest(tmp_path, world["base"], tamper=False)
    else:
        d = with_training_state(shutil.copytree(world["ck"], tmp_path / "steering-checkpoint-2"))
    name, hurt = TRAINING_STATE_DAMAGE[damage]
    if name is None:
        state = [p for p in d.iterdir() if ckpt_io.is_training_state(p.name)]
        assert {p.name for p in state} == {"optimizer.pt", "scheduler.pt", "rng_state.pth", ckpt_io.TRAINER_STATE,
                                           "global_step2"}
        for p in state:
            _delete(p)
    else:
        hurt(d / name)
    with pytest.raises(WeightsLoaded):
        main(["evaluate", "--checkpoint", f"{kind}={d}", "--out", str(tmp_path / "out"), *BENCH])
    assert weight_loads == ["analysis.evaluate.load_row_model"]


def test_a_row_still_checks_every_model_file_the_manifest_lists(world, weight_loads, tmp_path, capsys):
    """Only the training state is skipped: a steering checkpoint's adapter_config.json changed after its manifest
    was written is refused, before any weights load."""
    d = with_training_state(shutil.copytree(world["ck"], tmp_path / "steering-checkpoint-2"))
    with (d / sv.ADAPTER_CONFIG_FILE).open("a") as f:
        f.write(" ")
    out = tmp_path / "out"
    assert main(["evaluate", "--checkpoint", str(d), "--out", str(out), *BENCH]) == 2
    assert "adapter_config.json does not match its checksum" in _one_error_line(capsys, "evaluate")
    assert weight_loads == [] and not out.exists()


def _adapter(tmp_path, peft_type: str, base: str):
    from safetensors.torch import save_file

    d = tmp_path / peft_type.lower()
    d.mkdir()
    (d / sv.ADAPTER_CONFIG_FILE).write_text(json.dumps({
        "peft_type": peft_type, "base_model_name_or_path": base, "target_modules": ["down_proj"],
        "feedforward_modules": ["down_proj"]}))
    save_file({"x": torch.zeros(2)}, str(d / "adapter_model.safetensors"))
    return d


def test_a_peft_adapter_of_another_type_is_an_adapter_row(world, weight_loads, tmp_path):
    """Any PEFT adapter loads through PeftModel.from_pretrained (IA3 here), not only LoRA: it passes every check."""
    with pytest.raises(WeightsLoaded):
        main(["evaluate", "--checkpoint", str(_adapter(tmp_path, "IA3", world["base"])), "--out",
              str(tmp_path / "out"), *BENCH])
    assert weight_loads == ["analysis.evaluate.load_row_model"]


@pytest.mark.parametrize("peft_type, words", [
    ("BEFT", "peft_type 'BEFT' and there is no steering.json; expected a steering checkpoint"),
    ("NO_SUCH_TYPE", "peft_type 'NO_SUCH_TYPE', which the installed PEFT does not know; expected a steering"),
])
def test_a_beft_adapter_without_steering_json_is_no_adapter_row(peft_type, words, world, weight_loads, tmp_path,
                                                                 capsys):
    """A BEFT adapter_config.json without steering.json is this project's steering checkpoint missing its meta, not
    an adapter row; a peft_type PEFT does not know could not load either."""
    d = _adapter(tmp_path, peft_type, world["base"])
    out = tmp_path / "out"
    assert main(["evaluate", "--checkpoint", str(d), "--out", str(out), *BENCH]) == 2
    assert words in _one_error_line(capsys, "evaluate")
    assert weight_loads == [] and not out.exists()


@pytest.mark.parametrize("command", ["logit-lens", "persistence", "first-token", "unembed-similarity"])
def test_good_layers_pass_every_check_and_the_base_is_what_loads_next(command, world, weight_loads, tmp_path, capsys):
    """The early checks accept what the commands accept: valid --layers get as far as loading the base."""
    with pytest.raises(WeightsLoaded):
        main([command, "--checkpoint", world["ck"], "--layers", "0,-1", "--out", str(tmp_path / "out"), *BENCH])
    assert weight_loads == ["analysis.cli.load_steerable"]


@pytest.mark.parametrize("existing", [False, True])
def test_layer_ablation_make_validates_every_config_before_writing_any(existing, world, tmp_path, capsys):
    """--validate checks the configs' keys first: a key python -m train does not know leaves --out as it was."""
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "result.json").write_text('{"earlier": true}\n')
    argv = ["layer-ablation", "make", "--model", world["base"], "--dataset", "procedural:mixed", "--out", str(out),
            "--set", "no_such_key=1", "--validate"]
    assert main(argv) == 2
    err = _one_error_line(capsys, "layer-ablation")
    assert "the config of layer 0: keys ['no_such_key'] are unknown to python -m train" in err, err
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["result.json"]
        assert (out / "result.json").read_bytes() == b'{"earlier": true}\n'
    else:
        assert not out.exists()
    assert main([*argv[:-3], "--validate"]) == 0  # the same without the bad key: validated and written
    assert json.loads((out / "result.json").read_text())["validated"] is True


def _full_model_copy(base: str, dest, *, tokenizer_json: str | None = None, chat_template: bool = True):
    """A full-model row: a copy of the tiny base, its tokenizer.json replaced or its chat template removed."""
    shutil.copytree(base, dest)
    if tokenizer_json is not None:
        (dest / "tokenizer.json").write_text(tokenizer_json)
    if not chat_template:
        (dest / "chat_template.jinja").unlink()
    return dest


@pytest.mark.parametrize("broken, words", [
    ({"tokenizer_json": "{not json"}, "cannot load the tokenizer of"),
    ({"chat_template": False}, "is a chat template and needs a tokenizer with a chat_template"),
])
def test_every_rows_tokenizer_is_checked_before_the_first_row_loads(broken, words, world, weight_loads, tmp_path,
                                                                      capsys):
    """A third row whose tokenizer does not load, or cannot render the chat template, is refused before the first
    row's weights load (it was found only when that row's turn came). select checks its rows the same way
    (analysis.table.check_loadable)."""
    third = _full_model_copy(world["base"], tmp_path / "third", **broken)
    out = tmp_path / "out"
    argv = ["evaluate", "--checkpoint", f"a={world['ck']}", "--checkpoint", f"b={world['one']}", "--checkpoint",
            f"c={third}", "--template", "qwen_math", "--out", str(out), *BENCH]
    assert main(argv) == 2
    err = _one_error_line(capsys, "evaluate")
    assert words in err and ("'c'" in err or str(third) in err), err
    assert weight_loads == [] and not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# python -m train: every input checked before the base's weights load and before output_dir is made or changed


@pytest.fixture(scope="module")
def train_world(world, tmp_path_factory):
    """Bad training inputs (model directories, tokenizers, templates, datasets) and a good dataset."""
    root = tmp_path_factory.mktemp("train-early")

    def model_dir(name, config_json=None, drop=(), tokenizer_json=None):
        d = root / name
        if config_json is None:
            shutil.copytree(world["base"], d)
        else:
            d.mkdir()
            (d / "config.json").write_text(config_json)
        for f in drop:
            (d / f).unlink()
        if tokenizer_json is not None:
            (d / "tokenizer.json").write_text(tokenizer_json)
        return str(d)

    files = {"good_data.jsonl": "".join(json.dumps({"question": f"{i} + 1", "answer": str(i + 1)}) + "\n"
                                        for i in range(12)),
             "empty_data.jsonl": "", "columns_data.jsonl": '{"problem": "1+1", "solution": "2"}\n',
             "not_json_data.jsonl": '{"question": "1+1", "answer": "2"}\nnot json\n',
             "no_question_template.txt": "Solve it.\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    lora = root / "lora"
    lora.mkdir()
    (lora / sv.ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    return {**world, **{name.split(".")[0]: str(root / name) for name in files}, "lora": str(lora),
            "no_config": model_dir("no-config", "{}"), "config_not_json": model_dir("config-not-json", "{not json"),
            "unknown_arch": model_dir("unknown-arch", json.dumps({"model_type": "no_such_arch"})),
            "bert": model_dir("bert", json.dumps({"model_type": "bert"})),
            "no_tokenizer": model_dir("no-tokenizer", drop=("tokenizer.json", "tokenizer_config.json")),
            "tokenizer_not_json": model_dir("tokenizer-not-json", tokenizer_json="{not json"),
            "no_chat_template": model_dir("no-chat-template", drop=("chat_template.jinja",))}


# (config overrides with {names} of the train world, words the one error line holds)
TRAIN_CASES = {
    "model dir without a model_type": ({"model_name_or_path": "{no_config}"}, "model_name_or_path: cannot read"),
    "model config.json not JSON": ({"model_name_or_path": "{config_not_json}"}, "is not a valid JSON file"),
    "model of an unknown architecture": ({"model_name_or_path": "{unknown_arch}"}, "no_such_arch"),
    "model of an unsupported family": ({"model_name_or_path": "{bert}"}, "model_type 'bert' is not supported"),
    "model without tokenizer files": ({"model_name_or_path": "{no_tokenizer}"}, "has no vocabulary"),
    "tokenizer.json not JSON": ({"model_name_or_path": "{tokenizer_not_json}"},
                                "model_name_or_path: cannot load the tokenizer"),
    "chat template, tokenizer without one": ({"model_name_or_path": "{no_chat_template}"},
                                             "needs a tokenizer with a chat_template"),
    "layers out of range": ({"layers": "9"}, "layers: layers [9] out of range"),
    "init_from without vectors": ({"init_from": "{empty}"}, "init_from: no steering vectors"),
    "init_from a LoRA adapter": ({"init_from": "{lora}"}, "init_from: no steering vectors"),
    "init_from of another hidden size": ({"init_from": "{hidden}"}, "width [48]"),
    "init_from truncated": ({"init_from": "{truncated}"}, "truncated or tampered"),
    "init_from NaN": ({"init_from": "{nan}"}, "holds NaN or Inf"),
    "template file missing": ({"template": "{empty}/gone.txt"}, "does not exist"),
    "template without the question placeholder": ({"template": "{no_question_template}"}, "must contain {question}"),
    "dataset missing": ({"dataset": "{empty}/gone.jsonl"}, "does not exist"),
    "dataset empty": ({"dataset": "{empty_data}"}, "holds no rows"),
    "dataset without the columns": ({"dataset": "{columns_data}"}, "cannot find the question key"),
    "dataset not JSON": ({"dataset": "{not_json_data}"}, "line 2 is not valid JSON"),
    "dataset_split of a file": ({"dataset_split": "test"}, "dataset_split: 'test' picks part of a Hub dataset"),
    "dataset_config of a procedural source": ({"dataset": "procedural:arithmetic", "dataset_config": "x"},
                                              "dataset_config: 'x' picks part of a Hub dataset"),
    "val_dataset empty": ({"val_dataset": "{empty_data}"}, "val_dataset: dataset"),
    "val_dataset is the training data": ({"val_dataset": "{good_data}"},
                                         "val_dataset: all 4 of its problems are training problems too"),
    "val_size leaves no training rows": ({"val_size": "12"}, "val_size 12 leaves no training rows"),
}


def _train_argv(overrides: dict[str, str], world, output_dir) -> list[str]:
    config = {"model_name_or_path": world["base"], "dataset": world["good_data"], "output_dir": str(output_dir),
              "template": "qwen_math", "val_size": "4", "max_steps": "1", "per_device_train_batch_size": "2",
              "num_generations": "2", "use_cpu": "true", "bf16": "false", "report_to": "none",
              **{key: value.format(**world) for key, value in overrides.items()}}
    return [arg for key, value in config.items() for arg in (f"--{key}", value)]


def _one_train_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m train: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_training_input_is_refused_before_weights_load_or_output_dir_is_made(case, train_world, weight_loads,
                                                                                  tmp_path, capsys):
    from train.__main__ import cli as train_cli

    overrides, words = TRAIN_CASES[case]
    output_dir = tmp_path / "run"
    assert train_cli(_train_argv(overrides, train_world, output_dir)) == 2
    err = _one_train_error_line(capsys)
    assert words in err, err
    assert weight_loads == [] and not output_dir.exists()


def test_a_bad_tokenizer_leaves_the_run_that_overwrite_would_replace_intact(train_world, weight_loads, tmp_path,
                                                                            capsys):
    """overwrite_output_dir: true deletes the earlier run only once every input is good: the tokenizer was loaded
    after the run directory had been cleared."""
    from train import checkpointing as ckpt_io
    from train.__main__ import cli as train_cli

    output_dir = tmp_path / "run"
    shutil.copytree(train_world["ck"], output_dir / "checkpoint-1")
    (output_dir / "checkpoint-1" / ckpt_io.TRAINER_STATE).write_text("{}")
    ckpt_io.write_manifest(output_dir / "checkpoint-1")  # a complete checkpoint: the run overwrite would delete
    (output_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.relative_to(output_dir): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    assert ckpt_io.holds_a_run(output_dir)
    argv = _train_argv({"model_name_or_path": "{tokenizer_not_json}", "overwrite_output_dir": "true"}, train_world,
                       output_dir)
    assert train_cli(argv) == 2
    assert "cannot load the tokenizer" in _one_train_error_line(capsys)
    assert weight_loads == []
    assert {p.relative_to(output_dir): p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before


def test_good_training_input_passes_every_check_and_the_model_is_what_loads_next(train_world, weight_loads,
                                                                                 tmp_path):
    """The early checks accept what training accepts: a good config gets as far as building the model."""
    from train.__main__ import cli as train_cli

    with pytest.raises(WeightsLoaded):
        train_cli(_train_argv({"init_from": "{one}", "layers": "0"}, train_world, tmp_path / "run"))
    assert weight_loads == ["train.__main__.build_model"]


def test_resuming_a_token_scaling_run_checks_its_gates_against_the_base(train_world, weight_loads, tmp_path, capsys):
    """The gates live outside the PEFT adapter and were loaded only into the built model: gates of another width are
    now refused before it is built, and the run directory is left as it was."""
    from train import checkpointing as ckpt_io
    from train.__main__ import cli as train_cli

    output_dir = tmp_path / "run"
    ck = output_dir / "checkpoint-1"
    shutil.copytree(train_world["gate_wide"], ck)
    (ck / ckpt_io.TRAINER_STATE).write_text("{}")
    ckpt_io.write_manifest(ck)
    before = sorted(p.relative_to(output_dir) for p in output_dir.rglob("*"))
    argv = _train_argv({"token_scaling": "true", "resume_from_checkpoint": str(ck)}, train_world, output_dir)
    assert train_cli(argv) == 2
    err = _one_train_error_line(capsys)
    assert "resume_from_checkpoint:" in err and "expected weight (32,)" in err, err
    assert weight_loads == [] and sorted(p.relative_to(output_dir) for p in output_dir.rglob("*")) == before
