"""Issue 25's hostile-input corpus, part 2: the analysis commands' flags (placeholders: ``tests/hostile_corpus.py``).

Each command is asked about its checkpoint / model / out flags and its own numbers; ``{evaldir}`` as ``--out`` asks
that a bad flag is refused before an existing output is touched."""

from __future__ import annotations

import json

from hostile_corpus import B2, Case, _dataset, _model_dir, _template


def A(id: str, argv: tuple[str, ...], why: str, message: str = "", *, setup=None, xfail: str = "", accept: str = "",
      kind: str = "flags") -> Case:
    return Case(f"{argv[0]}:{id}", argv[0], argv, why, message, setup, accept=accept, xfail=xfail, kind=kind)


def ck_cmd(cmd: str, *extra: str, out: str = "{new}") -> tuple[str, ...]:
    """A good command line of a checkpoint command (token-scaling: on a token-scaling checkpoint), plus ``extra``."""
    ck = "{tsck}" if cmd == "token-scaling" else "{ck}"
    return (cmd, "--checkpoint", ck, "--out", out, *B2, *extra)


_files = {"config.json": "{not json"}
NO_CONFIG = _model_dir({"README.md": "not a model"})
BAD_CONFIG = _model_dir(_files)

# The flags every checkpoint command shares (analysis/cli.py add_args): each asked of every such command.
SHARED = [
    ("checkpoint-missing", ("--checkpoint", "{tmp}/none"), "a checkpoint that is not there", "no such directory",
     None),
    ("checkpoint-is-file", ("--checkpoint", "{file}"), "a file as the checkpoint", "no such directory", None),
    ("model-missing", ("--model", "{tmp}/no-model"), "a --model that is not there", "--model", None),
    ("model-no-config", ("--model", "{model}"), "a base dir without config.json", "config.json", NO_CONFIG),
    ("model-config-not-json", ("--model", "{model}"), "a config.json that is not JSON", "--model", BAD_CONFIG),
    ("model-other-shape", ("--model", "{wide}"), "a base the vectors do not fit", "48", None),
    ("out-is-file", ("--out", "{file}"), "--out names a file", "--out", None),
    ("benchmarks-unknown", ("--benchmarks", "nonsense"), "an unknown benchmark", "nonsense", None),
    ("benchmarks-file-missing", ("--benchmarks", "file:{tmp}/none.jsonl"), "a benchmark file not there", "none.jsonl",
     None),
    ("temperature-negative", ("--temperature", "-1"), "a negative temperature", "--temperature", None),
    ("temperature-nan", ("--temperature", "nan"), "a NaN temperature", "--temperature", None),
    ("max-new-tokens-0", ("--max-new-tokens", "0"), "nothing to generate", "--max-new-tokens", None),
    ("template-no-question", ("--template", "{tmp}/tmpl.txt"), "a template without {question}", "{question}",
     _template("Solve.\n")),
    ("seeds-garbage", ("--seeds", "x"), "a seed that is not a number", "--seeds", None),
    ("bad-flag-over-earlier-out", ("--out", "{evaldir}", "--temperature", "-1"),
     "a bad flag with --out an earlier evaluation: refused, the earlier output untouched", "--temperature", None),
]
SHARED_COMMANDS = ("evaluate", "logit-lens", "persistence", "first-token", "unembed-similarity", "path-patching",
                   "token-scaling", "diffsae", "compose")




GGUF = ("export", "--checkpoint", "{ck}", "--to", "gguf", "--drop-layer-0")
ATTR = ("attribution", "--vectors", "{ck}", "--label", "backtracking", "--traces")


def _shared_cases() -> list[Case]:
    cases = []
    for cmd in SHARED_COMMANDS:
        extra = ("--layer", "1") if cmd == "diffsae" else ()
        for name, flags, why, message, setup in SHARED:
            argv = (*ck_cmd(cmd, *extra), *flags)  # argparse: a later flag wins
            cases.append(A(name, argv, f"{why} ({cmd})", message, setup=setup))
    return cases


def _results(world, tmp, subs):
    (tmp / "r.json").write_text("{not json")
    return {}


SMALL = ("--corpus", "{tmp}/small.jsonl")


def _small(world, tmp, subs):
    """Two cases of the grading corpus: grader-report grades every case, and the whole corpus takes a minute."""
    from analysis.grader_report import DEFAULT_CORPUS

    (tmp / "small.jsonl").write_text("".join(DEFAULT_CORPUS.read_text().splitlines(keepends=True)[:2]))
    return {}


