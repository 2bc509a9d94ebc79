"""What a vLLM user brings, against the real server: the metrics a
vLLM dashboard reads (scraped and parsed with prometheus_client's parser), the
sampling options users send (penalties against a direct implementation of
vLLM's definitions on the oracle model), /docs without a network, and vLLM's
CLI names.
"""
from __future__ import annotations

import os
import re
import ssl
import time
import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_registry.testing import make_tiny_checkpoint
from statex_serve.testing import ServerProcess, penalized_greedy

from api_helpers import oracle  # noqa: F401 - a fixture

NAME = "tiny-gla"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MAX_LEN = 4096


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("compat") / "gla", family="gla", seed=3))


@pytest.fixture(scope="module")
def srv(ckpt):
    with ServerProcess(ckpt, "--served-model-name", NAME, "--max-num-seqs", "8", "--max-model-len", str(MAX_LEN),
                       env=ONE_THREAD) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def scrape(server) -> dict[str, dict]:
    """{family name: {(sample name, sorted labels): value}} from /metrics, through prometheus_client's parser."""
    text = httpx.get(server.base_url + "/metrics").text
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
        out[fam.name]["__type__"] = fam.type
    return out


def value(families, family: str, sample: str, **labels) -> float:
    want = {"model_name": NAME, "engine": "0", **labels}
    for (name, lab), v in families[family].items():
        if name == sample and dict(lab) == want:
            return v
    raise AssertionError(f"{sample}{want} not in {family}: {families[family]}")


# --- item 7: metrics ----------------------------------------------------------------------------------

VLLM_HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                   "vllm:request_prompt_tokens", "vllm:request_generation_tokens")


