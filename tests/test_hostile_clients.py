"""Hostile and careless clients against the real server: one request
never hurts another, every request's work and memory are bounded, and the
prefix cache leaks nothing across API keys or ``cache_salt`` scopes.

Two servers share the module: ``srv`` (two API keys from a key file, small
limits so the abuse is cheap) and ``faulty`` (faults injected into the engine
by a launcher that patches it before ``statex_serve.cli.main`` runs; each fault
is keyed to a request field no ordinary request uses). Every abuse case is
followed by ordinary requests whose greedy answers must equal the oracle's.
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from model_registry.testing import make_tiny_checkpoint
from statex_serve.testing import ServerProcess

from api_helpers import oracle, running, server_fixture  # noqa: F401 - oracle is a fixture

KEY_A, KEY_B = "key-of-alice", "key-of-bob"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MAX_LEN, DEFAULT_MAX_TOKENS, MAX_LOGPROBS, STALL_TIMEOUT = 65536, 40, 20, 8.0
BODY_LIMIT = 12 << 20

# Faults for the ``faulty`` server, each set off by one odd field value.
FAULTS = """
import sys, time
from statex_serve.engine import native, sampler, scheduler, sequence

_sample, _samples = sampler.sample, {}
def sample(logits, rows):
    for r in rows:          # from its third token on (in a decode batch with others)
        if r.top_k == 77:
            _samples[id(r.generator)] = _samples.get(id(r.generator), 0) + 1
            if _samples[id(r.generator)] >= 3:
                raise RuntimeError("injected sampler failure SECRET-INTERNAL")
    if any(r.top_k == 42 for r in rows):
        time.sleep(4)                                   # a hung step
    return _sample(logits, rows)
sampler.sample = sample

_plan = scheduler.Scheduler._plan_prefix
def plan(self, req):
    if req.params.seed == -13:
        raise RuntimeError("injected admission failure")
    return _plan(self, req)
scheduler.Scheduler._plan_prefix = plan

_finish = sequence.SequenceState.finish
def finish(self, reason, stop_reason=None):
    if reason == "abort" and self.params.seed == -17:
        raise RuntimeError("injected abort failure")
    return _finish(self, reason, stop_reason)
sequence.SequenceState.finish = finish

_schedule = scheduler.Scheduler.schedule
def schedule(self, *a, **kw):
    if any(r.params.seed == -19 for r in self.running.values()):
        raise RuntimeError("injected loop failure")
    return _schedule(self, *a, **kw)
scheduler.Scheduler.schedule = schedule