def _traces(text: str):
    return _dataset("t.jsonl", text)


OWN = [
    # evaluate
    A("num-samples-0", ck_cmd("evaluate", "--num-samples", "0"), "no samples", "--num-samples"),
    A("pass-k-above-samples", ck_cmd("evaluate", "--pass-k", "4"), "pass@4 of 1 sample", "--pass-k"),
    A("pass-k-0", ck_cmd("evaluate", "--num-samples", "2", "--pass-k", "0"), "pass@0", "--pass-k"),
    A("batch-size-0", ck_cmd("evaluate", "--batch-size", "0"), "no rows per batch", "--batch-size"),
    A("limit-negative", ck_cmd("evaluate", "--limit", "-1"), "a negative limit", "--limit"),
    A("top-p-above-1", ck_cmd("evaluate", "--top-p", "1.5"), "top-p is a probability", "--top-p"),
    A("top-k-negative", ck_cmd("evaluate", "--top-k", "-2"), "a negative top-k", "--top-k"),
    A("reward-timeout-inf", ck_cmd("evaluate", "--reward-timeout", "inf"), "an unbounded grader", "--reward-timeout"),
    A("reward-timeout-0", ck_cmd("evaluate", "--reward-timeout", "0"), "every answer times out", "--reward-timeout"),
    A("resamples-0", ck_cmd("evaluate", "--resamples", "0"), "no bootstrap", "--resamples"),
    A("pair-unknown", ck_cmd("evaluate", "--pair", "x", "y"), "a pair of unknown labels", "--pair"),
    A("no-model-no-checkpoint", ("evaluate", "--benchmarks", "procedural:arithmetic:2", "--out", "{new}"),
      "nothing to evaluate", "--model"),
    A("dataset-missing-columns", ck_cmd("evaluate", "--benchmarks", "file:{tmp}/d.jsonl"), "rows without columns",
      "d.jsonl", setup=_dataset("d.jsonl", '{"q": "1", "a": "1"}\n')),
    A("dataset-empty", ck_cmd("evaluate", "--benchmarks", "file:{tmp}/d.jsonl"), "an empty benchmark", "d.jsonl",
      setup=_dataset("d.jsonl", "")),
    A("question-key-wrong", ck_cmd("evaluate", "--benchmarks", "file:{data}", "--question-key", "nope"),
      "a question key the rows lack", "nope"),
    A("vllm-kv-negative", ck_cmd("evaluate", "--vllm-kv-cache-gb", "-1"), "negative cache", "--vllm-kv-cache-gb"),
    # export
    A("scale-nan", (*GGUF, "--out", "{new}.gguf", "--scale", "nan"),
      "NaN vectors written", "--scale"),
    A("scale-inf", (*GGUF, "--out", "{new}.gguf", "--scale", "inf"),
      "infinite vectors written", "--scale"),
    A("out-existing-file", ("export", "--checkpoint", "{ck}", "--to", "gguf", "--drop-layer-0", "--out", "{export}"),
      "export over an existing file", "--out"),
    A("out-existing-dir-peft", ("export", "--checkpoint", "{ck}", "--to", "peft", "--out", "{evaldir}"),
      "export into an existing directory", "--out"),
    A("merged-model-missing", ("export", "--checkpoint", "{ck}", "--to", "merged", "--out", "{new}", "--model",
                               "{tmp}/no-model"), "merge into a base that is not there", "--model"),
    A("merged-out-is-file", ("export", "--checkpoint", "{ck}", "--to", "merged", "--out", "{file}"),
      "merged model over a file", "--out"),
    A("to-unknown", ("export", "--checkpoint", "{ck}", "--to", "onnx", "--out", "{new}"), "an unknown format", "--to"),
    A("checkpoint-missing", (*GGUF, "--out", "{new}.gguf", "--checkpoint", "{tmp}/none"),
      "nothing to export", "none"),
    # per-command numbers
    A("k-0", ck_cmd("logit-lens", "--k", "0"), "no tokens to show", "--k"),
    A("layers-out-of-range", ck_cmd("logit-lens", "--layers", "7"), "layer 7 of 3", "--layers"),
    A("layers-garbage", ck_cmd("logit-lens", "--layers", "a-b"), "not layer indices", "--layers"),
    A("layers-empty", ck_cmd("logit-lens", "--layers", ","), "no layer", "--layers"),
    A("forward-batch-0", ck_cmd("logit-lens", "--forward-batch-size", "0"), "no rows per pass",
      "--forward-batch-size"),
    A("layers-out-of-range", ck_cmd("persistence", "--layers", "3"), "layer 3 of 3", "--layers"),
    A("samples-per-problem-0", ck_cmd("persistence", "--samples-per-problem", "0"), "no samples",
      "--samples-per-problem"),
    A("k-0", ck_cmd("first-token", "--k", "0"), "no tokens", "--k"),
    A("max-positions-0", ck_cmd("first-token", "--max-positions", "0"), "no positions", "--max-positions"),
    A("layers-out-of-range", ck_cmd("first-token", "--layers", "9"), "layer 9 of 3", "--layers"),
    A("k-0", ck_cmd("unembed-similarity", "--k", "0"), "no tokens", "--k"),
    A("layer-out-of-range", ck_cmd("path-patching", "--layer", "5"), "layer 5 of 3", "--layer"),
    A("samples-per-problem-0", ck_cmd("path-patching", "--samples-per-problem", "0"), "no samples",
      "--samples-per-problem"),
    A("examples-negative", ck_cmd("token-scaling", "--examples", "-1"), "negative examples", "--examples"),
    A("k-0", ck_cmd("token-scaling", "--k", "0"), "no tokens", "--k"),
    A("not-token-scaling", ck_cmd("token-scaling", "--checkpoint", "{ck}"), "a plain checkpoint has no token gates",
      "token_gates"),
    A("layer-out-of-range", ck_cmd("diffsae", "--layer", "9"), "layer 9 of 3", "--layer"),
    A("dict-size-0", ck_cmd("diffsae", "--layer", "1", "--dict-size", "0"), "an empty dictionary", "--dict-size"),
    A("steps-0", ck_cmd("diffsae", "--layer", "1", "--steps", "0"), "no training", "--steps"),
    A("lr-negative", ck_cmd("diffsae", "--layer", "1", "--lr", "-1"), "a negative rate", "--lr"),
    A("alpha-above-1", ck_cmd("diffsae", "--layer", "1", "--alpha", "2"), "alpha is a probability", "--alpha"),
    A("heldout-above-1", ck_cmd("diffsae", "--layer", "1", "--heldout-fraction", "1.5"), "a fraction above 1",
      "--heldout-fraction"),
    A("topk-0", ck_cmd("diffsae", "--layer", "1", "--topk", "0"), "no active features", "--topk"),
    A("steer-layers-out-of-range", ck_cmd("diffsae", "--layer", "1", "--steer-layers", "8"), "layer 8 of 3",
      "--steer-layers"),
    A("singles-missing", ck_cmd("compose", "--singles", "{tmp}/none"), "a single-layer run not there", "none"),
    A("layers-out-of-range", ck_cmd("compose", "--layers", "6"), "layer 6 of 3", "--layers"),
    # transfer, similarity, compare
    A("recipient-missing", ("transfer", "--donors", "{ck}", "--recipients", "{tmp}/no-model", "--out", "{new}", *B2),
      "a recipient base not there", "no-model"),
    A("recipient-no-config", ("transfer", "--donors", "{ck}", "--recipients", "{model}", "--out", "{new}", *B2),
      "a recipient dir without config.json", "config.json", setup=NO_CONFIG),
    A("donor-missing", ("transfer", "--donors", "{tmp}/none", "--recipients", "{base}", "--out", "{new}", *B2),
      "a donor not there", "none"),
    A("self-trained-garbage", ("transfer", "--donors", "{ck}", "--recipients", "{base}", "--self-trained", "junk",
                               "--out", "{new}", *B2), "BASE=DIR expected", "--self-trained"),
    A("vectors-missing", ("similarity", "--vectors", "a={tmp}/none", "--out", "{new}"), "vectors not there", "none"),
    A("layer-out-of-range", ("similarity", "--vectors", "a={ck}", "b={ck}", "--layer", "9", "--out", "{new}"),
      "layer 9 of 3", "layer 9"),
    A("out-is-file", ("similarity", "--vectors", "a={ck}", "b={ck}", "--out", "{file}"), "--out a file", "--out"),
    A("results-missing", ("compare", "{tmp}/none.json", "{tmp}/none2.json", "--out", "{new}"), "no results file",
      "none.json"),
    A("results-not-json", ("compare", "{tmp}/r.json", "{tmp}/r.json", "--out", "{new}"), "a broken results file",
      "r.json", setup=_results),
    A("resamples-0", ("compare", "{tmp}/none.json", "--resamples", "0", "--out", "{new}"), "no bootstrap",
      "--resamples"),
    # trace commands
    A("traces-missing", ("diffmean", "--traces", "{tmp}/none.jsonl", "--model", "{base}", "--out", "{new}"),
      "traces not there", "none.jsonl"),
    A("traces-not-json", ("diffmean", "--traces", "{tmp}/t.jsonl", "--model", "{base}", "--out", "{new}"),
      "traces that are not JSONL", "t.jsonl", setup=_traces("not json\n")),
    A("traces-empty", ("diffmean", "--traces", "{tmp}/t.jsonl", "--model", "{base}", "--out", "{new}"),
      "no traces", "t.jsonl", setup=_traces("")),
    A("traces-span-outside", ("diffmean", "--traces", "{tmp}/t.jsonl", "--model", "{base}", "--out", "{new}"),
      "a span past the text", "span", setup=_traces(json.dumps({"text": "ab", "spans": [
          {"start": 0, "end": 9, "label": "x"}]}) + "\n")),
    A("generate-0", ("diffmean", "--generate", "0", "--model", "{base}", "--out", "{new}"), "nothing to generate",
      "0"),
    A("model-missing", ("diffmean", "--traces", "{traces}", "--model", "{tmp}/no-model", "--out", "{new}"),
      "a --model not there", "--model"),
    A("layers-out-of-range", ("diffmean", "--traces", "{traces}", "--model", "{base}", "--layers", "5", "--out",
                              "{new}"), "layer 5 of 3", "out of range"),
    A("window-width-0", ("diffmean", "--traces", "{traces}", "--model", "{base}", "--positions", "window",
                         "--window-width", "0", "--out", "{new}"), "an empty window", "width"),
    A("batch-size-0", ("diffmean", "--traces", "{traces}", "--model", "{base}", "--batch-size", "0", "--out",
                       "{new}"), "no rows per batch", "--batch-size"),
    A("out-is-file", ("diffmean", "--traces", "{traces}", "--model", "{base}", "--out", "{file}"), "--out a file",
      "--out"),
    A("traces-missing", (*ATTR, "{tmp}/none.jsonl", "--model", "{base}",
                         "--out", "{new}"), "traces not there", "none.jsonl"),
    A("coef-nan", (*ATTR, "{traces}", "--model", "{base}", "--coef", "nan",
                   "--out", "{new}"), "a NaN coefficient", "--coef"),
    A("max-examples-0", (*ATTR, "{traces}", "--model", "{base}",
                         "--max-examples", "0", "--out", "{new}"), "0 means every trace with the label (documented)",
      accept="load"),
    A("n-0", ("behavior", "--vectors", "{ck}", "--layer", "0", "--model", "{base}", "--n", "0", "--out", "{new}"),
      "no tasks", "0"),
    A("layer-out-of-range", ("behavior", "--vectors", "{ck}", "--layer", "9", "--model", "{base}", "--out", "{new}"),
      "layer 9 of 3", "layer 9"),
    A("coefs-nan", ("behavior", "--vectors", "{ck}", "--layer", "0", "--model", "{base}", "--coefs", "nan", "--out",
                    "{new}"), "a NaN coefficient", "--coefs"),
    A("attribution-missing", ("behavior", "--vectors", "{ck}", "--attribution", "{tmp}/none.json", "--model",
                              "{base}", "--out", "{new}"), "attribution result not there", "none.json"),
    A("temperature-negative", ("behavior", "--vectors", "{ck}", "--layer", "0", "--model", "{base}", "--temperature",
                               "-1", "--out", "{new}"), "a negative temperature", "--temperature"),
    A("task-unknown", ("behavior", "--vectors", "{ck}", "--layer", "0", "--model", "{base}", "--task", "nope",
                       "--out", "{new}"), "an unknown task", "--task"),
    # select, serve, grader-report, layer-ablation
    A("run-missing", ("select", "--run", "{tmp}/none", "--out", "{new}", *B2), "a run not there", "none"),
    A("run-without-checkpoints", ("select", "--run", "{tmp}", "--out", "{new}", *B2), "a folder with no run",
      "checkpoint"),
    A("metrics-missing", ("select", "--run", "{run}", "--metrics", "{tmp}/none.jsonl", "--out", "{new}", *B2),
      "a metrics file not there", "none.jsonl"),
    A("out-is-file", ("select", "--run", "{run}", "--out", "{file}", *B2), "--out a file", "--out"),
    A("checkpoint-missing", ("serve", "--checkpoint", "{tmp}/none"), "nothing to serve", "none"),
    A("scale-nan", ("serve", "--checkpoint", "{ck}", "--scale", "nan"), "NaN vectors served", "--scale"),
    A("kv-cache-negative", ("serve", "--checkpoint", "{ck}", "--kv-cache-gb", "-1"), "a negative cache",
      "--kv-cache-gb"),
    A("corpus-missing", ("grader-report", "--corpus", "{tmp}/none.jsonl"), "no corpus", "none.jsonl"),
    A("corpus-not-json", ("grader-report", "--corpus", "{tmp}/c.jsonl"), "a broken corpus", "c.jsonl",
      setup=_dataset("c.jsonl", "{\n")),
    A("corpus-missing-keys", ("grader-report", "--corpus", "{tmp}/c.jsonl"), "cases without their keys", "c.jsonl",
      setup=_dataset("c.jsonl", '{"id": "x"}\n')),
    A("timeout-0", ("grader-report", *SMALL, "--timeout", "0"), "every answer times out", "--timeout", setup=_small),
    A("timeout-inf", ("grader-report", *SMALL, "--timeout", "inf"), "an unbounded grader", "--timeout", setup=_small),
    A("json-is-dir", ("grader-report", *SMALL, "--json", "{tmp}"), "--json a directory", "--json", setup=_small),
    A("json-earlier-and-bad-timeout", ("grader-report", *SMALL, "--timeout", "-1", "--json",
                                       "{evaldir}/results.json"), "a bad timeout with --json an earlier file",
      "--timeout", setup=_small),
    A("make-lr-anchors", ("layer-ablation", "make", "--model", "{base}", "--dataset", "procedural:arithmetic",
                          "--lr-anchors", "0.2:1", "--out", "{new}"), "anchors must include 0 and 1", "0 and 1"),
    A("make-layers-out-of-range", ("layer-ablation", "make", "--model", "{base}", "--dataset", "procedural:arithmetic",
                                   "--layers", "7", "--out", "{new}"), "layer 7 of 3", "--layers"),
    A("make-config-missing", ("layer-ablation", "make", "--model", "{base}", "--config", "{tmp}/none.yaml", "--out",
                              "{new}"), "a base config not there", "none.yaml"),
    A("make-set-garbage", ("layer-ablation", "make", "--model", "{base}", "--dataset", "procedural:arithmetic", "--set",
                           "junk", "--out", "{new}"), "KEY=VALUE expected", "--set"),
    A("make-out-is-file", ("layer-ablation", "make", "--model", "{base}", "--dataset", "procedural:arithmetic",
                           "--out", "{file}"), "--out a file", "--out"),
    A("collect-runs-missing", ("layer-ablation", "collect", "--runs", "{tmp}/none", "--out", "{new}", *B2),
      "no runs.json", "runs.json"),
    A("collect-runs-not-json", ("layer-ablation", "collect", "--runs", "{tmp}/runs.json", "--out", "{new}", *B2),
      "a broken runs.json", "runs.json", setup=_dataset("runs.json", "{")),
    # Valid but odd: accepted, and they get as far as loading a model (or finish, exit 0).
    A("ok-plain", ck_cmd("evaluate"), "the good command line itself", accept="load", kind="flags-accepted"),
    A("ok-trailing-slash", ("evaluate", "--checkpoint", "{ck}/", "--out", "{new}", *B2), "a checkpoint path with a "
      "trailing slash", accept="load", kind="flags-accepted"),
    A("ok-layers-last", ck_cmd("logit-lens", "--layers", "last"), "--layers last", accept="load",
      kind="flags-accepted"),
    A("ok-layers-negative", ck_cmd("logit-lens", "--layers=-1"), "--layers -1 counts from the end", accept="load",
      kind="flags-accepted"),
    A("ok-greedy", ck_cmd("evaluate", "--temperature", "0", "--num-samples", "1"), "greedy decoding", accept="load",
      kind="flags-accepted"),
    A("ok-scale-0", (*GGUF, "--out", "{new}.gguf", "--scale", "0"),
      "a zero scale is a valid (if useless) export", accept="ok", kind="flags-accepted"),
]

FLAG_CASES: list[Case] = _shared_cases() + OWN
