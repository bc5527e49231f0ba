"""Configuration: every shipped YAML parses, presets apply, overrides win, bad input is one line + exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import PRESETS, ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
# GPU recipes set bf16: true, which TrainingArguments rejects on a machine without a GPU.
CPU = [] if __import__("torch").cuda.is_available() else ["--bf16", "false", "--use_cpu", "true"]
TRAIN_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
LAUNCH_YAMLS = sorted((ROOT / "launch").rglob("*.yaml"))


def test_there_are_configs_for_the_paper_recipes():
    names = {p.stem for p in TRAIN_CONFIGS}
    for model in ("qwen2.5-math-1.5b", "qwen2.5-math-7b"):
        for data in ("deepscaler", "math", "gsm8k"):
            assert f"{model}-{data}" in names
    assert {"llama-3.1-8b-deepscaler", "llama-3.1-8b-instruct-deepscaler", "demo"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_training_config_parses(path):
    s = g = parse_config(["--config", str(path), *CPU])
    raw = yaml.safe_load(path.read_text())
    assert s.model_name_or_path == raw["model_name_or_path"]
    assert g.learning_rate == raw["learning_rate"]
    if raw.get("preset") == "paper":
        assert g.loss_type == "dapo" and g.scale_rewards == "none" and g.beta == 0.0
        assert s.advantage_estimator == "rloo" and g.max_grad_norm == 2.0
        assert g.lr_scheduler_type == "constant_with_warmup"
        # one on-policy step per generation batch
        assert g.num_iterations == 1 and g.steps_per_generation == g.gradient_accumulation_steps


@pytest.mark.parametrize("path", LAUNCH_YAMLS, ids=lambda p: p.name)
def test_every_launch_yaml_parses(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    if "sweeps" in path.parts:
        assert data["command"][:2] == ["accelerate", "launch"] and "train" in data["command"]
        # W&B renders ${args} as --name=value; every combination must be accepted by the parser
        config = data["command"][data["command"].index("--config") + 1]
        params = data["parameters"]
        first = {k: v["values"][0] for k, v in params.items()}
        last = {k: v["values"][-1] for k, v in params.items()}
        for combo in (first, last):
            args = [f"--{k}={v}" for k, v in combo.items()]
            s = g = parse_config(["--config", str(ROOT / config), *args, *CPU])
            if "layers" in combo:
                assert s.layers == [combo["layers"]]
            if "loss_type" in combo:
                assert g.loss_type == combo["loss_type"]
            assert g.learning_rate == pytest.approx(float(combo["learning_rate"]))
    else:
        assert data["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")


def test_precedence_defaults_preset_yaml_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: paper\nmodel_name_or_path: m\ndataset: procedural:arithmetic\nmax_grad_norm: 3.0\n"
                   "output_dir: out\nuse_cpu: true\nbf16: false\n")
    s = g = parse_config(["--config", str(cfg)])
    assert g.max_grad_norm == 3.0  # YAML beats preset
    assert g.warmup_steps == PRESETS["paper"]["warmup_steps"]  # preset beats default
    s = g = parse_config(["--config", str(cfg), "--max_grad_norm", "5", "--layers", "1", "2",
                         "--layer_lr", '{"2": 0.5}'])
    assert g.max_grad_norm == 5.0 and s.layers == [1, 2] and s.layer_lr == {2: 0.5}


@pytest.mark.parametrize("yaml_text,needle", [
    ("model_name_or_path: m\ndataset: d\nbogus_key: 1\n", "unknown key(s) ['bogus_key']"),
    ("model_name_or_path: m\ndataset: d\nlearning_rate: 0\n", "learning_rate"),
    ("model_name_or_path: m\ndataset: d\nlearning_rate: -1.0\n", "learning_rate"),
    ("model_name_or_path: m\ndataset: d\nadapter: qlora\n", "adapter"),
    ("model_name_or_path: m\ndataset: d\npreset: nope\n", "preset"),
    ("model_name_or_path: m\ndataset: d\nadvantage_estimator: rloo\nscale_rewards: group\n", "scale_rewards: none"),
    ("model_name_or_path: m\ndataset: d\nlayer_lr: {3: 0}\n", "layer_lr"),
    ("model_name_or_path: m\ndataset: d\nreward_float_rounding: -1\n", "reward_float_rounding"),
    ("model_name_or_path: m\ndataset: d\nreward_numeric_precision: 0\n", "reward_numeric_precision"),
    ("dataset: d\n", "model_name_or_path"),
    ("model_name_or_path: m\ndataset: d\nnum_generations: 3\nper_device_train_batch_size: 8\n", "divisible"),
    # hostile numbers (issue 25): each was accepted, or failed later with a traceback or a misleading exit code
    ("model_name_or_path: m\ndataset: d\nreward_timeout: .inf\n", "reward_timeout: inf is not a finite number"),
    ("model_name_or_path: m\ndataset: d\nreward_timeout: 1.0e+7\n", "reward_timeout: must be at most 3600"),
    ("model_name_or_path: m\ndataset: d\nreward_timeout: .nan\n", "reward_timeout"),
    ("model_name_or_path: m\ndataset: d\nreward_timeout: 0\n", "reward_timeout: must be > 0"),
    ("model_name_or_path: m\ndataset: d\nlearning_rate: .inf\n", "learning_rate: inf must be a finite number > 0"),
    ("model_name_or_path: m\ndataset: d\nlearning_rate: .nan\n", "learning_rate: nan must be a finite number > 0"),
    ("model_name_or_path: m\ndataset: d\ninit_scale: .nan\n", "init_scale"),
    ("model_name_or_path: m\ndataset: d\ninit_scale: {1: .inf}\n", "init_scale"),
    ("model_name_or_path: m\ndataset: d\nlayer_lr: {1: .inf}\n", "layer_lr"),
    ("model_name_or_path: m\ndataset: d\nmax_grad_norm: .inf\n", "max_grad_norm"),
    ("model_name_or_path: m\ndataset: d\nmax_steps: -5\n", "max_steps: -5"),
    ("model_name_or_path: m\ndataset: d\nmax_steps: 0\n", "max_steps: 0"),
    ("model_name_or_path: m\ndataset: d\nper_device_train_batch_size: 0\n", "per_device_train_batch_size: 0"),
    ("model_name_or_path: m\ndataset: d\nper_device_train_batch_size: -4\n", "per_device_train_batch_size: -4"),
    ("model_name_or_path: m\ndataset: d\ngradient_accumulation_steps: 0\n", "gradient_accumulation_steps: 0"),
    ("model_name_or_path: m\ndataset: d\nmax_completion_length: 0\n", "max_completion_length: 0"),
    ("model_name_or_path: m\ndataset: d\nnum_generations: 0\n", "num_generations: 0"),
    ("model_name_or_path: m\ndataset: d\nlearning_rate: 0.1\nlearning_rate: 0.2\n", "'learning_rate' is given twice"),
    ("model_name_or_path: m\ndataset: d\n[1, 2]: 3\n", "is not a name"),
])
def test_bad_configs_raise_one_line_errors(tmp_path, yaml_text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "output_dir: out\n" + "use_cpu: true\nbf16: false\n")
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(cfg)])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "taken").write_text("a file")
    cfg.write_text(f"model_name_or_path: m\ndataset: d\noutput_dir: {tmp_path / 'taken'}\nuse_cpu: true\nbf16: false\n")
    with pytest.raises(ConfigError, match="output_dir: .* is a file; give a directory"):
        parse_config(["--config", str(cfg)])


def test_reward_grading_options(tmp_path):
    from steering.rewards import GradingOptions

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: m\ndataset: procedural:arithmetic\noutput_dir: out\n"
                   "use_cpu: true\nbf16: false\n")
    s = parse_config(["--config", str(cfg)])
    assert s.grading_options() == GradingOptions()  # math-verify's defaults
    s = parse_config(["--config", str(cfg), "--reward_float_rounding", "3", "--reward_strict", "false",
                         "--reward_allow_set_relation_comp", "true"])
    assert s.grading_options() == GradingOptions(float_rounding=3, strict=False, allow_set_relation_comp=True)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_exit_code_2_before_any_model_loads(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: /nonexistent/model\ndataset: procedural:arithmetic\noutput_dir: o\n"
                   "template: qwen_math\nuse_cpu: true\nbf16: false\n")
    r = run_cli("--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model_name_or_path" in r.stderr
    r = run_cli("--config", str(cfg), "--no_such_flag", "1")
    assert r.returncode == 2
    r = run_cli("--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_template_without_question_placeholder_is_rejected(tmp_path, tiny_base_dir):
    tpl = tmp_path / "t.txt"
    tpl.write_text("Solve it.\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_base_dir}\ndataset: procedural:arithmetic\noutput_dir: {tmp_path}/o\n"
                   f"template: {tpl}\nuse_cpu: true\nbf16: false\n")
    r = run_cli("--config", str(cfg))
    assert r.returncode == 2 and "{question}" in r.stderr


def test_layer_out_of_range_and_missing_columns(tmp_path, tiny_base_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "solution": "2"}\n')
    base = f"model_name_or_path: {tiny_base_dir}\noutput_dir: {tmp_path}/o\nuse_cpu: true\nbf16: false\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(base + "dataset: procedural:arithmetic\nlayers: [0, 7]\n")
    r = run_cli("--config", str(cfg))
    assert r.returncode == 2 and "layers" in r.stderr and "0..2" in r.stderr
    cfg.write_text(base + f"dataset: {data}\n")
    r = run_cli("--config", str(cfg))
    assert r.returncode == 2 and "question_column" in r.stderr
