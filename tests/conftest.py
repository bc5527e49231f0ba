import os

# Tests never touch the network: the Hub is unreachable on CI, and W&B must not try to log in.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from steering import compat


def pytest_configure(config):
    # After pyproject's "error::FutureWarning" / "error::DeprecationWarning": later filters win.
    for category, message in compat.THIRD_PARTY_DEPRECATIONS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")

# Tiny models are far faster single-threaded (no thread start-up per matmul, no oversubscription on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny random-weight Qwen2 model + char tokenizer saved like a Hub model (loads with from_pretrained)."""
    from steering.tiny import build_char_tokenizer, tiny_model

    out = tmp_path_factory.mktemp("tiny-base")
    model = tiny_model("qwen2", seed=0)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    build_char_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base_dir, tmp_path_factory):
    """A steering checkpoint with random vectors on every layer of ``tiny_base_dir``."""
    from steering import vectors as sv

    base = sv.load_base_model(str(tiny_base_dir), dtype="float32")
    model = sv.attach_steering(base)
    g = torch.Generator().manual_seed(0)
    sv.set_vectors(model, {l: torch.randn(base.config.hidden_size, generator=g) for l in sv.steered_layers(model)})
    return sv.save_checkpoint(model, tmp_path_factory.mktemp("ck") / "checkpoint-1", base_model=str(tiny_base_dir), step=1)
