"""Issue 25's hostile-input corpus: the cases ``tests/test_hostile_inputs.py`` runs (the harness is there).

A case is a command line (``prog`` "train" for ``python -m train``, else ``python -m analysis``) whose tokens may name
placeholders, filled in per case: ``{base}`` a tiny Qwen2 base (3 layers, hidden size 32), ``{wide}`` a base of another
shape (hidden size 48), ``{ck}`` a good steering checkpoint of ``{base}`` (``{tsck}``: one with token gates),
``{run}`` an earlier run directory (``checkpoint-1/`` complete, ``latest``, ``final/``, metrics), ``{evaldir}`` an
earlier evaluation directory, ``{export}`` an earlier exported ``.gguf`` file, ``{file}`` a plain file, ``{data}`` a
good JSONL dataset, ``{traces}`` a good traces file, ``{tmp}`` the case's own directory, ``{new}`` an output path that
does not exist; ``setup(world, tmp, subs)`` may make more (``{bad}``: the broken artefact of the case, ``{cfg}``: a
training config). Every case but the ``accept`` ones must end with exit code 2, one line on stderr, no weights loaded
and nothing written. The checkpoint corruptions, training configs, resume markers and manifests are here; the analysis
flags in ``hostile_flags``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Callable

import yaml


@dataclass(frozen=True)
class Case:
    id: str
    prog: str  # "train", or the analysis command
    argv: tuple[str, ...]
    why: str
    message: str = ""  # a piece of the one error line
    setup: Callable | None = None  # (world, tmp, subs) -> {placeholder: path}
    accept: str = ""  # "load": accepted, gets as far as loading weights; "ok": accepted, exit code 0
    xfail: str = ""  # issue 25: what is wrong today (a strict xfail)
    kind: str = ""


# --------------------------------------------------------------------------------------------------------------------
# Corrupt steering checkpoints: each a function (copy of a good checkpoint, world) that breaks it one way


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def _save_tensors(d, tensors):
    """Write the tensors and the matching sha256 into steering.json: the files agree, only their content is bad."""
    from safetensors.torch import save_file

    from steering.files import sha256_file

    save_file(tensors, str(d / "adapter_model.safetensors"))
    _edit_meta(d, adapter_sha256=sha256_file(d / "adapter_model.safetensors"))


def _meta(d):
    return json.loads((d / "steering.json").read_text())


def _edit_meta(d, **changes):
    (d / "steering.json").write_text(json.dumps({**_meta(d), **changes}))


def _set_first(d, value):
    t = _tensors(d)
    key = sorted(t)[0]
    t[key] = t[key].clone().fill_(value)
    _save_tensors(d, t)


def _wrong_hidden(d):
    _save_tensors(d, {k: v.new_zeros(1, 48) for k, v in _tensors(d).items()})


def _extra_layer(d):
    t = _tensors(d)
    key = sorted(t)[0]
    t[key.replace(".0.", ".7.")] = t[key].clone()
    _save_tensors(d, t)
    _edit_meta(d, layers=sorted(_meta(d)["layers"] + [7]))


def _drop_tensor(d):
    t = _tensors(d)
    del t[sorted(t)[0]]
    _save_tensors(d, t)


def _odd_tensor(d):
    t = _tensors(d)
    t["model.embed_tokens.weight"] = next(iter(t.values())).clone()
    _save_tensors(d, t)


def _cut_unsummed(d):
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _edit_meta(d, adapter_sha256=None)


def _write(d, name, text):
    (d / name).write_text(text)


CHECKPOINT_KINDS: dict[str, tuple[Callable, str, str]] = {
    # kind: (break it, a piece of the error, why)
    "truncated": (lambda d, w: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]), "checksum", "a save cut short"),
    "truncated-unsummed": (lambda d, w: _cut_unsummed(d), "safetensors", "a cut file that no checksum flags"),
    "empty-weights": (lambda d, w: ((d / "adapter_model.safetensors").write_bytes(b""),
                                    _edit_meta(d, adapter_sha256=None)), "safetensors", "a zero-byte weights file"),
    "nan": (lambda d, w: _set_first(d, float("nan")), "NaN or Inf", "a diverged vector saved"),
    "inf": (lambda d, w: _set_first(d, float("inf")), "NaN or Inf", "an overflowed vector saved"),
    "wrong-hidden-size": (lambda d, w: _wrong_hidden(d), "48", "vectors of another model's width"),
    "extra-layer": (lambda d, w: _extra_layer(d), "7", "a layer the 3-layer base does not have"),
    "tensor-missing": (lambda d, w: _drop_tensor(d), "layers", "steering.json lists a layer the tensors lack"),
    "meta-fewer-layers": (lambda d, w: _edit_meta(d, layers=[0]), "layers", "steering.json disagrees with tensors"),
    "odd-tensor": (lambda d, w: _odd_tensor(d), "unexpected tensor", "a tensor that is not a steering vector"),
    "meta-5": (lambda d, w: _write(d, "steering.json", "5"), "JSON object", "steering.json holding 5"),
    "meta-null": (lambda d, w: _write(d, "steering.json", "null"), "JSON object", "steering.json holding null"),
    "meta-list": (lambda d, w: _write(d, "steering.json", "[1, 2]"), "JSON object", "steering.json holding a list"),
    "meta-garbage": (lambda d, w: _write(d, "steering.json", "{\"layers\": [0, 1"), "not valid JSON",
                     "a truncated steering.json"),
    "layers-string": (lambda d, w: _edit_meta(d, layers="0,1,2"), "layers", "layers a string, not a list"),
    "layers-negative": (lambda d, w: _edit_meta(d, layers=[-1, 0, 1]), "layers", "a negative layer index"),
    "sha-mismatch": (lambda d, w: _edit_meta(d, adapter_sha256="0" * 64), "checksum",
                     "steering.json's checksum disagrees with the tensors"),
    "no-steering-json": (lambda d, w: (d / "steering.json").unlink(), "checkpoint", "a folder of weights alone"),
    "no-weights": (lambda d, w: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors",
                   "steering.json without its tensors"),
    "other-base": (lambda d, w: _edit_meta(d, base_model=str(w.wide)), "48",
                   "made for another base: the recorded base is 48 wide, the vectors 32"),
    "missing-base": (lambda d, w: _edit_meta(d, base_model=str(d.parent / "no-such-base")), "no-such-base",
                     "the recorded base is gone"),
}
# The corruptions every command taking a checkpoint is asked about; evaluate, export and logit-lens get them all.
CORE_KINDS = ("truncated", "nan", "wrong-hidden-size", "meta-5", "no-steering-json", "other-base")


def bad_checkpoint(kind: str, source: str = "ck") -> Callable:
    def setup(world, tmp, subs):
        bad = tmp / f"bad-{kind}"
        shutil.copytree(getattr(world, source), bad)
        CHECKPOINT_KINDS[kind][0](bad, world)
        return {"bad": bad}
    return setup


def _a_file(world, tmp, subs):
    (tmp / "bad").write_text("not a checkpoint\n")
    return {"bad": tmp / "bad"}


def _empty_dir(world, tmp, subs):
    (tmp / "bad").mkdir()
    return {"bad": tmp / "bad"}


B2 = ("--benchmarks", "procedural:arithmetic:2", "--no-progress")
# How each command takes a checkpoint ({bad}); the command line otherwise good.
CHECKPOINT_COMMANDS: dict[str, tuple[str, ...]] = {
    "evaluate": ("evaluate", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "export-gguf": ("export", "--checkpoint", "{bad}", "--to", "gguf", "--drop-layer-0", "--out", "{new}.gguf"),
    "export-peft": ("export", "--checkpoint", "{bad}", "--to", "peft", "--out", "{new}"),
    "logit-lens": ("logit-lens", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "persistence": ("persistence", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "first-token": ("first-token", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "unembed-similarity": ("unembed-similarity", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "path-patching": ("path-patching", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "token-scaling": ("token-scaling", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "diffsae": ("diffsae", "--checkpoint", "{bad}", "--layer", "1", "--out", "{new}", *B2),
    "compose": ("compose", "--checkpoint", "{bad}", "--out", "{new}", *B2),
    "serve": ("serve", "--checkpoint", "{bad}"),
    "similarity": ("similarity", "--vectors", "a={bad}", "b={ck}", "--out", "{new}"),
    "behavior": ("behavior", "--vectors", "{bad}", "--layer", "0", "--model", "{base}", "--out", "{new}", "--n", "2"),
    "attribution": ("attribution", "--vectors", "{bad}", "--label", "backtracking", "--traces", "{traces}",
                    "--model", "{base}", "--out", "{new}"),
    "transfer": ("transfer", "--donors", "{bad}", "--recipients", "{base}", "--out", "{new}", *B2),
    "layer-ablation-collect": ("layer-ablation", "collect", "--runs", "{runs_json}", "--all-layers", "{bad}", "--out",
                               "{new}", *B2),
    "train-init-from": ("--config", "{cfg}", "--init_from", "{bad}"),
    "train-probe-vectors": ("--config", "{cfg}", "--probe_vectors", "{bad}", "--probe_steps", "1"),
}
ALL_KINDS_FOR = ("evaluate", "export-gguf", "logit-lens", "train-init-from")


# Where a (command, corruption) differs from the rule (exit 2, the kind's message): accepted, another message, or a
# strict xfail saying what is wrong today.
EXCEPTIONS: dict[tuple[str, str], dict] = {
    ("export-gguf", "other-base"): dict(accept="ok", why="a control vector needs no base (--model checks the fit "
                                        "when given): the recorded base is only a hint"),
    ("transfer", "other-base"): dict(accept="load", why="transfer puts vectors on other bases by design: they fit the "
                                     "recipient given"),
    ("export-gguf", "missing-base"): dict(accept="ok", why="a control vector needs no base: the recorded base may be "
                                          "gone"),
    ("similarity", "other-base"): dict(accept="ok", why="cosines of vectors need no base"),
    ("behavior", "other-base"): dict(accept="load", why="--model given: the vectors fit it, whatever they record"),
    ("attribution", "other-base"): dict(accept="load", why="--model given: the vectors fit it, whatever they record"),
    ("train-init-from", "no-steering-json"): dict(accept="load", why="init_from a bare adapter_model.safetensors "
                                                  "(a PEFT adapter) is supported"),
    ("train-probe-vectors", "no-steering-json"): dict(accept="load", why="probe_vectors from a bare adapter file is "
                                                      "supported"),
    # init_from compares shapes, not names: vectors of another model of the same shape may start a run (its help
    # says so); probe_vectors, a reference for cosines, must be of this base.
    ("train-init-from", "other-base"): dict(accept="load", why="vectors of the same shape from another base"),
    ("train-init-from", "missing-base"): dict(accept="load", why="the recorded base is gone; the vectors fit"),
    ("train-probe-vectors", "other-base"): dict(message="made for the base"),
    ("layer-ablation-collect", "other-base"): dict(accept="load", why="--all-layers vectors of the same shape from "
                                                   "another base: collect compares shapes, as transfer does"),
}
# serve checks the checkpoint's files, then that vLLM is installed (not on CPU CI), then the vectors: its refusal of
# a corrupt tensor file is vLLM's absence here, so only the exit code, the one line and nothing loaded are asserted.
SERVE_NOTE = dict(message="")


def _checkpoint_cases() -> list[Case]:
    cases = []
    for cmd, argv in CHECKPOINT_COMMANDS.items():
        prog = "train" if cmd.startswith("train") else argv[0]
        kinds = list(CHECKPOINT_KINDS) if cmd in ALL_KINDS_FOR else list(CORE_KINDS)
        for kind in kinds:
            _, message, why = CHECKPOINT_KINDS[kind]
            setup = bad_checkpoint(kind, "tsck" if cmd == "token-scaling" else "ck")
            if prog == "train":
                setup = _then(setup, train_config())
            elif cmd == "layer-ablation-collect":
                setup = _then(setup, _runs_json)
            ex = {"message": message, "why": f"{why} ({cmd})", **(SERVE_NOTE if cmd == "serve" else {}),
                  **EXCEPTIONS.get((cmd, kind), {})}
            cases.append(Case(f"{cmd}:{kind}", prog, argv, ex["why"], ex["message"], setup, accept=ex.get("accept", ""),
                              xfail=ex.get("xfail", ""), kind="checkpoint"))
        for name, setup, message in (("a-file", _a_file, "bad"), ("empty-dir", _empty_dir, "bad")):
            if cmd in ALL_KINDS_FOR or name == "a-file":
                setup = _then(setup, train_config()) if prog == "train" else (
                    _then(setup, _runs_json) if cmd == "layer-ablation-collect" else setup)
                cases.append(Case(f"{cmd}:{name}", prog, argv, f"a {name.replace('-', ' ')} as a checkpoint ({cmd})",
                                  "" if cmd == "serve" else message, setup, kind="checkpoint"))
    return cases


def _then(*setups: Callable) -> Callable:
    def setup(world, tmp, subs):
        subs = dict(subs)
        for s in setups:
            subs.update(s(world, tmp, subs) or {})
        return subs
    return setup


def _runs_json(world, tmp, subs):
    return {"runs_json": _write_runs(tmp, world, world.run1)}


# --------------------------------------------------------------------------------------------------------------------
# Training configs


def train_base(world) -> dict:
    """A good config: tiny base, procedural data, CPU, one step (never reached: the spy stops the model loading)."""
    return dict(model_name_or_path=str(world.base), dataset="procedural:arithmetic", procedural_size=40, val_size=4,
                val_steps=0, num_generations=2, per_device_train_batch_size=4, max_completion_length=8, max_steps=1,
                save_steps=1, learning_rate=0.01, use_cpu=True, bf16=False, dtype="float32", report_to="none",
                plot_curves=False, template="qwen_math", output_dir="{new}")


def train_config(overrides: dict | None = None, drop: tuple[str, ...] = (), text: str | None = None,
                 append: str = "") -> Callable:
    """A setup writing ``{cfg}``: the good config with ``overrides`` (``drop``: keys removed), or ``text``
    verbatim; ``append``: raw YAML added after it (duplicate keys, tags)."""
    def setup(world, tmp, subs):
        if text is None:
            cfg = {k: v for k, v in {**train_base(world), **(overrides or {})}.items() if k not in drop}
            body = yaml.safe_dump(cfg)
        else:
            body = text
        body = body + append
        for k, v in subs.items():
            body = body.replace("{" + k + "}", str(v))
        (tmp / "config.yaml").write_text(body)
        return {"cfg": tmp / "config.yaml"}
    return setup


def T(id: str, why: str, message: str, overrides: dict | None = None, *, argv: tuple[str, ...] = (),
      only: tuple[str, ...] = (), extra: Callable | None = None, kind: str = "train-config", xfail: str = "",
      accept: str = "", **kw) -> Case:
    """A training case: ``--config {cfg}`` (the good config changed by ``overrides`` / ``kw``) + ``argv``; ``only``:
    exactly these arguments instead."""
    setup = train_config(overrides, **kw)
    if extra is not None:
        setup = _then(extra, setup)
    return Case(f"train:{id}", "train", only or ("--config", "{cfg}", *argv), why, message, setup, accept=accept,
                xfail=xfail, kind=kind)


def _dataset(name: str, text: str) -> Callable:
    def setup(world, tmp, subs):
        (tmp / name).write_text(text)
        return {}
    return setup


def _template(text: str) -> Callable:
    return _dataset("tmpl.txt", text)


def _model_dir(files: dict[str, str]) -> Callable:
    def setup(world, tmp, subs):
        d = tmp / "model"
        d.mkdir()
        for name, text in files.items():
            (d / name).write_text(text)
        return {"model": d}
    return setup


NAN, INF = float("nan"), float("inf")
GPT2 = json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100})

TRAIN_CASES = [
    T("batch-0", "no rows per step", "per_device_train_batch_size", {"per_device_train_batch_size": 0}),
    T("batch-negative", "a negative batch", "per_device_train_batch_size", {"per_device_train_batch_size": -4}),
    T("grad-accum-0", "no accumulation steps", "gradient_accumulation_steps", {"gradient_accumulation_steps": 0}),
    T("completion-length-0", "nothing to generate", "max_completion_length", {"max_completion_length": 0}),
    T("num-generations-0", "no group to compare", "num_generations", {"num_generations": 0}),
    T("num-generations-not-dividing", "4 rows cannot hold groups of 3", "num_generations", {"num_generations": 3}),
    T("max-steps-minus-5", "-5 used to train a whole epoch", "max_steps", {"max_steps": -5}),
    T("max-steps-0", "nothing to train", "max_steps", {"max_steps": 0}),
    T("lr-inf", "an infinite learning rate diverged (exit 3)", "learning_rate", {"learning_rate": INF}),
    T("lr-nan", "NaN learning rate", "learning_rate", {"learning_rate": NAN}),
    T("lr-negative", "gradient ascent", "learning_rate", {"learning_rate": -1}),
    T("lr-zero", "nothing learnt", "learning_rate", {"learning_rate": 0}),
    T("lr-string", "not a number", "learning_rate", {"learning_rate": "fast"}),
    T("init-scale-nan", "NaN initial vectors", "init_scale", {"init_scale": NAN, "init_from": "{ck}"}),
    T("init-scale-inf", "infinite initial vectors", "init_scale", {"init_scale": INF, "init_from": "{ck}"}),
    T("reward-timeout-inf", "an unbounded grader", "reward_timeout", {"reward_timeout": INF}),
    T("reward-timeout-1e7", "overflows the workers' timers", "reward_timeout", {"reward_timeout": 1e7}),
    T("reward-timeout-0", "every answer would time out", "reward_timeout", {"reward_timeout": 0}),
    T("reward-timeout-negative", "a negative timeout", "reward_timeout", {"reward_timeout": -1}),
    T("reward-timeout-nan", "NaN timeout", "reward_timeout", {"reward_timeout": NAN}),
    T("temperature-nan", "NaN sampling temperature", "temperature", {"temperature": NAN}),
    T("max-grad-norm-inf", "any number that is infinite", "max_grad_norm", {"max_grad_norm": INF}),
    T("warmup-nan", "NaN warmup", "warmup", {"warmup_steps": NAN}),
    T("output-dir-file", "output_dir is a file", "output_dir", {"output_dir": "{file}"}),
    T("duplicate-key", "YAML keeps the last one silently", "learning_rate", append="learning_rate: 0.5\n"),
    T("unknown-key", "a typo", "learnin_rate", {"learnin_rate": 0.1}),
    T("unknown-flag", "a typo on the command line", "learnin_rate", argv=("--learnin_rate", "0.1")),
    T("flag-without-value", "a flag at the end with no value", "learning_rate", argv=("--learning_rate",)),
    T("python-tag", "YAML tags run code in yaml.load", "YAML", append="x: !!python/object/apply:os.system ['true']\n"),
    T("yaml-list", "a non-mapping YAML", "mapping", text="- a\n- b\n"),
    T("yaml-scalar", "a YAML scalar", "mapping", text="42\n"),
    T("yaml-empty", "an empty file: no keys, so the required ones are missing", "model_name_or_path", text=""),
    T("yaml-broken", "unbalanced brackets", "YAML", text="learning_rate: [0.1\n"),
    T("config-missing", "--config names nothing", "no such file", only=("--config", "{tmp}/none.yaml")),
    T("config-is-dir", "--config names a directory", "--config", only=("--config", "{tmp}")),
    T("no-config", "no --config and no keys", "model_name_or_path", only=("--output_dir", "{new}")),
    T("dataset-missing-file", "a missing dataset file", "missing.jsonl", {"dataset": "{tmp}/missing.jsonl"}),
    T("dataset-missing-columns", "rows without question / answer", "column", {"dataset": "{tmp}/d.jsonl"},
      extra=_dataset("d.jsonl", '{"q": "1+1", "a": "2"}\n' * 8)),
    T("dataset-empty", "an empty dataset", "d.jsonl", {"dataset": "{tmp}/d.jsonl"}, extra=_dataset("d.jsonl", "")),
    T("dataset-not-json", "a dataset that is not JSONL", "d.jsonl", {"dataset": "{tmp}/d.jsonl"},
      extra=_dataset("d.jsonl", "question,answer\n1+1,2\n")),
    T("dataset-unknown-name", "neither a file nor a known dataset", "dataset", {"dataset": "no_such_dataset"}),
    T("dataset-procedural-unknown", "an unknown procedural task", "nosuchtask", {"dataset": "procedural:nosuchtask"}),
    T("dataset-missing", "no dataset", "dataset", drop=("dataset",)),
    T("model-missing", "no model", "model_name_or_path", drop=("model_name_or_path",)),
    T("template-no-question", "a template without {question}", "{question}", {"template": "{tmp}/tmpl.txt"},
      extra=_template("Solve it.\n")),
    T("template-missing-file", "a template file that is not there", "template", {"template": "{tmp}/none.txt"}),
    T("template-unknown", "an unknown template name", "no_such_template", {"template": "no_such_template"}),
    T("layers-out-of-range", "layer 7 of a 3-layer base", "layers", {"layers": [0, 7]}),
    T("layers-negative", "layers are 0-based", "layers", {"layers": [-1]}),
    T("layers-string", "layers as garbage text", "layers", {"layers": "abc"}),
    T("layers-duplicate", "a layer twice", "layers", {"layers": [1, 1]}),
    T("layer-lr-nan", "a NaN per-layer learning rate", "layer_lr", {"layers": [0, 1], "layer_lr": {0: NAN}}),
    T("layer-lr-unlisted", "a rate for a layer that is not trained", "layer_lr", {"layers": [0], "layer_lr": {2: 0.1}}),
    T("layer-lr-garbage", "layer_lr not a mapping", "layer_lr", {"layer_lr": "fast"}),
    T("init-from-missing", "init_from names nothing", "init_from", {"init_from": "{tmp}/none"}),
    T("probe-vectors-missing", "probe_vectors names nothing", "probe_vectors",
      {"probe_vectors": "{tmp}/none", "probe_steps": 1}),
    T("model-dir-missing", "a base model path that does not exist", "model_name_or_path",
      {"model_name_or_path": "{tmp}/no-model"}),
    T("model-no-config", "a base model dir without config.json", "model_name_or_path",
      {"model_name_or_path": "{model}"}, extra=_model_dir({"README.md": "x"})),
    T("model-config-not-json", "a config.json that is not JSON", "model_name_or_path",
      {"model_name_or_path": "{model}"}, extra=_model_dir({"config.json": "{not json"})),
    T("model-unsupported", "a family without steering support", "gpt2", {"model_name_or_path": "{model}"},
      extra=_model_dir({"config.json": GPT2})),
    T("save-total-limit-1", "transformers would delete the checkpoint latest names", "save_total_limit",
      {"save_total_limit": 1}),
    T("adapter-unknown", "an unknown adapter", "adapter", {"adapter": "qlora"}),
    T("dtype-unknown", "an unknown dtype", "dtype", {"dtype": "float8"}),
    T("preset-unknown", "an unknown preset", "preset", {"preset": "papr"}),
    T("val-size-negative", "a negative validation size", "val_size", {"val_size": -1}),
    T("overwrite-and-resume", "overwrite would delete what resume reads", "overwrite_output_dir",
      {"overwrite_output_dir": True, "resume_from_checkpoint": "latest"}),
    T("static-and-vllm", "two generation paths", "rollout_backend", {"rollout_backend": "static", "use_vllm": True}),
    T("probes-without-validation", "probe batch from no validation data", "probe_steps",
      {"probe_steps": 1, "val_size": 0}),
    T("token-scaling-lora", "token gates need steering", "token_scaling", {"token_scaling": True, "adapter": "lora",
                                                                            "layers": None}),
    T("generation-kwargs-stop", "stops come from the template", "generation_kwargs",
      {"generation_kwargs": {"stop": ["x"]}}),
    T("reward-style-unknown", "an unknown reward", "reward_style", {"reward_style": "cosine"}),
    T("env-not-mapping", "env must map names to values", "env", {"env": ["A=1"]}),
    T("output-dir-holds-run", "a new run on top of another's checkpoints", "output_dir", {"output_dir": "{run}"},
      kind="train-run-dir"),
    T("output-dir-holds-final", "a new run on top of a finished run", "final", {"output_dir": "{tmp}/done"},
      kind="train-run-dir", extra=lambda w, tmp, subs: {"done": shutil.copytree(w.ck, tmp / "done" / "final")}),
    # Valid but odd: accepted, and they get as far as loading the base.
    T("ok-plain", "the good config itself", "", accept="load", kind="train-accepted"),
    T("ok-lr-yaml11-string", "3e-2 is a string in YAML 1.1; the config reads it as a number", "",
      overrides={"learning_rate": "3e-2"}, accept="load", kind="train-accepted"),
    T("ok-unicode-output-dir", "a non-ASCII output_dir", "", {"output_dir": "{tmp}/ausgabe-ü"}, accept="load",
      kind="train-accepted"),
    T("ok-one-layer", "steer the last layer only", "", {"layers": [2]}, accept="load", kind="train-accepted"),
    T("ok-init-from-gguf", "init_from an earlier export (.gguf)", "", {"init_from": "{export}"}, accept="load",
      kind="train-accepted"),
]


# --------------------------------------------------------------------------------------------------------------------
# Resume markers (`latest`) and checkpoint manifests (checksums.json), in a copy of the earlier run ({bad})


def broken_run(edit: Callable, source: str = "run") -> Callable:
    """A copy of the world's earlier run ``source`` (``run1``: the single-layer run layer-ablation collect reads),
    broken by ``edit``."""
    def setup(world, tmp, subs):
        bad = tmp / "run"
        shutil.copytree(getattr(world, source), bad)
        edit(bad)
        return {"bad": bad, "runs_json": _write_runs(tmp, world, bad)}
    return setup


def _write_runs(tmp, world, run):
    (tmp / "runs.json").write_text(json.dumps({"model": str(world.base), "dataset": "procedural:arithmetic",
                                               "runs": [{"layer": 0, "output_dir": str(run)}]}))
    return tmp / "runs.json"


def _latest(text: str) -> Callable:
    return lambda run: (run / "latest").write_text(text)


def _manifest(value) -> Callable:
    def edit(run):
        m = run / "checkpoint-1" / "checksums.json"
        m.write_text(value if isinstance(value, str) else json.dumps(value(json.loads(m.read_text()))))
    return edit


def _remanifest(edit_ckpt: Callable) -> Callable:
    """Break a checkpoint's file, then write its manifest again: the checksums agree, the content is bad."""
    def edit(run):
        from train.checkpointing import write_manifest

        ck = run / "checkpoint-1"
        edit_ckpt(ck)
        (ck / "checksums.json").unlink()
        write_manifest(ck)
    return edit


