"""Evaluation settings have one owner (``steering.evaluation.EvalSettings``): the analysis flags declare its defaults,
turn back into it, name their flag in errors; commands' own defaults take effect; training validation builds it from
the training config; a checkpoint's ``steering.json`` is re-read when it changes."""

import argparse
import dataclasses
import json

import pytest

from analysis import cli, settings
from analysis.__main__ import build_parser
from steering.evaluation import EvalSettings
from steering.rewards import GradingOptions


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_the_flags_defaults_are_the_settings_defaults():
    args = parse("evaluate", "--benchmarks", "six", "--out", "o")
    assert settings.from_args(args) == EvalSettings()


def test_every_flag_reaches_its_field():
    args = parse("evaluate", "--benchmarks", "six", "--out", "o", "--temperature", "0.5", "--top-p", "0.9",
                 "--top-k", "7", "--max-new-tokens", "33", "--max-length", "99", "-k", "3", "--seeds", "4", "5",
                 "--batch-size", "8", "--reward-timeout", "1.5", "--reward-float-rounding", "3", "--no-reward-strict",
                 "--backend", "static", "--vllm-kv-cache-gb", "0.5", "--vllm-gpu-memory-utilization", "0.4")
    assert settings.from_args(args) == EvalSettings(
        temperature=0.5, top_p=0.9, top_k=7, max_new_tokens=33, max_length=99, num_samples=3, seeds=(4, 5),
        batch_size=8, timeout_s=1.5, grading=GradingOptions(float_rounding=3, strict=False), backend="static",
        vllm_kv_cache_gb=0.5, vllm_gpu_memory_utilization=0.4)


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--reward-timeout", "0"], "--reward-timeout must be > 0"),
    (["--reward-timeout", "inf"], "--reward-timeout must be at most 3600 seconds"),
    (["--reward-timeout", "1e7"], "--reward-timeout must be at most 3600 seconds"),
    (["--reward-timeout", "nan"], "--reward-timeout must be > 0"),
    (["--reward-float-rounding", "-1"], "--reward-float-rounding must be an integer >= 0"),
    (["--seeds", "1", "1"], "--seeds has duplicates: [1, 1]"),
    (["-k", "0"], "--num-samples must be >= 1"),
    (["--vllm-gpu-memory-utilization", "0"], "--vllm-gpu-memory-utilization must be in (0, 1]"),
])
def test_a_bad_value_is_a_usage_error_naming_its_flag(flags, message):
    with pytest.raises(cli.UsageError) as e:
        settings.check(parse("evaluate", "--benchmarks", "six", "--out", "o", *flags))
    assert str(e.value).startswith(message)


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        parse(command, "--help")
    return capsys.readouterr().out


def test_a_commands_own_defaults_take_effect_and_show_in_its_help(capsys):
    for command in ("logit-lens", "persistence", "unembed-similarity", "token-scaling"):  # as docs/analysis.md says
        assert parse(command, "--checkpoint", "c", "--out", "o").max_new_tokens == 512, command
    behaviour = parse("behavior", "--vectors", "v", "--layer", "1", "--out", "o")
    assert (behaviour.temperature, behaviour.max_new_tokens, behaviour.dtype) == (0.0, 256, "float32")
    evaluate = parse("evaluate", "--benchmarks", "six", "--out", "o")
    assert (evaluate.temperature, evaluate.max_new_tokens, evaluate.dtype) == (1.0, 4096, None)
    assert "(default 512)" in " ".join(help_of("logit-lens", capsys).split())
    assert "(default 0.0;" in " ".join(help_of("behavior", capsys).split())


def test_training_validation_settings_come_from_the_config(tmp_path):
    from train.config import parse_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: m\ndataset: procedural:arithmetic\noutput_dir: out\nuse_cpu: true\n"
                   "bf16: false\n")
    c = parse_config(["--config", str(cfg), "--val_temperature", "0.7", "--max_completion_length", "40", "--seed",
                      "9", "--val_batch_size", "5", "--reward_timeout", "3", "--reward_numeric_precision", "10"])
    got = c.eval_settings()
    assert (got.temperature, got.max_new_tokens, got.seeds, got.batch_size, got.timeout_s) == (0.7, 40, (9,), 5, 3.0)
    assert got.grading == GradingOptions(numeric_precision=10) == c.grading_options()
    assert got.sampling_params().do_sample and not dataclasses.replace(got, temperature=0.0).sampling_params().do_sample


def test_checkpoint_meta_is_read_again_after_the_file_changes(tiny_checkpoint, tmp_path):
    import shutil

    ck = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    assert cli.base_model_id(None, ck) == json.loads((ck / "steering.json").read_text())["base_model"]
    meta = json.loads((ck / "steering.json").read_text())
    (ck / "steering.json").write_text(json.dumps({**meta, "base_model": "Org/Other-Model-Name"}))
    assert cli.base_model_id(None, ck) == "Org/Other-Model-Name"
    cli.checkpoint_meta(ck)["base_model"] = "mutated"  # a copy: the next reader sees the file
    assert cli.checkpoint_meta(ck)["base_model"] == "Org/Other-Model-Name"
