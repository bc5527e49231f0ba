"""Every entry of ``steering.compat`` against the installed transformers / TRL / torch: the name exists, with the
signature the project relies on, and using it raises no deprecation warning (pytest turns those into errors). An
upgrade that renames one of them fails here, naming it, instead of breaking a run. And no private name of those
libraries is used anywhere else in the project."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, TrainingArguments

from steering import compat
from steering import vectors as sv
from steering.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["qwen2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_kwarg_is_the_installed_name_and_fills_a_real_cache(arch):
    model = tiny_model(arch)
    key = compat.cache_kwarg(model)
    assert key in compat.CACHE_KWARGS
    for module in (model, model.model, model.model.layers[0], sv.attach_steering(tiny_model(arch))):
        assert compat.cache_kwarg(module) == key
    assert key in inspect.signature(type(model.model.layers[0].self_attn).forward).parameters
    cache = DynamicCache(config=model.config)
    x = torch.randint(4, 90, (1, 5))
    with torch.no_grad():
        first = model(input_ids=x[:, :3], use_cache=True, **{key: cache})
        assert cache.get_seq_length() == 3
        step = model(input_ids=x[:, 3:], use_cache=True, **{key: cache})
        full = model(input_ids=x).logits
    torch.testing.assert_close(torch.cat([first.logits, step.logits], dim=1), full, rtol=1e-5, atol=1e-5)


def test_training_arg_names_are_fields_of_the_installed_training_arguments():
    from trl import GRPOConfig

    fields = TrainingArguments.__dataclass_fields__
    for new, old in compat.ACTIVATION_CHECKPOINTING_ARGS.items():
        name = compat.training_arg_name(new)
        assert name == compat.training_arg_name(old) and name in fields and name in GRPOConfig.__dataclass_fields__
        assert name == (new if new in fields else old)
    assert compat.training_arg_name("learning_rate") == "learning_rate"
    args = GRPOConfig(output_dir="unused", report_to=[], use_cpu=True,  # no deprecation warning: it would fail here
                      **{compat.training_arg_name("gradient_checkpointing"): True,
                         compat.training_arg_name("gradient_checkpointing_kwargs"): {"use_reentrant": False}})
    assert getattr(args, compat.training_arg_name("gradient_checkpointing")) is True


def test_activation_checkpointing_enables_without_a_warning():
    model = sv.attach_steering(tiny_model("qwen2"))
    assert not compat.activation_checkpointing_enabled(model)
    compat.enable_activation_checkpointing(model)
    assert compat.activation_checkpointing_enabled(model)


def test_attn_implementation_reads_what_the_public_setter_sets():
    model = tiny_model("qwen2")
    assert compat.attn_implementation(model) in ("sdpa", "eager")
    model.set_attn_implementation("eager")
    assert compat.attn_implementation(sv.attach_steering(model)) == "eager"


def test_trl_vllm_generation_still_uses_the_names_the_vectors_only_sync_relies_on():
    """TRL's own ``VLLMGeneration`` sets and clears the sleep flag, and writes colocated weights through the path the
    vectors-only sync (and its tests' fakes) use."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    source = inspect.getsource(VLLMGeneration)
    assert f"self.{compat.VLLM_SLEEPING_ATTR} = False" in source
    assert f"self.{compat.VLLM_SLEEPING_ATTR} = self.enable_sleep_mode" in source
    assert "self." + ".".join(compat.VLLM_COLOCATED_MODEL_PATH) + ".load_weights(" in source
    assert callable(VLLMGeneration.sync_weights)
    assert list(inspect.signature(DistributedBackend.__init__).parameters) == ["self", "accelerator"]
    assert list(inspect.signature(DistributedBackend.gather_params).parameters) == ["self", "params"]


def test_gather_params_is_a_no_op_without_deepspeed():
    """Without ZeRO-3 the gather runs its body once and leaves every parameter as it was (the same storage, values and
    trainability), inside and after it, as the vectors-only sync relies on when it reads the vectors inside; an error
    in the body is not swallowed."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    params = [torch.nn.Parameter(torch.arange(3.0)), torch.nn.Parameter(torch.randn(2, 4))]

    def state():
        return [(p.data_ptr(), p.shape, p.detach().clone(), p.requires_grad) for p in params]

    def same(a, b):
        return all(x[:2] == y[:2] and torch.equal(x[2], y[2]) and x[3] == y[3] for x, y in zip(a, b, strict=True))

    before, entered = state(), 0
    with compat.gather_params(accelerator, iter(params)):  # any iterable of parameters
        entered += 1
        assert same(state(), before)
    assert entered == 1 and same(state(), before)
    with pytest.raises(RuntimeError, match="raised inside"):
        with compat.gather_params(accelerator, params):
            raise RuntimeError("raised inside the gather")


# Private names of transformers / TRL / PEFT / vLLM the project once used, and the deprecated spellings of renamed
# public ones: none may appear outside steering/compat.py.
FORBIDDEN = [
    r"(?<![a-z])_attn_implementation\b", r"_llm_weights_sleeping", r"\.driver_worker\b", r"_pad_token_tensor",
    r"\._generate_single_turn\b", r"\._generate_and_score_completions\b", r"\._dist\b", r"\._tokenizer\b",
    r"\._save_checkpoint\b", r"\._load_from_checkpoint\b", r"\._load_rng_state\b", r"\._run_epoch\b",
    r"\._get_output_dir\b", r"\._name_or_path\b", r"add_fused_lm_head", r"past_key_values\s*=",
    r"gradient_checkpointing_enable\(", r"gradient_checkpointing_disable\(", r"is_gradient_checkpointing",
    r"\._calculate_rewards\b", r"torch\._dynamo\.",
]


def test_no_private_library_name_outside_the_compat_module():
    offenders = []
    for path in sorted(ROOT.glob("*/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] not in ("steering", "train", "analysis", "tests") or rel in (
                "steering/compat.py", "tests/test_compat.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            offenders += [f"{rel}:{i}: {line.strip()}" for pattern in FORBIDDEN if re.search(pattern, code)]
    assert not offenders, "\n".join(offenders)


def test_deprecations_are_errors_except_the_listed_third_party_ones():
    import warnings

    with pytest.raises(FutureWarning):
        warnings.warn("a deprecated call of our own", FutureWarning)
    with pytest.raises(DeprecationWarning):
        warnings.warn("another", DeprecationWarning)
    model = tiny_model("qwen2")
    model.is_gradient_checkpointing  # what PEFT calls inside PeftModel.__init__: ignored by exact message (5.24)
    for category, message in compat.THIRD_PARTY_DEPRECATIONS:
        # each pattern is the whole message: it ends with the message's final period, or with $ where it has none
        assert issubclass(category, DeprecationWarning | FutureWarning) and message.endswith(("\\.", "$"))