def _entry(files):
    return {"sha256": "0" * 64, "bytes": 1}


MARKERS: dict[str, tuple[Callable, str, str]] = {
    "latest-list": (_latest('["checkpoint-1"]'), "latest", "a JSON list"),
    "latest-garbage": (_latest("\x00garbage"), "latest", "garbage bytes"),
    "latest-empty": (_latest(""), "latest", "an empty marker (a kill while writing it, on a bad filesystem)"),
    "latest-missing-ckpt": (_latest('{"checkpoint": "checkpoint-9"}'), "checkpoint-9", "names a missing checkpoint"),
    "latest-incomplete": (lambda run: (run / "checkpoint-1" / "checksums.json").unlink(), "checksums.json",
                          "names a checkpoint whose save did not finish"),
    "latest-outside": (_latest('{"checkpoint": "../elsewhere/checkpoint-1"}'), "elsewhere",
                       "a path outside the run dir"),
    "latest-absolute": (_latest('{"checkpoint": "/etc"}'), "/etc", "an absolute path"),
    "latest-null": (_latest('{"checkpoint": null}'), "None", "names nothing"),
    "latest-number": (_latest('{"checkpoint": 1}'), "1", "a number, not a name"),
}
MANIFESTS: dict[str, tuple[Callable, str, str]] = {
    "files-empty": (_manifest(lambda m: {"files": {}}), "does not list", "a manifest listing nothing"),
    "dotdot-entry": (_manifest(lambda m: {"files": {**m["files"], "../x": _entry(m)}}), "../x",
                     "an entry outside the checkpoint"),
    "absolute-entry": (_manifest(lambda m: {"files": {**m["files"], "/etc/passwd": _entry(m)}}), "/etc/passwd",
                       "an absolute path"),
    "not-json": (_manifest("{\"files\": "), "not valid JSON", "a truncated manifest"),
    "a-list": (_manifest("[]"), "manifest", "a list"),
    "bad-types": (_manifest(lambda m: {"files": {k: {"sha256": 5, "bytes": "x"} for k in m["files"]}}), "manifest",
                  "entries of the wrong types"),
    "file-changed": (lambda run: (run / "checkpoint-1" / "optimizer.pt").write_bytes(b"tampered"), "optimizer.pt",
                     "a listed file changed after the save"),
    "file-missing": (lambda run: (run / "checkpoint-1" / "optimizer.pt").unlink(), "optimizer.pt",
                     "a listed file deleted"),
    "state-not-json": (_remanifest(lambda ck: (ck / "trainer_state.json").write_text("{")), "trainer_state.json",
                       "a consistent manifest over a broken trainer state"),
    "vectors-nan": (_remanifest(lambda ck: _set_first(ck, float("nan"))), "NaN or Inf",
                    "a consistent manifest over NaN vectors"),
}