from statex_serve.cli import main
sys.exit(main(sys.argv[1:]))
"""


class FaultyServer(ServerProcess):
    """The real CLI, with ``FAULTS`` patched into the engine first."""

    def launch(self):
        import os
        import subprocess
        cmd = [sys.executable, "-c", FAULTS, "--model", self.model_dir, "--host", "127.0.0.1", "--port",
               str(self.port), *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})})
        return self


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "gla", family="gla", seed=5))


@pytest.fixture(scope="module")
def tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text(f"# two tenants\n{KEY_A}\n\n{KEY_B}\n")
    srv = ServerProcess(ckpt, "--api-key-file", str(keyfile), "--max-num-seqs", "16", "--prefill-chunk", "64",
                        "--max-model-len", str(MAX_LEN), "--max-request-body", str(BODY_LIMIT),
                        "--default-max-tokens", str(DEFAULT_MAX_TOKENS), "--max-logprobs", str(MAX_LOGPROBS),
                        "--stream-stall-timeout", str(STALL_TIMEOUT), env=ONE_THREAD)
    faulty = FaultyServer(ckpt, "--max-num-seqs", "8", "--max-model-len", "4096", "--step-timeout", "1",
                          env=ONE_THREAD)
    with running(srv=srv, faulty=faulty) as started:
        yield started


srv = server_fixture("srv")
faulty = server_fixture("faulty")


def metric(server, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


INNOCENT_TOKENS = 300      # long enough to be decoding when the bad requests come
INNOCENT = ["the first tenant", "a second prompt", "three little words", "and a fourth one"]


def greedy_body(prompt: str, max_tokens: int = 24) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}


def token_ids(response_json: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in response_json["choices"][0]["logprobs"]["tokens"]]


def run_innocents_beside(server, headers, bad_bodies, oracle, tok) -> list[httpx.Response]:
    """Four greedy requests in flight while ``bad_bodies`` arrive; every innocent
    answer must equal the oracle's. Returns the bad requests' responses."""
    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=120) as http:
            innocents = [asyncio.create_task(http.post("/v1/completions", json=greedy_body(p, INNOCENT_TOKENS)))
                         for p in INNOCENT]
            await asyncio.sleep(0.3)             # they are decoding now
            bad = await asyncio.gather(*(http.post("/v1/completions", content=b if isinstance(b, bytes)
                                                   else json.dumps(b).encode(),
                                                   headers={"content-type": "application/json"})
                                         for b in bad_bodies))
            return bad, await asyncio.gather(*innocents)
    bad, good = asyncio.run(run())
    for prompt, r in zip(INNOCENT, good):
        assert r.status_code == 200, r.text
        assert token_ids(r.json()) == oracle.greedy_generate(tok.encode(prompt), INNOCENT_TOKENS), prompt
    return bad


def check_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# --- 1. one request never fails others -------------------------------------------------------

HUGE = 2**63


def test_out_of_range_sampling_fields_are_400_and_hurt_nobody(srv, oracle, tok):
    bad = [
        ({"top_k": HUGE, "temperature": 1}, "top_k"),
        ({"top_k": 2**31, "temperature": 1}, "top_k"),
        ({"seed": 2**64, "temperature": 1}, "seed"),
        ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
        ({"logit_bias": {str(HUGE): 1}}, "logit_bias"),
        ({"min_tokens": HUGE, "max_tokens": 4}, "min_tokens"),
        ({"n": HUGE}, "n"),
        ({"max_tokens": HUGE}, None),
    ]
    bodies = [{"prompt": "x", "max_tokens": 4, **fields} for fields, _ in bad]
    bodies.append(b'{"prompt": "x", "temperature": NaN, "max_tokens": 4}')
    responses = run_innocents_beside(srv, A, bodies, oracle, tok)
    for (fields, param), r in zip(bad, responses):
        err = check_error(r, 400)
        if param is not None:
            assert err["param"].split(".")[0] == param, (fields, err)
    check_error(responses[-1], 400, "temperature")


def test_a_failure_inside_a_step_fails_only_its_request(faulty, oracle, tok):
    """The sampler fails on one row of a decode batch: that request gets a 500
    that names no internals; the others in the same batch finish exactly."""
    bodies = [{"prompt": "boom", "max_tokens": 8, "temperature": 1.0, "top_k": 77, "ignore_eos": True}] * 2
    for r in run_innocents_beside(faulty, {}, bodies, oracle, tok):
        err = check_error(r, 500)
        assert "SECRET-INTERNAL" not in r.text and "RuntimeError" not in r.text, err
        assert "cmpl-" in err["message"], err          # the id to look the details up by in the log
    assert "SECRET-INTERNAL" in faulty.log_tail(200_000)       # the details are in the log
    wait_for(lambda: metric(faulty, "statex_state_pool_slots_used") == 0, what="slots to be freed")


# --- 2. the event loop never blocks ----------------------------------------------------------

def poll_health(server, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            httpx.get(server.base_url + "/health", timeout=30)
        finally:
            worst.append(time.monotonic() - t0)
        time.sleep(0.05)


def test_health_answers_within_a_second_during_a_10mb_prompt(srv):
    big = "a" * (10 << 20)
    stop, times = threading.Event(), []
    poller = threading.Thread(target=poll_health, args=(srv, stop, times))
    poller.start()
    try:
        with httpx.Client(base_url=srv.base_url, headers=A, timeout=120) as http:
            t0 = time.monotonic()
            r = http.post("/v1/completions", json={"prompt": big, "max_tokens": 1})
            err = check_error(r, 400, "prompt")
            assert err["code"] == "context_length_exceeded", err
            r = http.post("/tokenize", json={"prompt": big})
            check_error(r, 400, "prompt")
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]})
            check_error(r, 400, "messages")
            # long but within the bound: tokenized off the event loop
            r = http.post("/tokenize", json={"prompt": "ab" * 100_000})
            assert r.status_code == 200 and r.json()["count"] >= 200_000
            elapsed = time.monotonic() - t0
    finally:
        stop.set()
        poller.join()
    assert len(times) >= 3 and max(times) < 1.0, (max(times), len(times), elapsed)


def raw_request(server, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes]:
    """Send a request by hand (a body shorter than its Content-Length, say) and
    return the status and what came back."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1]), data


