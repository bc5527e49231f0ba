"""Probes inside the training loop (train/probes.py): they never change training, and they report what the analysis
commands report for the checkpoint of the same step."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import spy_on_weight_loaders
from steering import vectors as sv

ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = ROOT / "assets" / "demo-base"
K = 5


def small_config(tmp_path, name, **overrides):
    """configs/demo.yaml shrunk to a few seconds a step (as tests/test_train.py)."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.update(model_name_or_path=str(DEMO_BASE), build_demo_base=False, procedural_size=300, val_size=16,
               val_steps=0, num_generations=4, per_device_train_batch_size=16, max_completion_length=24,
               max_steps=2, save_steps=1, output_dir=str(tmp_path / name), plot_curves=False, learning_rate=0.05)
    cfg.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def probe_rows(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r for r in rows if r.get("event") == "probe"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-step run with probes off, then on (every step, the off run's last checkpoint as reference)."""
    from train.__main__ import main, parse_config

    tmp = tmp_path_factory.mktemp("probes")
    off = main(parse_config(["--config", str(small_config(tmp, "off"))]))
    on = main(parse_config(["--config", str(small_config(
        tmp, "on", probe_steps=1, probe_size=4, probe_k=K, probe_vectors=str(tmp / "off" / "checkpoint-2"),
        plot_curves=True))]))
    return off, on, tmp


def test_probes_do_not_change_the_trained_vectors(runs):
    off, on, tmp = runs
    assert sorted(probe_rows(tmp / "on")) == [1, 2] and not probe_rows(tmp / "off")
    a, b = sv.get_vectors(off.model), sv.get_vectors(on.model)
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for v in a.values())
    for layer in a:
        assert torch.equal(a[layer], b[layer]), layer  # bitwise


def test_cosine_to_the_runs_own_checkpoint_is_one(runs):
    off, on, tmp = runs
    own = sv.load_vectors(tmp / "on" / "checkpoint-2")
    reference = sv.load_vectors(tmp / "off" / "checkpoint-2")
    assert all(torch.equal(own[l], reference[l]) for l in own)  # the reference *is* the run's checkpoint-2
    rows = probe_rows(tmp / "on")
    for layer in own:
        assert rows[2][f"probe/cos_ref/{layer}"] == pytest.approx(1.0, abs=1e-12)
        assert rows[1][f"probe/cos_ref/{layer}"] < 1.0 - 1e-9
        assert rows[2][f"probe/norm/{layer}"] == pytest.approx(float(own[layer].norm()))
        assert rows[1][f"probe/cos_start/{layer}"] == pytest.approx(1.0)  # zero init: the start is the first probe
        assert rows[2][f"probe/cos_prev/{layer}"] == rows[2][f"probe/cos_start/{layer}"]


def test_plots_are_written(runs):
    _, _, tmp = runs
    for name in ("probes_vectors.png", "probes_references.png", "probes_tokens.png"):
        assert (tmp / "on" / name).stat().st_size > 1000, name


@pytest.mark.parametrize("step", [1, 2])
def test_probe_equals_the_analysis_commands_on_the_checkpoint_of_that_step(runs, step):
    from analysis.__main__ import main

    _, _, tmp = runs
    row, ck, out = probe_rows(tmp / "on")[step], tmp / "on" / f"checkpoint-{step}", tmp / f"analysis-{step}"
    assert main(["logit-lens", "--checkpoint", str(ck), "--k", str(K), "--no-shift", "--out", str(out / "lens"),
                 "--no-progress"]) == 0
    lens = json.loads((out / "lens" / "result.json").read_text())["layers"]
    assert [e["layer"] for e in lens] == [e["layer"] for e in row["lens"]]
    for theirs, ours in zip(lens, row["lens"]):
        for side in ("top", "bottom"):
            assert [t["token"] for t in ours[side]] == [t["token"] for t in theirs[side]]
            assert [t["value"] for t in ours[side]] == pytest.approx([t["value"] for t in theirs[side]], rel=1e-6)
            assert ours[f"{side}_non_english_share"] == theirs[f"{side}_non_english_share"]
    assert main(["first-token", "--checkpoint", str(ck), "--layers", "all", "--k", str(K), "--no-substitution",
                 "--benchmarks", str(tmp / "on" / "probe_problems.jsonl"), "--max-new-tokens", "4",
                 "--out", str(out / "first"), "--no-progress"]) == 0
    first = json.loads((out / "first" / "result.json").read_text())["first_token"]
    ours = row["first_token"]
    assert first["num_prompts"] == ours["num_prompts"] == 4
    assert first["kl"] == pytest.approx(ours["kl"], rel=1e-5) and row["probe/first_token_kl"] == ours["kl"]
    for key in ("top_gained", "top_lost"):
        assert [t["token"] for t in ours[key]] == [t["token"] for t in first[key]]
        assert [t["gain"] for t in ours[key]] == pytest.approx([t["gain"] for t in first[key]], rel=1e-5, abs=1e-7)


def _checkpoint(path, *, hidden, base_model):
    from steering.tiny import tiny_model

    model = sv.attach_steering(tiny_model("qwen2", num_hidden_layers=3, hidden_size=hidden,
                                          intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2))
    sv.set_vectors(model, {l: torch.ones(hidden) for l in sv.steered_layers(model)})
    return sv.save_checkpoint(model, path, base_model=base_model, step=1)


@pytest.mark.parametrize("case", ["missing", "wrong shape", "other base", "probes off"])
def test_bad_probe_vectors_is_one_line_and_exit_2_before_weights_load(tmp_path, case, capsys, monkeypatch):
    from train.__main__ import cli

    hidden = json.loads((DEMO_BASE / "config.json").read_text())["hidden_size"]
    path, words = {
        "missing": (tmp_path / "nowhere", ["neither a directory nor a .gguf file"]),
        "wrong shape": (_checkpoint(tmp_path / "h48", hidden=48, base_model=str(DEMO_BASE)), ["hidden size [48]"]),
        "other base": (_checkpoint(tmp_path / "other", hidden=hidden, base_model="Qwen/Qwen2.5-Math-1.5B"),
                       ["made for the base 'Qwen/Qwen2.5-Math-1.5B'"]),
        "probes off": (ROOT / "assets" / "demo-checkpoint", ["probe_steps"]),
    }[case]
    probe_steps = 0 if case == "probes off" else 5
    loads = spy_on_weight_loaders(monkeypatch)  # after _checkpoint, which builds a model
    code = cli(["--config", str(small_config(tmp_path, "bad")), "--probe_steps", str(probe_steps),
                "--probe_vectors", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "probe_vectors" in err, err
    assert all(w in err for w in words), err
    assert loads == []


def test_probe_settings_are_checked():
    from train.config import ConfigError, SteeringGRPOConfig

    base = dict(model_name_or_path="m", dataset="procedural:arithmetic", output_dir="o", use_cpu=True, bf16=False)
    for bad, word in (({"probe_steps": -1}, "probe_steps"), ({"probe_steps": 5, "probe_size": 0}, "probe_size"),
                      ({"probe_steps": 5, "val_size": 0}, "val_size"),
                      ({"probe_steps": 5, "adapter": "lora"}, "adapter: steering")):
        with pytest.raises(ConfigError, match=word):
            SteeringGRPOConfig(**base, **bad)


def test_probe_problems_are_written_for_replay(runs):
    """The probe batch, as a file ``analysis first-token --benchmarks`` reads."""
    _, _, tmp = runs
    lines = (tmp / "on" / "probe_problems.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all({"question", "answer"} <= set(json.loads(l)) for l in lines)