def test_vllm_metrics_a_dashboard_reads(srv, client):
    before = scrape(srv)
    # four sequences that end by length (a completion with n=2, a chat, c), one by a stop string (d)
    a = client.completions.create(model=NAME, prompt="hello metrics", max_tokens=7, n=2, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       extra_body={"ignore_eos": True})
    c = client.completions.create(model=NAME, prompt="stop me", max_tokens=40, temperature=0.0,
                                  extra_body={"ignore_eos": True, "min_tokens": 3})
    text_c = c.choices[0].text
    assert len(text_c) >= 3
    d = client.completions.create(model=NAME, prompt="stop me", max_tokens=40, temperature=0.0,
                                  stop=[text_c[1:3]], extra_body={"ignore_eos": True})
    assert d.choices[0].finish_reason == "stop"
    after = scrape(srv)

    for fam in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert after[fam]["__type__"] == "gauge"
    assert value(after, "vllm:num_requests_running", "vllm:num_requests_running") == 0
    assert value(after, "vllm:num_requests_waiting", "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == 0.0
    for fam in VLLM_HISTOGRAMS:
        assert after[fam]["__type__"] == "histogram", fam

    def delta(fam, sample, **labels):
        return value(after, fam, sample, **labels) - (value(before, fam, sample, **labels) if fam in before else 0)

    seqs = 5     # vLLM fans n out into n requests: each sequence counts
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 4
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="stop") == 1
    for reason in ("abort", "error", "repetition"):      # exported at 0, as vLLM does
        value(after, "vllm:request_success", "vllm:request_success_total", finished_reason=reason)
    # usage counts a's prompt once; the histogram once for each of its two sequences
    prompt_tokens = 2 * a.usage.prompt_tokens + b.usage.prompt_tokens + c.usage.prompt_tokens + d.usage.prompt_tokens
    gen_tokens = sum(r.usage.completion_tokens for r in (a, b, c, d))
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == gen_tokens
    for fam in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens"):
        assert delta(fam, fam + "_count") == seqs, fam
    # one gap per token after the first (each output of the native engine brings one token)
    assert delta("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == gen_tokens - seqs
    assert 0 < delta("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_sum") < 120
    assert value(after, "vllm:generation_tokens", "vllm:generation_tokens_total") >= gen_tokens
    # vLLM's buckets, so the dashboard's quantiles mean the same
    buckets = pytest.importorskip("vllm.v1.metrics.buckets")

    def bounds(fam):
        return sorted(float(dict(key[1])["le"]) for key in after[fam] if key[0] == fam + "_bucket")

    assert bounds("vllm:time_to_first_token_seconds") == [*buckets.TIME_TO_FIRST_TOKEN_BUCKETS, float("inf")]
    assert bounds("vllm:inter_token_latency_seconds") == [*buckets.INTER_TOKEN_LATENCY_BUCKETS, float("inf")]
    assert bounds("vllm:e2e_request_latency_seconds") == [*buckets.REQUEST_LATENCY_BUCKETS, float("inf")]
    assert bounds("vllm:request_prompt_tokens") == [*buckets.build_1_2_5_buckets(MAX_LEN), float("inf")]
    # ours stay, and the process metrics are there
    assert "statex_requests_running" in after and "statex_time_to_first_token_seconds" in after
    assert after["process_cpu_seconds"]["__type__"] == "counter"
    assert "process_resident_memory_bytes" in after


def test_kv_cache_usage_is_the_state_pool_in_use(srv):
    """While a long generation holds one of the 8 slots, usage is 1/8."""
    import threading

    done = threading.Event()

    def long_request():
        httpx.post(srv.base_url + "/v1/completions", timeout=120,
                   json={"prompt": "long", "max_tokens": 3000, "ignore_eos": True, "stream": False})
        done.set()

    t = threading.Thread(target=long_request)
    t.start()
    seen = set()
    for _ in range(400):
        fams = scrape(srv)
        seen.add(value(fams, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc"))
        if 0.125 in seen or done.is_set():
            break
    t.join(120)
    assert 0.125 in seen, seen


# --- item 6: sampling options -------------------------------------------------------------------------

def token_ids(choice) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]


PROMPT = [72, 101, 108, 108, 111, 32, 97, 98, 97, 98, 97, 98]


@pytest.mark.parametrize("penalties", [
    {"presence_penalty": 1.5}, {"frequency_penalty": 2.0}, {"repetition_penalty": 3.0},
    {"presence_penalty": -0.5, "frequency_penalty": 0.7, "repetition_penalty": 1.3}], ids=str)
def test_penalties_follow_vllms_definitions(client, oracle, penalties):
    plain = penalized_greedy(oracle, PROMPT, 24)
    want = penalized_greedy(oracle, PROMPT, 24, penalties.get("presence_penalty", 0.0),
                            penalties.get("frequency_penalty", 0.0), penalties.get("repetition_penalty", 1.0))
    assert want != plain, "the penalty does not change this greedy output: a useless case"
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    if "repetition_penalty" in penalties:
        extra["repetition_penalty"] = penalties["repetition_penalty"]
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0.0, logprobs=0,
                                  presence_penalty=penalties.get("presence_penalty"),
                                  frequency_penalty=penalties.get("frequency_penalty"), extra_body=extra)
    assert token_ids(r.choices[0]) == want


def test_a_large_repetition_penalty_stops_greedy_repeats(client, oracle, srv):
    plain = penalized_greedy(oracle, PROMPT, 30)
    assert len(set(plain)) < len(plain), "greedy does not repeat here: the test shows nothing"
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "abab"}], max_tokens=30,
                                       temperature=0.0, logprobs=True,
                                       extra_body={"repetition_penalty": 1e6, "ignore_eos": True,
                                                   "return_tokens_as_token_ids": True})
    ids = [int(c.token.removeprefix("token_id:")) for c in r.choices[0].logprobs.content]
    assert len(ids) == 30 and len(set(ids)) == 30, ids
    prompt = httpx.post(srv.base_url + "/tokenize", json={"messages": [{"role": "user", "content": "abab"}]}).json()
    assert not set(ids) & set(prompt["tokens"]), "repetition counts the prompt too"


def test_unknown_fields_are_accepted_with_a_warning(client, srv):
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2,
                                  extra_body={"guided_nonsense": 1, "priority": 0})
    assert len(r.choices) == 1
    assert re.search(r"ignoring unknown request fields: guided_nonsense, priority", srv.log_tail(100_000))


# --- item 11: /docs without the internet ----------------------------------------------------------------

def test_docs_load_only_local_files_and_document_every_field(srv):
    for page in ("/docs", "/redoc"):
        r = httpx.get(srv.base_url + page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text) + re.findall(r"""url: *["']([^"']+)["']""",
                                                                                     r.text)
        urls += re.findall(r"""spec-url=["']([^"']+)["']""", r.text)
        assert len(urls) >= 2, r.text
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
            got = httpx.get(srv.base_url + url)
            assert got.status_code == 200 and len(got.content) > 100, (page, url, got.status_code)
        assert not re.search(r"https?://", r.text.replace(srv.base_url, "")), f"{page} names another host"
    schema = httpx.get(srv.base_url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "ChatMessage", "TokenizeRequest"):
        undocumented = [f for f, prop in components[name]["properties"].items() if not prop.get("description")]
        assert not undocumented, f"{name}: no description for {undocumented}"


# --- item 5: vLLM's CLI names ------------------------------------------------------------------------

