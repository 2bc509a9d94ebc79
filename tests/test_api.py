"""The real server, started as a subprocess on loopback, driven with the
official ``openai`` client (and httpx where the raw HTTP matters).

Two servers share the module: ``gla`` (most tests) and ``mamba2`` (a state
budget of 6 sequences, a queue of 2 and an API key: capacity, 503, 401).
Expected tokens come from ``model.greedy_generate`` on the same checkpoint.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from model_registry.checkpoint import load_model
from model_registry.testing import make_tiny_checkpoint
from statex_serve.testing import ServerProcess

from api_helpers import running, server_fixture

GLA_NAME, MAMBA_NAME, API_KEY = "tiny-gla", "tiny-mamba2", "sekret"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}    # tiny models are latency-bound (see test_engine.py)
MAMBA_SLOTS, MAMBA_QUEUE = 6, 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-ckpt")
    return {f: str(make_tiny_checkpoint(root / f, family=f, seed=3)) for f in ("gla", "mamba2")}


@pytest.fixture(scope="module")
def oracles(ckpts):
    torch.set_num_threads(1)
    return {f: load_model(d) for f, d in ckpts.items()}


@pytest.fixture(scope="module")
def mamba_bps(oracles):
    return oracles["mamba2"].state_spec().bytes_per_sequence


@pytest.fixture(scope="module")
def servers(ckpts, mamba_bps):
    gla = ServerProcess(ckpts["gla"], "--served-model-name", GLA_NAME, "--max-num-seqs", "40", "--prefill-chunk",
                        "64", "--max-model-len", "4096", env=ONE_THREAD)
    budget = MAMBA_SLOTS * mamba_bps + mamba_bps // 2
    mamba = ServerProcess(ckpts["mamba2"], "--served-model-name", MAMBA_NAME, "--state-memory", str(budget),
                          "--max-queue", str(MAMBA_QUEUE), "--prefill-chunk", "32", "--api-key", API_KEY,
                          env=ONE_THREAD)
    with running(gla=gla, mamba2=mamba) as started:
        yield started


gla = server_fixture("gla")


@pytest.fixture(scope="module")
def client(gla):
    return openai.OpenAI(base_url=gla.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(ckpts):
    return AutoTokenizer.from_pretrained(ckpts["gla"])


def metric(server: ServerProcess, name: str, headers=None) -> float:
    text = httpx.get(server.base_url + "/metrics", headers=headers).text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_for(cond, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.05)


def ids_of(logprobs_tokens: list[str]) -> list[int]:
    """Tokens of a ``return_tokens_as_token_ids`` logprobs block."""
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


GREEDY = {"temperature": 0.0}
AS_IDS = {"ignore_eos": True, "return_tokens_as_token_ids": True}


# --- the basics -----------------------------------------------------------------------------

def test_models_health_and_startup_log(gla, ckpts, oracles):
    assert httpx.get(gla.base_url + "/health").json() == {"status": "ok"}
    models = openai.OpenAI(base_url=gla.base_url + "/v1", api_key="x").models.list().data
    assert [m.id for m in models] == [GLA_NAME]
    card = httpx.get(gla.base_url + f"/v1/models/{GLA_NAME}").json()
    assert card["root"] == ckpts["gla"] and card["max_model_len"] == 4096
    bps = oracles["gla"].state_spec().bytes_per_sequence
    assert card["statex"]["state_bytes_per_sequence"] == bps
    log = gla.log_tail(100_000)
    assert f"state: {bps} bytes per sequence" in log and "state pool: 40 sequences" in log


def test_completion_equals_the_oracle(client, tok, oracles):
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    r = client.completions.create(model=GLA_NAME, prompt=prompt, max_tokens=12, logprobs=0,
                                  extra_body=AS_IDS, **GREEDY)
    want = oracles["gla"].greedy_generate(ids, 12)
    assert ids_of(r.choices[0].logprobs.tokens) == want
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_every_prompt_form(client, tok, oracles):
    texts = ["alpha", "beta gamma"]
    ids = [tok.encode(t) for t in texts]
    want = [oracles["gla"].greedy_generate(x, 6) for x in ids]
    for prompt in (texts, ids):
        r = client.completions.create(model=GLA_NAME, prompt=prompt, max_tokens=6, logprobs=0,
                                      extra_body=AS_IDS, **GREEDY)
        assert [c.index for c in r.choices] == [0, 1]
        assert [ids_of(c.logprobs.tokens) for c in r.choices] == want
        assert r.usage.prompt_tokens == sum(map(len, ids))
    r = client.completions.create(model=GLA_NAME, prompt=ids[1], max_tokens=6, logprobs=0, extra_body=AS_IDS,
                                  **GREEDY)
    assert ids_of(r.choices[0].logprobs.tokens) == want[1]


def test_streaming_matches_non_streaming(client, gla):
    kw = dict(model=GLA_NAME, prompt="stream me", max_tokens=20, extra_body={"ignore_eos": True}, **GREEDY)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    # the raw event stream ends with the OpenAI terminator
    with httpx.stream("POST", gla.base_url + "/v1/completions", json={**kw, **kw.pop("extra_body"), "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_uses_the_template(client, tok, oracles):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt_ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)
    want = oracles["gla"].greedy_generate(prompt_ids, 10)
    r = client.chat.completions.create(model=GLA_NAME, messages=messages, max_tokens=10, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True}, **GREEDY)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 10
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    content = r.choices[0].logprobs.content
    assert [c.bytes for c in content] == [[t] for t in want]          # byte tokens: exact bytes
    assert all(len(c.top_logprobs) == 2 for c in content)
    chunks = list(client.chat.completions.create(model=GLA_NAME, messages=messages, max_tokens=10, stream=True,
                                                 extra_body={"ignore_eos": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_echo_and_logprobs_score_the_prompt(client, tok, oracles):
    prompt = "Scoring this prompt"
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = oracles["gla"](torch.tensor([ids])).logits[0].log_softmax(-1)
    r = client.completions.create(model=GLA_NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=3,
                                  extra_body={"ignore_eos": True}, **GREEDY)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert abs(lp.token_logprobs[t] - float(ref[t - 1, ids[t]])) < 1e-4
    assert lp.text_offset[:3] == [0, 1, 2]
    # lm-evaluation-harness style: score only (max_tokens=0)
    r = client.completions.create(model=GLA_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1, **GREEDY)
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids)


def test_stop_strings(client):
    base = dict(model=GLA_NAME, prompt="Once upon a time", max_tokens=40, extra_body={"ignore_eos": True},
                **GREEDY)
    full = client.completions.create(**base).choices[0].text
    k, stop = next((k, full[k:k + 2]) for k in range(6, len(full) - 2)
                   if "\ufffd" not in full[k:k + 2] and full.find(full[k:k + 2]) == k)
    r = client.completions.create(stop=[stop, "never-appears"], **base)
    assert r.choices[0].text == full[:k]
    assert r.choices[0].finish_reason == "stop"
    assert getattr(r.choices[0], "stop_reason", None) == stop           # vLLM's extension field
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **base))
    assert streamed == full[:k]
    kw = {**base, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}
    assert client.completions.create(stop=stop, **kw).choices[0].text == full[:k + len(stop)]


def test_n_and_seeds(client, tok, oracles):
    kw = dict(model=GLA_NAME, prompt="Pick a card", max_tokens=12, temperature=1.0, n=3,
              extra_body={"ignore_eos": True})
    a = [c.text for c in client.completions.create(seed=123, **kw).choices]
    b = [c.text for c in client.completions.create(seed=123, **kw).choices]
    c = [c.text for c in client.completions.create(seed=124, **kw).choices]
    assert a == b and len(a) == 3
    assert a != c and len(set(a)) > 1
    streamed = ["", "", ""]
    for chunk in client.completions.create(seed=123, stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == a
    g = client.completions.create(model=GLA_NAME, prompt="Pick a card", max_tokens=8, n=2, logprobs=0,
                                  extra_body=AS_IDS, **GREEDY)
    want = oracles["gla"].greedy_generate(tok.encode("Pick a card"), 8)
    assert [ids_of(ch.logprobs.tokens) for ch in g.choices] == [want, want]


# --- batching -------------------------------------------------------------------------------

def test_32_concurrent_greedy_requests_match_the_oracle(gla, oracles):
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 200))] for _ in range(32)]
    lengths = [rng.randrange(4, 20) for _ in range(32)]
    aclient = openai.AsyncOpenAI(base_url=gla.base_url + "/v1", api_key="x", max_retries=0, timeout=300)

    async def run():
        async def one(p, n):
            r = await aclient.completions.create(model=GLA_NAME, prompt=p, max_tokens=n, logprobs=0,
                                                 extra_body=AS_IDS, **GREEDY)
            return ids_of(r.choices[0].logprobs.tokens)
        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

    got = asyncio.run(run())
    model = oracles["gla"]
    for p, n, g in zip(prompts, lengths, got):
        assert g == model.greedy_generate(p, n)


def test_long_prompt_does_not_stall_other_streams(gla):
    """A prompt of 40 prefill segments: a running stream gets a token in every
    step meanwhile, and its largest gap stays a small part of that prefill."""
    segments = 40
    long_prompt = [random.Random(5).randrange(256) for _ in range(64 * segments)]
    aclient = openai.AsyncOpenAI(base_url=gla.base_url + "/v1", api_key="x", max_retries=0, timeout=300)

    async def run():
        stamps: list[float] = []
        started = asyncio.Event()

        async def streamer():
            s = await aclient.completions.create(model=GLA_NAME, prompt="tick", max_tokens=3000, stream=True,
                                                 logprobs=0, extra_body={"ignore_eos": True}, **GREEDY)
            async for _ in s:          # logprobs make every token its own chunk
                stamps.append(time.monotonic())
                started.set()
        task = asyncio.create_task(streamer())
        await started.wait()
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        s = await aclient.completions.create(model=GLA_NAME, prompt=long_prompt, max_tokens=1, stream=True,
                                             **GREEDY)
        async for _ in s:
            break
        t1 = time.monotonic()
        await s.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        during = [t for t in stamps if t0 <= t <= t1]
        gaps = [b - a for a, b in zip(during, during[1:])]
        return len(during), max(gaps), t1 - t0

    tokens_during, max_gap, prefill_time = asyncio.run(run())
    assert tokens_during >= segments - 2, (tokens_during, prefill_time)
    assert max_gap < prefill_time / 4, (max_gap, prefill_time)
    wait_for(lambda: metric(gla, "statex_state_pool_slots_used") == 0, what="slots to free")


# --- errors ---------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", '{"prompt": "x",', 400, None, "invalid_json"),
    ("/v1/completions", "[1, 2]", 400, None, None),
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty_prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [99999]}, 400, "prompt", "invalid_token_id"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "a" * 5000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k", None),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", None),
    ("/v1/completions", {"prompt": "x", "min_p": 0.5}, 400, "min_p", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", None),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty", None),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", None),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": "high"}, 400, "repetition_penalty", None),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens",
     None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": -2.01}, 400,
     "presence_penalty", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model",
     "model_not_found"),
    ("/v1/does-not-exist", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(gla, path, body, status, param, code):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(gla.base_url + path, content=data, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] and err["param"].split(".")[0] == param, err
    if code is not None:
        assert err["code"] == code, err
    ok = httpx.post(gla.base_url + "/v1/completions", json={"prompt": "still alive", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_openai_client_sees_the_statuses(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=GLA_NAME, prompt="x", max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_client_disconnect_frees_the_slot(gla):
    aborted = metric(gla, "statex_engine_requests_aborted_total")
    body = {"model": GLA_NAME, "prompt": "a long story", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", gla.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert metric(gla, "statex_state_pool_slots_used") == 1
    wait_for(lambda: metric(gla, "statex_state_pool_slots_used") == 0, 10, "the slot to be freed")
    # a non-streaming client that gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gla.base_url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    wait_for(lambda: metric(gla, "statex_state_pool_slots_used") == 0, 10, "the slot to be freed")
    assert metric(gla, "statex_engine_requests_aborted_total") >= aborted + 2


# --- the mamba2 server: state budget, queue, API key -----------------------------------------

def test_api_key_is_required(servers):
    url = servers["mamba2"].base_url
    body = {"model": MAMBA_NAME, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.post(url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_state_budget_sets_capacity_and_a_full_queue_answers_503(servers, mamba_bps, ckpts, oracles):
    srv = servers["mamba2"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert metric(srv, "statex_state_bytes_per_sequence") == mamba_bps
    budget = MAMBA_SLOTS * mamba_bps + mamba_bps // 2
    assert metric(srv, "statex_state_pool_slots_total") == budget // mamba_bps == MAMBA_SLOTS
    assert metric(srv, "statex_state_pool_bytes") == MAMBA_SLOTS * mamba_bps
    body = {"model": MAMBA_NAME, "prompt": "hold", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=srv.base_url, headers=auth, timeout=60,
                      limits=httpx.Limits(max_connections=32)) as http, contextlib.ExitStack() as stack:
        for _ in range(MAMBA_SLOTS + MAMBA_QUEUE):      # fast, before the engine admits any
            assert stack.enter_context(http.stream("POST", "/v1/completions", json=body)).status_code == 200
        wait_for(lambda: metric(srv, "statex_state_pool_slots_used") == MAMBA_SLOTS
                 and metric(srv, "statex_requests_waiting") == MAMBA_QUEUE,
                 what=lambda: f"a full pool and queue: {httpx.get(srv.base_url + '/metrics').text[-1500:]}")
        r = http.post("/v1/completions", json={**body, "stream": False})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["message"]
    wait_for(lambda: metric(srv, "statex_state_pool_slots_used") == 0
             and metric(srv, "statex_requests_waiting") == 0, what="everything to be freed")
    # and it still serves, exactly
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0)
    ids = AutoTokenizer.from_pretrained(ckpts["mamba2"]).encode("after the storm")
    r = client.completions.create(model=MAMBA_NAME, prompt="after the storm", max_tokens=10, logprobs=0,
                                  extra_body=AS_IDS, **GREEDY)
    assert ids_of(r.choices[0].logprobs.tokens) == oracles["mamba2"].greedy_generate(ids, 10)
    chat = client.chat.completions.create(model=MAMBA_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 5


def test_tokenize_and_detokenize(gla, tok):
    r = httpx.post(gla.base_url + "/tokenize", json={"model": GLA_NAME, "prompt": "héllo"}).json()
    assert r["tokens"] == tok.encode("héllo") and r["count"] == len(r["tokens"])
    r = httpx.post(gla.base_url + "/detokenize", json={"model": GLA_NAME, "tokens": tok.encode("héllo")}).json()
    assert r["prompt"] == "héllo"


# --- vLLM's benchmark client ------------------------------------------------------------------

BENCH = textwrap.dedent("""
    import json, sys
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    results = {}
    for backend, endpoint in (("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")):
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args(["--backend", backend, "--base-url", sys.argv[1], "--endpoint", endpoint,
                                  "--model", sys.argv[2], "--tokenizer", sys.argv[3], "--dataset-name", "random",
                                  "--random-input-len", "24", "--random-output-len", "8", "--num-prompts", "12",
                                  "--max-concurrency", "6", "--seed", "0", "--disable-tqdm", "--temperature", "0"])
        r = main(args)
        results[backend] = {k: r[k] for k in ("completed", "failed", "total_output_tokens", "mean_ttft_ms")}
    print("BENCH-RESULT " + json.dumps(results))
""")


def test_vllm_benchmark_client_runs_clean(gla, ckpts):
    proc = subprocess.run([sys.executable, "-c", BENCH, gla.base_url, GLA_NAME, ckpts["gla"]], capture_output=True,
                          text=True, timeout=240, env={**os.environ, **ONE_THREAD})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH-RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(line.removeprefix("BENCH-RESULT "))
    for backend, r in results.items():
        assert r["completed"] == 12 and r["failed"] == 0, (backend, r)
        assert r["total_output_tokens"] == 12 * 8, (backend, r)
