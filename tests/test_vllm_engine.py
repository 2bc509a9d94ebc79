"""``statex-serve --backend vllm``: our OpenAI-compatible API over vLLM's
AsyncLLM (``statex_serve.engine.vllm_engine``), as a real server process.

Expected tokens come from ``model.greedy_generate``; expected text from the
checkpoint's tokenizer, so the vLLM backend and the native engine agree.
vLLM is a hard requirement (no skip).
"""
from __future__ import annotations

import json
import os

import httpx
import pytest
import vllm  # noqa: F401  (a missing vLLM must fail, not skip)
from transformers import AutoTokenizer

from model_registry.checkpoint import load_model
from model_registry.testing import make_tiny_checkpoint
from statex_serve.testing import ServerProcess, penalized_greedy

NAME = "tiny-mamba2-vllm"
PROMPTS = [[(31 * i + 7) % 256 for i in range(n)] for n in (1, 12, 90)]


TRAINED_LEN = 1024     # what the checkpoint's statex.json says it was trained at: the default context


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("vllm_backend") / "mamba2", "mamba2", expanded=True, seed=5)
    provenance = json.loads((path / "statex.json").read_text())
    (path / "statex.json").write_text(json.dumps({**provenance, "post_training": {"seq_len": TRAINED_LEN}}))
    return str(path)


@pytest.fixture(scope="module")
def oracle(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def client(ckpt):
    # no --max-model-len and no VLLM_CPU_KVCACHE_SPACE: the defaults a user gets
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    server = ServerProcess(ckpt, "--backend", "vllm", "--served-model-name", NAME, "--max-num-seqs", "8",
                           "--prefill-chunk", "32", env=env, startup_timeout=300)
    server.launch().wait_ready()
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            yield c
    finally:
        server.stop()


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_says_vllm_backend(client):
    (m,) = client.get("/v1/models").json()["data"]
    assert m["id"] == NAME and m["statex"]["backend"] == "vllm"


def test_default_context_and_state_budget_are_the_checkpoints_not_vllms(client):
    """The trained length, not the config's 2^20; vLLM's state memory sized from
    --max-num-seqs (2 pages per sequence with prefix caching), not 90% of the machine."""
    (m,) = client.get("/v1/models").json()["data"]
    assert m["max_model_len"] == TRAINED_LEN
    assert m["statex"]["max_num_seqs"] == 8 and m["statex"]["vllm_state_blocks"] == 2 * 8


def test_greedy_tokens_and_text_equal_the_oracle(client, oracle, tok):
    for p in PROMPTS:
        r = complete(client, prompt=p, max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
        exp = oracle.greedy_generate(p, 10)
        choice = r["choices"][0]
        assert choice["text"] == tok.decode(exp, skip_special_tokens=True), f"prompt len {len(p)}"
        assert len(choice["logprobs"]["token_logprobs"]) == 10
        assert r["usage"] == {**r["usage"], "prompt_tokens": len(p), "completion_tokens": 10}


@pytest.mark.parametrize("penalties", [{"presence_penalty": 1.5, "frequency_penalty": 0.5},
                                       {"repetition_penalty": 2.5}], ids=str)
def test_penalties_reach_vllm(client, oracle, penalties):
    p = PROMPTS[1]
    exp = penalized_greedy(oracle, p, 16, penalties.get("presence_penalty", 0.0),
                           penalties.get("frequency_penalty", 0.0), penalties.get("repetition_penalty", 1.0))
    assert exp != oracle.greedy_generate(p, 16), "the penalties change nothing here: a useless case"
    r = complete(client, prompt=p, max_tokens=16, temperature=0, ignore_eos=True, logprobs=0,
                 return_tokens_as_token_ids=True, **penalties)
    assert [int(t.removeprefix("token_id:")) for t in r["choices"][0]["logprobs"]["tokens"]] == exp


def test_streaming_equals_non_streaming(client):
    body = dict(prompt="Recurrent state", max_tokens=12, temperature=0, ignore_eos=True)
    full = complete(client, **body)["choices"][0]["text"]
    pieces, finish = [], None
    with client.stream("POST", "/v1/completions", json={"model": NAME, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"])
                finish = choice.get("finish_reason") or finish
    assert "".join(pieces) == full and finish == "length"


def test_stop_string_cuts_the_text(client, oracle, tok):
    p = PROMPTS[1]
    full = tok.decode(oracle.greedy_generate(p, 24))
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    r = complete(client, prompt=p, max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    choice = r["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"


def test_sampling_n_with_seed_is_reproducible(client):
    body = dict(prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=42, n=3, ignore_eos=True)
    a, b = complete(client, **body), complete(client, **body)
    assert sorted(c["index"] for c in a["choices"]) == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]


def test_a_seed_that_would_stop_vllms_cpu_engine_is_refused(client):
    """vLLM 0.32 on CPU dies on a seeded request whose prompt takes several
    prefill steps (--prefill-chunk 32 here): the request gets a 400 naming the
    seed, and the engine goes on serving."""
    r = client.post("/v1/completions", json={"model": NAME, "prompt": PROMPTS[2], "max_tokens": 4,
                                             "temperature": 1.0, "seed": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    assert complete(client, prompt=PROMPTS[2], max_tokens=4, temperature=1.0)["choices"][0]["text"] is not None


def test_errors_are_openai_errors(client):
    r = client.post("/v1/completions", json={"model": NAME, "prompt": [100000], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": NAME, "prompt": [1] * 1000, "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 4})
    assert r.status_code == 404


def test_chat_completion(client):
    r = client.post("/v1/chat/completions", json={"model": NAME, "max_tokens": 6, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