class ServeForm(ServerProcess):
    """``statex-serve serve MODEL ...``: vLLM's form, the model positional."""

    def launch(self):
        cmd = [sys.executable, "-m", "statex_serve", "serve", self.model_dir, "--host", "127.0.0.1", "--port",
               str(self.port), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self


def test_vllm_cli_names_through_the_server(ckpt, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    env = {**ONE_THREAD, "VLLM_API_KEY": "vllm-key"}
    env.pop("STATEX_API_KEY", None)
    with ServeForm(ckpt, "--served-model-name", NAME, "--max-num-seqs", "2", "--max-num-batched-tokens", "48",
                   "--no-enable-prefix-caching", "--allowed-origins", '["https://app.example"]',
                   "--chat-template", str(template), "--seed", "7", "--disable-log-requests",
                   "--uvicorn-log-level", "warning", env=env) as server:
        url = server.base_url
        auth = {"Authorization": "Bearer vllm-key"}
        # --seed: requests without a seed sample reproducibly from server start (the
        # first requests of a restart below sample the same)
        body = {"prompt": "seeded", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True}
        first = [httpx.post(url + "/v1/completions", headers=auth, json=body).json()["choices"][0]["text"]
                 for _ in range(2)]
        assert first[0] != first[1]
        assert httpx.get(url + "/v1/models").status_code == 401          # VLLM_API_KEY is the key
        card = httpx.get(url + "/v1/models", headers=auth).json()["data"][0]
        assert card["statex"]["prefill_chunk"] == 48                      # --max-num-batched-tokens
        assert card["statex"]["prefix_cache"] is None                     # --no-enable-prefix-caching
        # a browser's CORS preflight: no key, answered for the allowed origin only
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
        r = httpx.options(url + "/v1/chat/completions", headers=pre)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = httpx.options(url + "/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.post(url + "/v1/completions", headers={**auth, "Origin": "https://app.example"},
                       json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        # --chat-template FILE renders the chat
        tokens = httpx.post(url + "/tokenize", headers=auth,
                            json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        direct = httpx.post(url + "/tokenize", headers=auth, json={"prompt": "<<hi>>", "add_special_tokens": False})
        assert tokens == direct.json()["tokens"]
        assert '"POST /v1/completions HTTP/1.1"' not in server.log_tail(100_000)   # --disable-log-requests
    with ServeForm(ckpt, "--served-model-name", NAME, "--max-num-seqs", "2", "--seed", "7", env=env) as server:
        again = [httpx.post(server.base_url + "/v1/completions", headers=auth, json=body).json()["choices"][0]["text"]
                 for _ in range(2)]
        assert '"POST /v1/completions HTTP/1.1"' in server.log_tail(100_000)       # logged by default
    assert again == first


def test_gpu_memory_utilization_sizes_the_state_pool(ckpt, oracle):
    """On CPU the fraction is of free host memory: ask for about 5.5 sequences' worth."""
    per_seq = oracle.state_spec().bytes_per_sequence
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fraction = 5.5 * per_seq / free
    with ServeForm(ckpt, "--device", "cpu", "--gpu-memory-utilization", repr(fraction), env=ONE_THREAD) as server:
        card = httpx.get(server.base_url + "/v1/models").json()["data"][0]
    # free memory moves a little between here and the server's start
    assert 3 <= card["statex"]["state_pool_slots"] <= 8, card["statex"]


@pytest.mark.parametrize("args,message", [
    (["--tensor-parallel-size", "2"], "needs --backend vllm"),
    (["--chat-template", "no/such/file.jinja"], "no such file"),
    (["--allowed-origins", "[1, 2]"], "JSON list of strings"),
    (["--gpu-memory-utilization", "1.5"], "(0, 1]"),
    (["--gpu-memory-utilization", "0.5", "--state-memory", "1GiB"], "not both"),
])
def test_vllm_cli_names_refuse_bad_values(ckpt, args, message):
    r = subprocess.run([sys.executable, "-m", "statex_serve", "serve", ckpt, *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_https_and_root_path(ckpt, tmp_path):
    """--ssl-keyfile/--ssl-certfile serve HTTPS; --root-path prefixes the URLs /docs hands out."""
    if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = ServeForm(ckpt, "--max-num-seqs", "2", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
                       "--root-path", "/llm", env=ONE_THREAD).launch()
    url = f"https://127.0.0.1:{server.port}"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as https:
            for _ in range(600):
                assert server.proc.poll() is None, server.log_tail()
                try:
                    if https.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            r = https.post(url + "/v1/completions", json={"prompt": "tls", "max_tokens": 2})
            assert r.status_code == 200 and len(r.json()["choices"]) == 1
            docs = https.get(url + "/docs").text
            assert "/llm/openapi.json" in docs and "/llm/static-offline-docs/swagger-ui-bundle.js" in docs
        with pytest.raises(httpx.TransportError):        # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)
    finally:
        server.stop()
