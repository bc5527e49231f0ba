import json
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


def pytest_addoption(parser):
    parser.addoption("--require-vllm", action="store_true",
                     help="a test marked vllm that skips is a failure (CI's vllm leg, where vLLM is installed)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("vllm") and item.config.getoption("--require-vllm"):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: a vLLM test skipped under --require-vllm ({report.longrepr})"


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


QWEN_TOKENIZER_DATA = os.path.join(os.path.dirname(__file__), "data", "qwen2.5-tokenizer")
QWEN_VOCAB = 151936  # Qwen2.5's embedding rows (151,643 BPE tokens + specials + padding)
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """The real Qwen2.5 tokenizer and chat template (tests/data/qwen2.5-tokenizer, tokenizer.json xz-compressed),
    unpacked where ``AutoTokenizer.from_pretrained`` reads it. Its EOS is ``<|im_end|>`` (an instruct model's)."""
    import lzma
    import shutil

    out = tmp_path_factory.mktemp("qwen2.5-tokenizer")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(os.path.join(QWEN_TOKENIZER_DATA, name), out / name)
    with lzma.open(os.path.join(QWEN_TOKENIZER_DATA, "tokenizer.json.xz")) as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def save_tiny_qwen(out, tokenizer_dir, *, seed: int = 0, model=None, flavour: str = "base"):
    """Save a tiny random Qwen2 (or ``model``) with the real Qwen2.5 vocabulary and tokenizer as a Hub-style model.

    The end tokens are written as the real checkpoints write them. ``"base"`` (Qwen2.5-Math-1.5B): the tokenizer's EOS,
    ``config.json`` and ``generation_config.json`` all say ``<|endoftext|>`` (151643), although a chat turn ends with
    ``<|im_end|>``. ``"instruct"``: the tokenizer's EOS and ``config.json`` say ``<|im_end|>`` (151645),
    ``generation_config.json`` both."""
    from transformers import AutoTokenizer

    from steering.tiny import tiny_model

    if model is None:
        model = tiny_model("qwen2", seed=seed, vocab_size=QWEN_VOCAB, max_position_embeddings=1024)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if flavour == "base":
        tok.eos_token = "<|endoftext|>"
        model.config.eos_token_id = model.generation_config.eos_token_id = ENDOFTEXT
    elif flavour == "instruct":
        model.config.eos_token_id, model.generation_config.eos_token_id = IM_END, [IM_END, ENDOFTEXT]
    else:
        raise ValueError(f"flavour must be 'base' or 'instruct', got {flavour!r}")
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.bos_token_id = ENDOFTEXT, ENDOFTEXT
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen_base_dir(qwen_tokenizer_dir, tmp_path_factory):
    """A tiny random Qwen2 (vocab 151936) on the real Qwen2.5 tokenizer, saved like a Hub model."""
    return save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen-real-tok"), qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen_checkpoint(qwen_base_dir, tmp_path_factory):
    """A steering checkpoint with random vectors on every layer of ``qwen_base_dir``."""
    from steering import vectors as sv

    base = sv.load_base_model(str(qwen_base_dir), dtype="float32")
    model = sv.attach_steering(base)
    g = torch.Generator().manual_seed(1)
    sv.set_vectors(model, {l: 0.5 * torch.randn(base.config.hidden_size, generator=g) for l in sv.steered_layers(model)})
    return sv.save_checkpoint(model, tmp_path_factory.mktemp("qwen-ck") / "checkpoint-1", base_model=str(qwen_base_dir),
                              step=1)


def corrupt_checkpoint(kind, ckpt, tmp):
    """A copy of ``ckpt`` broken one way (issue 25's corrupt steering checkpoints)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from steering import vectors as sv
    from steering.files import sha256_file

    bad = tmp / f"bad-{kind}"
    shutil.copytree(ckpt, bad)
    weights = bad / sv.ADAPTER_WEIGHTS_FILE
    meta = json.loads((bad / sv.META_FILE).read_text())
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        tensors = load_file(str(weights))
        key = sorted(tensors)[0]
        if kind == "nan":
            tensors[key] = torch.full_like(tensors[key], float("nan"))
        elif kind == "wrong hidden size":
            tensors = {k: torch.zeros(1, 48) for k in tensors}
        elif kind == "extra layer":
            tensors[key.replace(".0.", ".7.")] = tensors[key].clone()
            meta["layers"] = sorted(meta["layers"] + [7])
        save_file(tensors, str(weights))
        meta["adapter_sha256"] = sha256_file(weights)  # a consistent file: only its content is wrong
        (bad / sv.META_FILE).write_text(json.dumps(meta))
    return bad


class WeightsLoaded(BaseException):
    """Raised by the weight-loader spy to stop a command at its first weight load. A BaseException, so that no
    ``except Exception`` of the command can swallow it; the test asserts afterwards on what the spy recorded."""


# Everything that reads model weights, as (module, class or None, attribute): transformers' and PEFT's entry points,
# and the project's own loaders (which call them, but are spied on too so that a loader moved to another library is
# still caught). A spy's label is the dotted path it replaces, e.g. "transformers.AutoModelForCausalLM.from_pretrained".
WEIGHT_LOADERS = [
    ("transformers", "AutoModelForCausalLM", "from_pretrained"),
    ("transformers", "AutoModelForCausalLM", "from_config"),
    ("transformers", "PreTrainedModel", "from_pretrained"),
    ("peft", "PeftModel", "from_pretrained"),
    ("steering.vectors", None, "load_base_model"),
    ("steering.vectors", None, "load_steered_model"),
    ("analysis.cli", None, "load_steerable"),
    ("analysis.cli", None, "load_plain"),
    ("analysis.evaluate", None, "load_row_model"),  # evaluate / select's row loader, imported by name
    ("train.__main__", None, "build_model"),
]


def spy_on_weight_loaders(monkeypatch) -> list[str]:
    """Replace every loader of ``WEIGHT_LOADERS`` by a spy that records its label and raises ``WeightsLoaded``.
    Returns the list the labels go to, in call order: ``[]`` afterwards means no weights loaded. Call it directly
    when the test must load a model itself first; otherwise use the ``weight_loads`` fixture."""
    import importlib

    calls: list[str] = []
    for module, cls, name in WEIGHT_LOADERS:
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        label = ".".join(filter(None, (module, cls, name)))

        def spy(*args, _label=label, **kwargs):
            calls.append(_label)
            raise WeightsLoaded(_label)

        monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.fixture
def weight_loads(monkeypatch):
    """``spy_on_weight_loaders`` for the whole test (session and module fixtures, built first, may load models)."""
    return spy_on_weight_loaders(monkeypatch)
