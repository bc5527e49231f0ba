"""The real Qwen2.5 tokenizer and chat template (tests/data/qwen2.5-tokenizer) on tiny models with its full
151,936-row vocabulary: prompt rendering, where generation ends (end-of-turn, EOS under both checkpoint conventions,
``r1``'s ``</answer>``) on every backend, rewards on decoded text, and every analysis command end to end.

The stop tests use *scripted* models (``steering.tiny.scripted_model``): their greedy continuation of a prompt is a
fixed text that goes on past where the template's answer ends, as the real 24-layer checkpoint's did, so "it stopped
there" is a property the test can see fail.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import ENDOFTEXT, IM_END, QWEN_VOCAB, save_tiny_qwen
from steering import rewards
from steering.generation import SamplingParams, end_completions, generate
from steering.templates import PromptTemplate, end_of_turn_ids, get_template
from steering.tiny import scripted_model
from steering.vectors import load_base_model, load_tokenizer

BACKENDS = ["hf", "static"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "traces.jsonl"
R1_SCRIPT = (" Two plus two is four. </think> <answer> 4 </answer> <think> Let me check that again. </think> "
             "<answer> 5 </answer> <think> and once more </think> <answer> 6 </answer> <think>")
# What the real checkpoint did with a chat prompt: the turn ends, then the model writes the next turns itself.
CHAT_SCRIPTS = {"What is 2+2?": "Two plus two is \\boxed{4}.<|im_end|>\n<|im_start|>user\nAnd again?<|im_end|>\n"
                                "<|im_start|>assistant\nThen \\boxed{5}.<|endoftext|>",
                "What is 3+3?": "Three plus three is \\boxed{6}.<|endoftext|>Human: more? \\boxed{7} and \\boxed{8}"}
CHATML_PROMPT = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                 "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def scripted_dirs(qwen_tokenizer_dir, tmp_path_factory):
    """One scripted model saved twice: with Qwen2.5 base checkpoints' end tokens and with instruct ones'."""
    tok = load_tokenizer(str(qwen_tokenizer_dir))
    pairs = [(get_template("r1").render("What is 2+2?"), R1_SCRIPT)]
    pairs += [(get_template("qwen_math").render(q, tok), s) for q, s in CHAT_SCRIPTS.items()]
    root = tmp_path_factory.mktemp("scripted")
    return {flavour: save_tiny_qwen(root / flavour, qwen_tokenizer_dir, flavour=flavour,
                                    model=scripted_model(tok, pairs, vocab_size=QWEN_VOCAB))
            for flavour in ("base", "instruct")}


def load(path):
    return load_base_model(str(path), dtype="float32"), load_tokenizer(str(path))


def test_qwen_math_renders_as_chatml(qwen_base_dir):
    tok = load_tokenizer(str(qwen_base_dir))
    assert get_template("qwen_math").render("What is 2+2?", tok) == CHATML_PROMPT
    assert tok(CHATML_PROMPT)["input_ids"][:3] == [151644, 8948, 198]  # <|im_start|> system \n: real ids
    assert end_of_turn_ids(tok) == [IM_END]


@pytest.mark.parametrize("flavour", ["base", "instruct"])
def test_chat_stops_include_end_of_turn_and_endoftext_whatever_the_files_say(scripted_dirs, flavour):
    model, tok = load(scripted_dirs[flavour])
    assert tok.eos_token_id == (ENDOFTEXT if flavour == "base" else IM_END)  # the two conventions really differ
    chat = get_template("qwen_math").stops(tok, model)
    assert {IM_END, ENDOFTEXT} <= set(chat.token_ids) and chat.strings == ()
    r1 = get_template("r1").stops(tok, model)
    assert r1.strings == ("</answer>",) and ENDOFTEXT in r1.token_ids
    # a plain-text template has no turns: <|im_end|> is an end token only where the checkpoint says so
    assert (IM_END in r1.token_ids) == (flavour == "instruct")


@pytest.mark.parametrize("flavour", ["base", "instruct"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_generation_ends_at_the_end_of_the_turn(scripted_dirs, flavour, backend):
    model, tok = load(scripted_dirs[flavour])
    tmpl = get_template("qwen_math")
    prompts = [tmpl.render(q, tok) for q in CHAT_SCRIPTS]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    res = generate(model, tok, prompts, params, backend=backend, stops=tmpl.stops(tok, model))
    assert res.completions == ["Two plus two is \\boxed{4}.", "Three plus three is \\boxed{6}."]
    assert [ids[-1] for ids in res.completion_ids] == [IM_END, ENDOFTEXT] and res.ended == ["eos", "eos"]
    if flavour == "base":
        # Without the template's stops, the base checkpoint's own files let the first reply run into a second turn.
        plain = generate(model, tok, prompts[:1], params, backend=backend)
        assert "And again?" in tok.decode(plain.completion_ids[0]) and plain.ended == ["eos"]
        assert rewards.score(plain.completions[0], "4").extracted == "5"  # ... and the reward would read that turn


@pytest.mark.parametrize("backend", BACKENDS)
def test_r1_generation_ends_at_the_first_answer_tag(scripted_dirs, backend):
    model, tok = load(scripted_dirs["base"])
    tmpl = get_template("r1")
    prompt = tmpl.render("What is 2+2?")
    params = SamplingParams(max_new_tokens=60, temperature=0)
    plain = generate(model, tok, [prompt], params, backend=backend)  # no stop strings: the old behaviour
    assert plain.completions[0].count("</answer>") >= 3 and plain.ended == ["length"]
    assert rewards.score(plain.completions[0], "4", answer_format="answer_tag").extracted == "6"
    res = generate(model, tok, [prompt], params, backend=backend, stops=tmpl.stops(tok, model))
    text = res.completions[0]
    assert text == " Two plus two is four. </think> <answer> 4 </answer>" and res.ended == ["stop"]
    ids = res.completion_ids[0]
    assert ids == plain.completion_ids[0][: len(ids)]  # a prefix of what the model samples: nothing added
    assert "</answer>" not in tok.decode(ids[:-1])  # cut at the token that completes the stop string
    verdict = rewards.score(text, "4", answer_format="answer_tag")
    assert verdict.correct and verdict.extracted == "4"


def test_static_equals_hf_token_for_token_with_stops(qwen_base_dir):
    """Sampling (T = 1) from a random model on the real vocabulary, with stop strings that often occur inside
    tokens: both backends give the same tokens and the same endings, each ending where it says."""
    model, tok = load(qwen_base_dir)
    tmpl = PromptTemplate(name="stops", answer_format="boxed", text="Q: {question}\nA:", stop=("er", "</answer>"))
    prompts = [tmpl.render(q) for q in ("What is 2+2?", "Name a prime", "多少?", "x")]
    params = SamplingParams(max_new_tokens=24, temperature=1.0)
    stops = tmpl.stops(tok, model)
    hf = generate(model, tok, prompts, params, num_return_sequences=4, seed=3, backend="hf", stops=stops)
    st = generate(model, tok, prompts, params, num_return_sequences=4, seed=3, backend="static", stops=stops)
    assert hf.completion_ids == st.completion_ids and hf.ended == st.ended
    assert set(hf.ended) >= {"stop", "length"}
    for ids, how in zip(hf.completion_ids, hf.ended):
        text = tok.decode(ids)
        if how == "stop":
            assert any(s in text for s in stops.strings) and not any(s in tok.decode(ids[:-1]) for s in stops.strings)
        elif how == "eos":
            assert ids[-1] in stops.token_ids
        else:
            assert len(ids) == 24 and not any(s in text for s in stops.strings)
    again, how = end_completions(hf.completion_ids, stops.token_ids, stops.strings, tok)
    assert again == hf.completion_ids and how == hf.ended  # cutting what was cut changes nothing


def test_r1_training_run_logs_how_rollouts_ended(scripted_dirs, tmp_path):
    """A GRPO run with the r1 template on the scripted base: rollouts end at </answer>, metrics.jsonl says so, and
    the reward reads the first answer (most samples follow the script, whose first answer is right); with RLOO the
    logged reward is the unweighted one."""
    import yaml

    from train.__main__ import main, parse_config

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": "What is 2+2?", "answer": "4"}) + "\n" for _ in range(4)))
    cfg = dict(model_name_or_path=str(scripted_dirs["base"]), dtype="float32", adapter="steering", template="r1",
               dataset=str(data), val_size=0, val_steps=0, learning_rate=1e-3, num_generations=4,
               per_device_train_batch_size=4, max_completion_length=60, max_steps=1, save_steps=1, logging_steps=1,
               bf16=False, use_cpu=True, report_to="none", output_dir=str(tmp_path / "run"), plot_curves=False,
               seed=0, warmup_steps=0, advantage_estimator="rloo", scale_rewards="none")
    (tmp_path / "r1.yaml").write_text(yaml.safe_dump(cfg))
    main(parse_config(["--config", str(tmp_path / "r1.yaml")]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == 1 and "reward" in r)
    ends = {k: step[f"completions/ended_by_{k}"] for k in ("stop", "eos", "length")}
    assert sum(ends.values()) == pytest.approx(1.0) and ends["stop"] == 1.0, ends
    assert step["reward"] > 0 and step["completion_length"] < 30, step  # the script runs on to 60 tokens
    # RLOO is TRL's reward weight G/(G-1); the logged reward is the reward itself, not the weighted one
    assert step["reward"] == step["rewards/math_verify/mean"] and 0 <= step["accuracy"] <= 1, step


BENCH = ["--benchmarks", "procedural:arithmetic:3", "--max-new-tokens", "8", "--no-progress"]
# Every analysis command; {name} is a path from the fixtures below.
COMMANDS = {
    "evaluate": "evaluate --checkpoint {ck} BENCH",
    "logit-lens": "logit-lens --checkpoint {ck} BENCH",
    "persistence": "persistence --checkpoint {ck} BENCH",
    "unembed-similarity": "unembed-similarity --checkpoint {ck} BENCH",
    "first-token": "first-token --checkpoint {ck} BENCH",
    "path-patching": "path-patching --checkpoint {ck} BENCH",
    "compose": "compose --checkpoint {ck} BENCH",
    "transfer": "transfer --checkpoint {ck} BENCH",
    "token-scaling": "token-scaling --checkpoint {gated} BENCH",
    "select": "select --run {run} --val {run}/val.jsonl BENCH",
    "similarity": "similarity --vectors a={ck} b={dm}",
    "diffmean": "diffmean --traces {traces} --model {base} --label backtracking",
    "behavior": "behavior --vectors {dm} --layer 1 --n 2 --max-new-tokens 8 --task arithmetic",
    "attribution": "attribution --vectors {dm} --traces {traces} --max-examples 2",
    "layer-ablation": "layer-ablation make --model {base} --dataset procedural:arithmetic",
    "diffsae": "diffsae --checkpoint {ck} --layer 2 --samples-per-problem 2 --heldout-fraction 0 --dict-size 16 "
               "--topk 2 --steps 5 --sae-batch-size 4 --permutations 19 BENCH",
}


@pytest.fixture(scope="module")
def qwen_paths(qwen_base_dir, qwen_checkpoint, tmp_path_factory):
    """The base, a steering checkpoint, a token-scaling checkpoint, a DiffMean vector and a run directory, all on the
    real-tokenizer tiny Qwen2."""
    import shutil

    from analysis.__main__ import main
    from steering import token_scaling as ts
    from steering import vectors as sv
    from train import checkpointing as ckpt_io

    root = tmp_path_factory.mktemp("qwen-analysis")
    model = sv.attach_steering(load_base_model(str(qwen_base_dir), dtype="float32"))
    ts.attach_token_scaling(model)
    gated = sv.save_checkpoint(model, root / "gated", base_model=str(qwen_base_dir), extra=ts.checkpoint_extra(model))
    ts.save_token_gates(model, gated)
    assert main(["diffmean", "--traces", str(EXAMPLES), "--model", str(qwen_base_dir), "--label", "backtracking",
                 "--out", str(root / "dm")]) == 0
    run = root / "run"
    for step in (1, 2):
        ckpt_io.write_manifest(shutil.copytree(qwen_checkpoint, run / f"checkpoint-{step}"))
    (run / "val.jsonl").write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                                           for i in range(2)))
    return {"base": qwen_base_dir, "ck": qwen_checkpoint, "gated": gated, "dm": root / "dm" / "backtracking",
            "run": run, "traces": EXAMPLES}


@pytest.mark.filterwarnings("error:Glyph")  # a token drawn as empty boxes fails the command
@pytest.mark.parametrize("command", list(COMMANDS))
def test_analysis_command_on_the_real_tokenizer(command, qwen_paths, tmp_path):
    from analysis.__main__ import main

    out = tmp_path / command
    argv = [a.replace("BENCH", " ".join(BENCH)).format(**qwen_paths) for a in COMMANDS[command].split()]
    argv = [part for a in argv for part in a.split()] + ["--out", str(out)]
    assert main(argv) == 0
    result = json.loads(next(out.glob("*.json")).read_text())
    assert result.get("command", command).split()[0] == command
    for name in result.get("plots", []):
        assert (out / name).stat().st_size > 0


GLYPH_TOKENS = ["别的", " 的", "שלום", "🤣", "Привет", "<think>", "\\boxed{4}", "日本語テキスト"]


@pytest.mark.filterwarnings("error:Glyph")  # matplotlib's "Glyph N missing from font(s)": an empty box in the plot
def test_token_plots_draw_every_script(tmp_path):
    from analysis import plots

    for tok in GLYPH_TOKENS:
        shown = plots.legible(tok)
        for ch in set(tok) - set(shown):  # a character that was not drawn is spelled out with its script
            assert f"{ord(ch):04X}" in shown
    if ord("别") not in plots._covered():  # no CJK font installed (CI): spelled out, with the script named
        assert plots.legible("别的 x") == "[Han 522B 7684] x" and plots.show_token("别的") == "[Han×2]"
        assert plots.show_token("🤣") == "[Sym 1F923]" and plots.show_token("テキスト") == "[Kana×4]"
    plots.token_table(tmp_path / "t.png", [("L0", [(t, float(i)) for i, t in enumerate(GLYPH_TOKENS)])])
    plots.token_highlight(tmp_path / "h.png", GLYPH_TOKENS, list(range(len(GLYPH_TOKENS))), title="别的")
    plots.bar_plot(tmp_path / "b.png", [plots.show_token(t) for t in GLYPH_TOKENS], list(range(len(GLYPH_TOKENS))))
    plots.heatmap(tmp_path / "m.png", [[1.0] * len(GLYPH_TOKENS)], ["r"], [plots.show_token(t) for t in GLYPH_TOKENS])
    assert all((tmp_path / f).stat().st_size > 0 for f in ("t.png", "h.png", "b.png", "m.png"))


def test_vllm_gets_the_same_stops(qwen_base_dir):
    model, tok = load(qwen_base_dir)
    assert get_template("r1").stops(tok, model).vllm_kwargs() == {
        "stop_token_ids": [ENDOFTEXT], "stop": ["</answer>"], "include_stop_str_in_output": True}
    assert get_template("qwen_math").stops(tok, model).vllm_kwargs() == {"stop_token_ids": [ENDOFTEXT, IM_END]}


@pytest.mark.parametrize("extra, message", [
    (["--mask_truncated_completions", "true"], "mask_truncated_completions: template 'r1' ends completions"),
    (["--generation_kwargs", '{"stop": ["x"]}'], "generation_kwargs: ['stop'] are set from the template's stops"),
])
def test_training_refuses_settings_that_fight_the_template_stops(qwen_base_dir, tmp_path, capsys, extra, message):
    import train.__main__ as entry

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    rc = entry.cli(["--model_name_or_path", str(qwen_base_dir), "--template", "r1", "--dataset", str(data),
                    "--val_size", "0", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_export_command_on_the_real_tokenizer(qwen_checkpoint, tmp_path):
    from analysis.__main__ import main
    from steering import vectors as sv

    gguf = tmp_path / "vectors.gguf"
    assert main(["export", "--checkpoint", str(qwen_checkpoint), "--to", "gguf", "--out", str(gguf),
                 "--drop-layer-0"]) == 0
    back, saved = sv.load_vectors(gguf), sv.load_vectors(qwen_checkpoint)
    assert sorted(back) == sorted(saved)[1:] and all(torch.equal(back[l], saved[l]) for l in back)
    assert main(["export", "--checkpoint", str(qwen_checkpoint), "--to", "peft", "--out", str(tmp_path / "p")]) == 0
    assert all(torch.equal(a, b) for a, b in zip(sv.load_vectors(tmp_path / "p").values(), saved.values()))
