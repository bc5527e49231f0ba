"""Every analysis command on the offline demo checkpoint, when one exists (skipped otherwise).

The demo checkpoint is ``assets/demo-checkpoint`` (committed; made by ``python -m train --config configs/demo.yaml``). The problems are
the demo's own procedural task (recorded in the checkpoint), 16 of them, so each command takes seconds on CPU. Each
command's ``result.json`` is checked against what its module docstring documents: the keys, the shapes (one row per
steered layer of the demo checkpoint, ...), and the identities between its numbers (a diagonal of 1, a score formula).
"""

import json
import math
from itertools import combinations
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo-checkpoint"
LIMIT = 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DEMO / "steering.json").is_file(), reason=f"no demo checkpoint at {DEMO}")]

COMMANDS = [
    ["logit-lens"], ["persistence"], ["unembed-similarity"], ["first-token", "--layers", "all"],
    ["path-patching", "--no-heads"], ["compose"], ["transfer"],
]


def numbers(value):
    """Every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def accuracy_details(value):
    """Every per-benchmark evaluation record (``{"accuracy", "num_problems", ...}``) in a JSON value."""
    if isinstance(value, dict):
        own = [value] if {"accuracy", "num_problems"} <= set(value) else []
        return own + [d for v in value.values() for d in accuracy_details(v)]
    if isinstance(value, list):
        return [d for v in value for d in accuracy_details(v)]
    return []


def is_accuracy(x) -> bool:
    return 0.0 <= x <= 1.0


def check_logit_lens(result, meta):
    assert [row["layer"] for row in result["layers"]] == meta["layers"]
    vocab_size = result["vocab"]["size"]
    for row in [*result["layers"], result["final_shift"]]:
        top, bottom = [t["value"] for t in row["top"]], [t["value"] for t in row["bottom"]]
        assert len(top) == len(bottom) == result["k"]
        assert top == sorted(top, reverse=True) and bottom == sorted(bottom) and min(top) > max(bottom)
        assert all(0 <= t["token_id"] < vocab_size for t in row["top"] + row["bottom"])
    for row in result["layers"]:
        assert row["vector_norm"] == pytest.approx(meta["vector_norms"][str(row["layer"])], rel=1e-5)
    assert result["final_shift"]["num_sequences"] == LIMIT


def check_persistence(result, meta):
    steer, target = result["steer_layers"], result["target_layers"]
    assert steer == meta["layers"] and target == list(range(meta["num_hidden_layers"]))
    for key in ("cos_to_vector", "cos_to_mean", "delta_norm", "mean_shift_cos_to_vector"):
        matrix = result[key]
        assert [len(row) for row in matrix] == [len(target)] * len(steer), key
        for i, row in zip(steer, matrix):
            assert all((x is None) == (j < i) for j, x in zip(target, row)), key  # null exactly where j < i
    for r, i in enumerate(steer):
        c = target.index(i)
        # Steering layer i alone shifts layer i's own output by exactly its vector, at every token.
        assert result["cos_to_vector"][r][c] == pytest.approx(1.0, abs=1e-6)
        assert result["delta_norm"][r][c] == pytest.approx(meta["vector_norms"][str(i)], rel=1e-5)
    cosines = numbers([result[k] for k in ("cos_to_vector", "cos_to_mean", "mean_shift_cos_to_vector")])
    assert all(-1 - 1e-6 <= x <= 1 + 1e-6 for x in cosines)
    assert all(x >= 0 for x in numbers(result["delta_norm"]))
    assert result["num_sequences"] == LIMIT


def check_unembed_similarity(result, meta):
    labels = result["labels"]
    assert result["steer_layers"] == meta["layers"]
    assert labels == [str(i) for i in meta["layers"]] + ["all"] and set(result["shift_norms"]) == set(labels)
    cosine = result["cosine"]
    assert [len(row) for row in cosine] == [len(labels)] * len(labels)
    for a in range(len(labels)):
        assert cosine[a][a] == pytest.approx(1.0, abs=1e-6)
        assert all(cosine[a][b] == pytest.approx(cosine[b][a]) and -1 - 1e-6 <= cosine[a][b] <= 1 + 1e-6
                   for b in range(len(labels)))
    assert [r["label"] for r in result["readouts"]] == labels
    assert all(len(r["top"]) == len(r["bottom"]) == result["k"] for r in result["readouts"])
    assert all(norm > 0 for norm in result["shift_norms"].values())


def check_first_token(result, meta):
    assert result["layers"] == meta["layers"]
    gain = result["position_gain"]
    assert len({len(v) for v in gain.values()}) == 1 and gain["positions"] == list(range(len(gain["positions"])))
    assert gain["count"][0] == LIMIT and all(kl >= 0 for kl in gain["mean_kl"])
    assert 0.0 <= result["first_position_share"] <= 1.0
    first = result["first_token"]
    assert first["num_prompts"] == LIMIT and first["kl"] >= 0
    for row in first["top_gained"] + first["top_lost"]:
        assert row["gain"] == pytest.approx(row["p_steered"] - row["p_base"], abs=1e-5)
        assert is_accuracy(row["p_steered"]) and is_accuracy(row["p_base"])
    assert first["top_gained"][0]["gain"] > 0 > first["top_lost"][0]["gain"]
    sub = result["substitution"]
    assert sub["source"] == "top_gained" and sub["token"] == first["top_gained"][0]["token"]
    assert all(is_accuracy(sub[k]) for k in ("acc_base", "acc_steered", "acc_substituted"))
    if sub["acc_steered"] != sub["acc_base"]:
        assert sub["recovered"] == pytest.approx(
            (sub["acc_substituted"] - sub["acc_base"]) / (sub["acc_steered"] - sub["acc_base"]))


def check_path_patching(result, meta):
    layer = meta["num_hidden_layers"] - 2
    assert result["layer"] == layer and result["target_layer"] == layer + 1
    assert result["vector_norm"] == pytest.approx(meta["vector_norms"][str(layer)], rel=1e-5)
    base_config = json.loads((REPO / meta["base_model"] / "config.json").read_text())
    attention = result["attention"]
    assert attention["n_heads"] == base_config["num_attention_heads"]
    assert attention["n_kv_heads"] == base_config["num_key_value_heads"]
    assert attention["n_heads"] * attention["head_dim"] == base_config["hidden_size"]
    variants = {v["name"]: v for v in result["variants"]}
    assert len(variants) == len(result["variants"])  # names are unique
    assert {"base", "full", "skip-attn", "skip-layer"} <= set(variants)
    assert {f"{a}-{p}-all" for a in ("remove", "inject") for p in "qkv"} <= set(variants)
    assert variants["full"]["kl_to_full"] == 0.0
    assert all(v["family"] == "summary" and v["kl_to_full"] >= 0 and is_accuracy(v["accuracy"])
               for v in variants.values())
    assert result["heads"] is None  # --no-heads


def check_compose(result, meta):
    layers = meta["layers"]
    assert result["layers"] == layers and [s["layer"] for s in result["singles"]] == layers
    assert [p["layers"] for p in result["pairs"]] == [list(pair) for pair in combinations(layers, 2)]
    single = {s["layer"]: s["accuracy"] for s in result["singles"]}
    for pair in result["pairs"]:
        i, j = pair["layers"]
        assert pair["max_single"] == max(single[i], single[j])
        if result["all_layer_accuracy"] != pair["max_single"]:
            assert pair["score"] == pytest.approx((pair["accuracy"] - pair["max_single"])
                                                  / (result["all_layer_accuracy"] - pair["max_single"]))
        r, c = layers.index(i), layers.index(j)
        assert result["score_matrix"][r][c] == result["score_matrix"][c][r] == pair["score"]
        assert result["pair_accuracy_matrix"][r][c] == result["pair_accuracy_matrix"][c][r] == pair["accuracy"]
    assert all(result["score_matrix"][r][r] is None for r in range(len(layers)))


def check_transfer(result, meta):
    (donor,), (recipient,) = result["donors"], result["recipients"]
    assert donor["layers"] == meta["layers"] and donor["hidden_size"] == recipient["hidden_size"] == meta["hidden_size"]
    assert recipient["num_hidden_layers"] == meta["num_hidden_layers"]
    assert result["incompatible"] == []
    # The demo checkpoint on its own base is the recipient's self-trained run: its score is 1 by definition.
    assert result["accuracy"] == [[recipient["self_trained_accuracy"]]]
    if recipient["self_trained_accuracy"] != recipient["base_accuracy"]:
        assert result["score"] == [[pytest.approx(1.0)]]


CHECKS = {"logit-lens": check_logit_lens, "persistence": check_persistence,
          "unembed-similarity": check_unembed_similarity, "first-token": check_first_token,
          "path-patching": check_path_patching, "compose": check_compose, "transfer": check_transfer}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_command_on_demo_checkpoint(command, tmp_path):
    from analysis.__main__ import main
    from steering import vectors as sv

    meta = sv.read_meta(DEMO)
    if command[0] in ("persistence", "unembed-similarity", "compose") and len(meta["layers"]) < 2:
        pytest.skip("needs a checkpoint with at least two steered layers")
    if command[0] == "path-patching" and meta["num_hidden_layers"] - 2 not in meta["layers"]:
        pytest.skip("the demo checkpoint has no vector at layer L-2")
    if command[0] == "first-token" and len(meta["layers"]) == 1:
        command = ["first-token"]
    out = tmp_path / command[0]
    assert main([*command, "--checkpoint", str(DEMO), "--out", str(out), "--limit", str(LIMIT), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["command"] == command[0]
    assert result["settings"]["limit"] == LIMIT
    assert all(math.isfinite(x) for x in numbers(result))
    for detail in accuracy_details(result):
        assert is_accuracy(detail["accuracy"]) and detail["num_problems"] == LIMIT
    CHECKS[command[0]](result, meta)
    for name in result["plots"]:
        assert (out / name).stat().st_size > 1000
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
