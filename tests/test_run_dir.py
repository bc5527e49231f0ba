"""The run directory's names and files have one owner, train/checkpointing.py: analysis finds a run's checkpoints,
final model and metrics file (whatever the config named it) through it; the model card says what the run trained."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from analysis.__main__ import main
from steering import vectors as sv
from train import checkpointing as ckpt_io
from train.model_card import CardFacts, render_card

ROOT = Path(__file__).resolve().parents[1]


def make_run(run, base_dir, steps, *, training_config=None):
    """Complete steering checkpoints at ``steps``, as training leaves them (without run.json)."""
    base = sv.load_base_model(str(base_dir), dtype="float32")
    model = sv.attach_steering(base)
    for step in steps:
        vector = torch.full((base.config.hidden_size,), float(step))
        sv.set_vectors(model, {layer: vector for layer in sv.steered_layers(model)})
        ckpt = sv.save_checkpoint(model, ckpt_io.checkpoint_dir(run, step), base_model=str(base_dir), step=step,
                                  training_config=training_config)
        ckpt_io.write_manifest(ckpt)
    return run


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_names_are_transformers_and_parse_back(tmp_path):
    ckpt = ckpt_io.checkpoint_dir(tmp_path, 7)
    assert ckpt == tmp_path / f"{PREFIX_CHECKPOINT_DIR}-7"  # where transformers' Trainer writes step 7
    assert ckpt_io.checkpoint_step(ckpt) == 7
    assert ckpt_io.final_dir(tmp_path) == tmp_path / ckpt_io.FINAL
    for not_a_checkpoint in (ckpt_io.final_dir(tmp_path), tmp_path / "checkpoint-x", tmp_path / "checkpoint-7b"):
        with pytest.raises(ValueError, match="is not named checkpoint-<step>"):
            ckpt_io.checkpoint_step(not_a_checkpoint)


def test_no_other_module_spells_the_run_directory_names():
    """`checkpoint-`, `final/` and `metrics.jsonl` are spelt in train/checkpointing.py only (the config's default
    metrics_file is the one other place the name may appear: it is what the run records)."""
    spellings = {
        "checkpoint prefix": re.compile(r"""["']checkpoint-"""),
        "final directory": re.compile(r"""/\s*["']final["']|["']final/"""),
        "metrics file": re.compile(r"""["']metrics\.jsonl["']"""),
    }
    allowed = {("train/checkpointing.py", name) for name in spellings} | {("train/config.py", "metrics file")}
    found = []
    for path in sorted(p for pkg in ("steering", "train", "analysis") for p in (ROOT / pkg).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        found += [(rel, name) for name, pattern in spellings.items() if pattern.search(text)]
    assert [f for f in found if f not in allowed] == []


def test_read_metrics_keeps_objects_in_order_and_counts_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n\n[1, 2]\n{"step": 2, "reward": 0.7}\n{"step": 3, "rew')
    rows, bad = ckpt_io.read_metrics(path)
    assert rows == [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.7}]
    assert bad == 2  # the list and the line a killed trainer left half-written


def test_the_run_records_its_metrics_file_when_it_starts(tmp_path):
    ckpt_io.prepare_run_dir(tmp_path, overwrite=False, metrics_file="log/steps.jsonl")
    assert ckpt_io.metrics_path(tmp_path) == tmp_path / "log" / "steps.jsonl"


def test_select_reads_the_metrics_file_the_run_recorded(tiny_base_dir, tmp_path, capsys):
    """metrics_file: val-log.jsonl; a metrics.jsonl next to it would pick another checkpoint if it were read."""
    run = make_run(tmp_path / "run", tiny_base_dir, (10, 20, 30))
    ckpt_io.write_run_record(run, metrics_file="val-log.jsonl")
    write_lines(run / "val-log.jsonl", [{"step": s, "eval_accuracy": a} for s, a in ((10, 0.1), (20, 0.6), (30, 0.3))])
    write_lines(run / "metrics.jsonl", [{"step": s, "eval_accuracy": a} for s, a in ((10, 0.9), (20, 0.1), (30, 0.1))])
    assert main(["select", "--run", str(run)]) == 0
    report = json.loads((run / "select.json").read_text())
    assert report["validation_selected"]["checkpoint"] == ckpt_io.checkpoint_dir(run, 20).name
    assert report["val_source"]["path"] == str((run / "val-log.jsonl").resolve())
    assert "validation-selected: checkpoint-20 (val 60.00%)" in capsys.readouterr().out


def test_select_reads_an_older_runs_metrics_file_from_its_steering_json(tiny_base_dir, tmp_path):
    """A run trained before run.json existed: its checkpoints' training config names the file."""
    run = make_run(tmp_path / "run", tiny_base_dir, (10, 20), training_config={"metrics_file": "older.jsonl"})
    write_lines(run / "older.jsonl", [{"step": 10, "eval_accuracy": 0.2}, {"step": 20, "eval_accuracy": 0.4}])
    assert ckpt_io.metrics_path(run) == run / "older.jsonl"
    assert main(["select", "--run", str(run), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "select.json").read_text())["validation_selected"]["step"] == 20


def test_select_on_a_run_that_records_no_metrics_file_is_one_line_error(tiny_base_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_base_dir, (10,))
    write_lines(run / "metrics.jsonl", [{"step": 10, "eval_accuracy": 0.2}])  # not guessed: the run does not name it
    capsys.readouterr()  # the base's loading messages
    assert main(["select", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records no metrics file name" in err and "--metrics FILE" in err, err
    assert main(["select", "--run", str(run), "--metrics", str(run / "metrics.jsonl"),
                 "--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("adapter", ["steering", "lora", "full"])
def test_model_card_says_how_each_adapter_loads(adapter):
    facts = CardFacts(base_model="Qwen/Qwen2.5-Math-1.5B", adapter=adapter,
                      layers=[3, 5] if adapter == "steering" else None, token_scaling=False,
                      settings={"learning_rate": 0.001, "metrics_file": "metrics.jsonl", "val_temperature": 0.0},
                      validation=None, base_accuracy=None, val_problems=0)
    card = render_card(facts, run_dir=False)
    assert card.startswith("---\nlibrary_name: ") and "base_model: Qwen/Qwen2.5-Math-1.5B\n" in card
    assert "| `learning_rate` | `0.001` |" in card and "No held-out validation" in card
    assert ("Steered layers: 3, 5." in card) == (adapter == "steering")
    assert ("python -m analysis serve --checkpoint DIR" in card) == (adapter == "steering")
    assert ('PeftModel.from_pretrained(base, "DIR")' in card) == (adapter != "full")
    assert ('AutoModelForCausalLM.from_pretrained("DIR")' in card) == (adapter == "full")
    assert "[None]" not in card and "pipeline(" not in card
    run_card = render_card(facts, run_dir=True)
    assert f"`{ckpt_io.FINAL}/`" in run_card and "`metrics.jsonl`" in run_card