def content_length(response_head: bytes) -> int:
    for line in response_head.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_key_and_size_are_checked_before_the_body_is_read(srv):
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 50000000\r\n{auth}\r\n")
    # no key: 401 at once, though 50 MB are announced and none sent
    status, data = raw_request(srv, head.format(auth=""), b'{"prompt": ')
    assert status == 401, data
    status, data = raw_request(srv, head.format(auth=f"Authorization: Bearer {KEY_A}\r\n"), b'{"prompt": ')
    assert status == 413 and b"max-request-body" in data, data
    # a chunked body that grows past the limit
    r = httpx.post(srv.base_url + "/v1/completions", headers={**A, "content-type": "application/json"},
                   content=iter([b'{"prompt": "', b"a" * BODY_LIMIT, b'"}']), timeout=30)
    check_error(r, 413)


# --- 3. the prefix cache leaks nothing across scopes -------------------------------------------

SECRET = "The vault code name is BLUEBIRD-7731, tell no one."


def cached(server, headers, prompt, **extra) -> int:
    r = httpx.post(server.base_url + "/v1/completions", headers=headers, timeout=60,
                   json={"prompt": prompt, "max_tokens": 1, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_prefix_cache_hits_stay_within_a_key_and_a_salt(srv):
    prompt = SECRET * 3
    cached(srv, A, prompt)
    assert cached(srv, A, prompt) > 0                      # the owner hits its own prompt
    assert cached(srv, B, prompt) == 0                     # another key does not
    assert cached(srv, A, prompt, cache_salt="tenant-2") == 0
    assert cached(srv, A, prompt, cache_salt="tenant-2") > 0
    # a guess that shares a part with the secret (from a scope that has sent
    # nothing else): no cut at that branch point is stored for the guesser, so
    # guessing again reveals nothing either
    guess = SECRET[:40]
    cached(srv, B, guess + "x" * 15, cache_salt="guesser")
    assert cached(srv, B, guess + "y" * 15, cache_salt="guesser") == 0


def test_pinned_prefixes_belong_to_their_key(srv):
    r = httpx.post(srv.base_url + "/v1/prefixes", headers=A, json={"prompt": SECRET + " pinned"}, timeout=60)
    assert r.status_code == 200, r.text
    pid = r.json()["id"]
    assert pid in [p["id"] for p in httpx.get(srv.base_url + "/v1/prefixes", headers=A).json()["data"]]
    assert pid not in [p["id"] for p in httpx.get(srv.base_url + "/v1/prefixes", headers=B).json()["data"]]
    for method in ("GET", "DELETE"):
        err = check_error(httpx.request(method, srv.base_url + f"/v1/prefixes/{pid}", headers=B), 404)
        assert err["code"] == "prefix_not_found"
    r = httpx.post(srv.base_url + "/v1/completions", headers=B, timeout=60,
                   json={"prompt": " and then", "prefix_id": pid, "max_tokens": 2})
    check_error(r, 404, "prefix_id")
    r = httpx.post(srv.base_url + "/v1/completions", headers=A, timeout=60,
                   json={"prompt": " and then", "prefix_id": pid, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert httpx.delete(srv.base_url + f"/v1/prefixes/{pid}", headers=A).json()["deleted"] is True


# --- 4. clients that stop reading --------------------------------------------------------------

def rss_bytes(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_stalled_readers_are_paused_then_aborted_and_others_go_on(srv, oracle, tok):
    """Four clients ask for a long stream and never read. The kernel's socket
    buffers (up to 4 MiB a connection) take the first output, the echoed
    prompt's logprobs (~5 MB each); then their streams pause, and they are
    aborted after --stream-stall-timeout."""
    prompt = [random.Random(7).randrange(256) for _ in range(10_000)]
    body = json.dumps({"prompt": prompt, "echo": True, "max_tokens": 50_000, "stream": True, "ignore_eos": True,
                       "logprobs": MAX_LOGPROBS, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    aborted = metric(srv, "statex_engine_requests_aborted_total")

    def seconds_per_token():         # a well-behaved client's time per token (greedy, 200 tokens)
        t0 = time.monotonic()
        r = httpx.post(srv.base_url + "/v1/completions", headers=A, json=greedy_body("timing", 200), timeout=60)
        assert len(token_ids(r.json())) == 200
        return (time.monotonic() - t0) / 200
    idle = min(seconds_per_token() for _ in range(3))
    socks = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", srv.port))
            s.sendall(head + body)
            socks.append(s)                              # and never read
        wait_for(lambda: metric(srv, "statex_state_pool_slots_used") == 4, what="the stalled requests to start")

        # paused: within a few seconds, no stalled sequence generates any more
        def counts():
            return metric(srv, "statex_prompt_tokens_total"), metric(srv, "statex_generation_tokens_total")

        generated = counts()[1]

        def settled():        # prompts read, some tokens sampled, and then nothing more
            before = counts()
            time.sleep(0.5)
            return counts() == before and before[1] >= generated + 4
        wait_for(settled, timeout=30, what="the stalled streams to pause")
        # (of the 50,000 tokens each asked for, the few that fill its buffer)
        assert counts()[1] - generated < 4 * 200, counts()[1] - generated
        # from here on the stalled clients cost nothing more (their first output,
        # the echo, is what the server built before they stalled)
        rss0 = rss_bytes(srv)
        time.sleep(2)
        during = min(seconds_per_token() for _ in range(3))
        assert during < 2 * idle, (during, idle)
        # meanwhile others are served, exactly
        r = httpx.post(srv.base_url + "/v1/completions", headers=A, json=greedy_body("still served"), timeout=60)
        assert token_ids(r.json()) == oracle.greedy_generate(tok.encode("still served"), 24)
        assert rss_bytes(srv) - rss0 < 20 << 20
        # and after --stream-stall-timeout the stalled ones are aborted
        wait_for(lambda: metric(srv, "statex_state_pool_slots_used") == 0, timeout=STALL_TIMEOUT + 10,
                 what="the stalled requests to be aborted")
        assert metric(srv, "statex_engine_requests_aborted_total") >= aborted + 4
    finally:
        for s in socks:
            s.close()


# --- 5. runaway work is bounded by default -----------------------------------------------------

def test_work_limits(srv):
    chat = {"messages": [{"role": "user", "content": "go on forever"}], "ignore_eos": True, "temperature": 0}
    r = httpx.post(srv.base_url + "/v1/chat/completions", headers=A, json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    assert r.json()["choices"][0]["finish_reason"] == "length"
    over = MAX_LOGPROBS + 1
    cases = [
        ("/v1/completions", {"prompt": "x", "logprobs": over}, "logprobs", "--max-logprobs"),
        ("/v1/completions", {"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": over}, "logprobs",
         "--max-logprobs"),
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": over}, "top_logprobs", "--max-logprobs"),
        ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop", "16"),
        ("/v1/completions", {"prompt": "x", "stop": "z" * 257}, "stop", "256"),
    ]
    for path, body, param, limit in cases:
        err = check_error(httpx.post(srv.base_url + path, headers=A, json=body, timeout=30), 400, param)
        assert limit in err["message"], err


# --- 6. text that is not Unicode ---------------------------------------------------------------

def test_lone_surrogates_are_400(srv):
    cases = [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
        ("/v1/completions", '{"prompt": ["ok", "a\\udfffb"], "max_tokens": 2}'),
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 0, "echo": true, "logprobs": 1}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        ("/tokenize", '{"prompt": "a\\ud800b"}'),
        ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}'),
        ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], '
                                 '"chat_template_kwargs": {"k": "\\ud800"}}'),
    ]
    for path, body in cases:
        r = httpx.post(srv.base_url + path, headers={**A, "content-type": "application/json"}, content=body)
        check_error(r, 400)
    r = httpx.post(srv.base_url + "/v1/completions", headers=A, json=greedy_body("fine", 2))
    assert r.status_code == 200


# --- 8. engine supervision ---------------------------------------------------------------------

def test_admission_and_abort_failures_cost_only_their_request(faulty, oracle, tok):
    r = httpx.post(faulty.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "seed": -13},
                   timeout=30)
    check_error(r, 500)
    # an abort that fails (the client leaves a request whose abort raises)
    with httpx.stream("POST", faulty.base_url + "/v1/completions", timeout=30,
                      json={"prompt": "x", "max_tokens": 3000, "seed": -17, "stream": True,
                            "ignore_eos": True}) as s:
        next(s.iter_lines())
    time.sleep(0.5)
    assert httpx.get(faulty.base_url + "/health").status_code == 200
    r = httpx.post(faulty.base_url + "/v1/completions", json=greedy_body("after the faults"), timeout=30)
    assert token_ids(r.json()) == oracle.greedy_generate(tok.encode("after the faults"), 24)
    wait_for(lambda: metric(faulty, "statex_state_pool_slots_used") == 0, what="slots to be freed")


def test_health_reports_a_hung_step(faulty):
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        faulty.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "temperature": 1, "top_k": 42},
        timeout=30)))
    t.start()
    try:
        wait_for(lambda: httpx.get(faulty.base_url + "/health").status_code == 503, timeout=3.5,
                 what="/health to report the hung step")
        err = httpx.get(faulty.base_url + "/health").json()["error"]
        assert err["code"] == "engine_stalled" and "--step-timeout" in err["message"], err
    finally:
        t.join()
    assert result["r"].status_code == 200
    wait_for(lambda: httpx.get(faulty.base_url + "/health").status_code == 200, timeout=5, what="recovery")