# select picks among the complete checkpoints by their metrics and never reads `latest`: a broken marker is no input
# of it (accepted: it gets as far as loading a model). collect takes a run's final checkpoint (analysis.cli
# final_checkpoint): the one `latest` names if complete, else the highest complete one, else final/.
SELECT_IGNORES_LATEST = dict(accept="load", why="select never reads latest")
MARKER_EXCEPTIONS = {
    ("select", "latest-incomplete"): dict(message="complete", why="the run's only checkpoint is incomplete"),
    ("layer-ablation-collect", "latest-missing-ckpt"): dict(accept="load", why="latest names a checkpoint that is "
                                                            "gone: collect falls back to the highest complete one"),
    ("layer-ablation-collect", "latest-incomplete"): dict(accept="load", why="latest names an incomplete "
                                                          "checkpoint: collect falls back to final/"),
}


def _run_cases() -> list[Case]:
    resume = ("--config", "{cfg}", "--output_dir", "{bad}", "--resume_from_checkpoint", "latest")
    cases = []
    for name, (edit, message, why) in MARKERS.items():
        setup = _then(broken_run(edit), train_config())
        cases.append(Case(f"train-resume:{name}", "train", resume, why, message, setup, kind="marker"))
        ex = MARKER_EXCEPTIONS.get(("select", name), SELECT_IGNORES_LATEST)
        cases.append(Case(f"select:{name}", "select", ("select", "--run", "{bad}", "--out", "{new}", *B2),
                          ex.get("why", why), ex.get("message", message), broken_run(edit),
                          accept=ex.get("accept", ""), kind="marker"))
        ex = MARKER_EXCEPTIONS.get(("layer-ablation-collect", name), {})
        cases.append(Case(f"layer-ablation-collect:{name}", "layer-ablation",
                          ("layer-ablation", "collect", "--runs", "{runs_json}", "--out", "{new}", *B2),
                          ex.get("why", why), message, broken_run(edit, "run1"), accept=ex.get("accept", ""),
                          kind="marker"))
    for name, (edit, message, why) in MANIFESTS.items():
        setup = _then(broken_run(edit), train_config())
        for how, value in (("latest", "latest"), ("path", "{bad}/checkpoint-1")):
            cases.append(Case(f"train-resume-{how}:{name}", "train",
                              ("--config", "{cfg}", "--output_dir", "{bad}", "--resume_from_checkpoint", value), why,
                              message, setup, kind="manifest"))
    cases.append(Case("train-resume:no-marker", "train", ("--config", "{cfg}", "--resume_from_checkpoint", "latest"),
                      "resume latest in a run that has no marker never means start over", "latest", train_config(),
                      kind="marker"))
    cases.append(Case("train-resume:path-missing", "train",
                      ("--config", "{cfg}", "--resume_from_checkpoint", "{tmp}/none"), "a resume path that is not "
                      "there", "none", train_config(), kind="marker"))
    return cases


CASES: list[Case] = _checkpoint_cases() + TRAIN_CASES + _run_cases()