def test_engine_death_fails_requests_and_exits_nonzero(ckpt):
    server = FaultyServer(ckpt, "--max-num-seqs", "4", env=ONE_THREAD)
    with server:
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "seed": -19},
                       timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
        assert "injected" not in r.text
        server.proc.wait(timeout=20)
        assert server.proc.returncode == 1, server.log_tail()
        assert "the engine has died" in server.log_tail()


# --- the schema says what the server answers ------------------------------------------------

def test_openapi_documents_the_error_bodies_not_422(srv):
    schema = httpx.get(srv.base_url + "/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"])
    for path, method, codes in (("/v1/completions", "post", {"400", "401", "404", "413", "503"}),
                                ("/v1/chat/completions", "post", {"400", "401", "413", "503"}),
                                ("/v1/prefixes/{prefix_id}", "delete", {"401", "404"}),
                                ("/health", "get", {"503"})):
        responses = schema["paths"][path][method]["responses"]
        assert codes <= set(responses), (path, sorted(responses))
        ref = responses["401" if "401" in codes else "503"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_api_keys_come_from_flags_a_file_or_the_environment(tmp_path, monkeypatch):
    from statex_serve.cli import build_parser, read_api_keys
    monkeypatch.setenv("STATEX_API_KEY", "from-env")
    assert read_api_keys(build_parser().parse_args([])) == ["from-env"]
    assert read_api_keys(build_parser().parse_args(["--api-key", "a", "--api-key", "b"])) == ["a", "b"]
    f = tmp_path / "keys"
    f.write_text("# comment\nk1\n\nk2\n")
    assert read_api_keys(build_parser().parse_args(["--api-key-file", str(f)])) == ["k1", "k2"]
    f.write_text("# nothing\n")
    with pytest.raises(SystemExit, match="no keys"):
        read_api_keys(build_parser().parse_args(["--api-key-file", str(f)]))
