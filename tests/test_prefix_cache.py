"""The prefix cache: greedy outputs with it equal outputs without it (shared
prefixes of many lengths, segment multiples or not, requests in flight
together), the byte budgets hold under a stream of distinct prefixes, a
snapshot is never handed out while being written, pinned prefixes survive
eviction until deleted, and the HTTP surface (pin_prefix, prefix_id,
/v1/prefixes, 404s, usage, metrics) on a real server."""
from __future__ import annotations

import asyncio
import random
import re

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from model_registry.checkpoint import load_model
from model_registry.testing import make_tiny_checkpoint
from statex_serve.engine import GenerationRequest, InvalidRequestError, PrefixNotFoundError, SamplingParams
from statex_serve.engine.prefix_cache import PrefixCache, PrefixHasher, as_token_array, prefix_key
from statex_serve.testing import ServerProcess

from engine_helpers import run_engine

CHUNK = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pc-ckpt")
    return {f: str(make_tiny_checkpoint(root / f, family=f, seed=2)) for f in ("gla", "mamba2")}


async def greedy(engine, rid, prompt, max_tokens, n=1, **req):
    """(token ids of each sequence, the first output) of one greedy request."""
    ids, first = [[] for _ in range(n)], None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)
    async for out in engine.generate(GenerationRequest(rid, prompt, params, **req)):
        first = first or out
        for d in out.outputs:
            ids[d.index] += d.token_ids
    return ids, first


# --- outputs: cache on == cache off ----------------------------------------------------------

def shared_prefix_prompts(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(first wave, second wave): prompts that share 1..160 tokens of one
    document (multiples of the segment and not), repeats, strict prefixes."""
    rng = random.Random(seed)
    doc = [rng.randrange(256) for _ in range(160)]

    def tail(lo=1, hi=40):
        return [rng.randrange(256) for _ in range(rng.randrange(lo, hi))]
    first = [doc + tail(), doc[:70] + tail()]
    second = [doc[:k] + tail() for k in (1, 5, 16, 17, 31, 32, 33, 47, 63, 64, 65, 70, 71, 95, 96, 97, 128, 150, 160)]
    second += [doc + tail(), doc + tail(), first[0], first[0], doc, doc[:100], first[1][:90]]
    return first, second


@pytest.mark.parametrize("family", ["gla", "mamba2"])
def test_greedy_outputs_equal_with_and_without_the_cache(ckpts, family):
    first, second = shared_prefix_prompts(seed=5 if family == "gla" else 6)

    async def test(engine):
        async def one(i, p, delay=0.0):
            await asyncio.sleep(delay)
            n = 2 if i % 7 == 3 else 1                # n > 1: the restored state is copied on
            ids, out = await greedy(engine, f"r{i}", p, 6 + i % 5, n=n)
            assert all(s == ids[0] for s in ids)
            return ids[0], out.num_cached_tokens
        a = await asyncio.gather(*(one(i, p) for i, p in enumerate(first)))
        b = await asyncio.gather(*(one(len(first) + i, p, 0.003 * i) for i, p in enumerate(second)))
        return a + b, engine.stats()

    on, stats_on = run_engine(ckpts[family], test, max_num_seqs=12, prefill_chunk=CHUNK)
    off, stats_off = run_engine(ckpts[family], test, max_num_seqs=12, prefill_chunk=CHUNK, prefix_cache=False)
    assert [ids for ids, _ in on] == [ids for ids, _ in off]
    model = load_model(ckpts[family])
    for p, (ids, _) in zip((first + second)[::4], on[::4]):     # and a sample against the oracle
        assert ids == model.greedy_generate(p, len(ids))
    cached = [c for _, c in on]
    assert all(c == 0 for _, c in off) and "prefix_cache" not in stats_off.extra
    pc = stats_on.extra["prefix_cache"]
    assert pc["hits"] >= len(second) // 2 and pc["tokens_saved"] == sum(cached)
    assert any(c % CHUNK for c in cached), cached               # hits off the segment grid (branch points)
    assert stats_on.prompt_tokens_total + pc["tokens_saved"] == stats_off.prompt_tokens_total


def test_questions_about_one_document_cost_only_the_question(ckpts):
    """doc + q1 stores segment ends; doc + q2 restores the last one before the
    end of doc and cuts a segment where q1 and q2 part; doc + q3.. restore the
    state at exactly the end of doc."""
    rng = random.Random(1)
    doc = [rng.randrange(256) for _ in range(200)]          # 200: not a multiple of the segment
    questions = [[rng.randrange(256) for _ in range(32)] for _ in range(4)]

    async def test(engine):
        got = []
        for i, q in enumerate(questions):
            ids, out = await greedy(engine, f"q{i}", doc + q, 4)
            got.append((ids[0], out.num_cached_tokens))
        return got

    got = run_engine(ckpts["gla"], test, max_num_seqs=2, prefill_chunk=CHUNK)
    assert [c for _, c in got] == [0, 192, 200, 200]
    model = load_model(ckpts["gla"])
    assert [ids for ids, _ in got] == [model.greedy_generate(doc + q, 4) for q in questions]


# --- pinned prefixes in the engine -----------------------------------------------------------

def test_pinned_prefix_round_trip_in_the_engine(ckpts):
    rng = random.Random(2)
    doc = [rng.randrange(256) for _ in range(90)]
    q = [rng.randrange(256) for _ in range(10)]

    async def test(engine):
        _, out = await greedy(engine, "pin", doc + q, 3, pin_prefix=len(doc))
        pid = out.prefix_id
        assert pid and pid == "pfx-" + prefix_key(doc).hex() and out.num_prompt_tokens == 100
        ids, out = await greedy(engine, "use", q, 5, prefix_id=pid)
        assert out.num_cached_tokens == 90 and out.num_prompt_tokens == 100
        # echo-style prompt logprobs over the request's own prompt (the first has no predictor here)
        lps = None
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        async for o in engine.generate(GenerationRequest("lp", q, params, prefix_id=pid)):
            lps = lps or o.prompt_logprobs
        assert [e.num_tokens for e in engine.list_prefixes()] == [90]
        with pytest.raises(PrefixNotFoundError, match="No pinned prefix"):
            engine.generate(GenerationRequest("bad", q, params, prefix_id="pfx-0000"))
        with pytest.raises(InvalidRequestError, match="pin_prefix must be between"):
            engine.generate(GenerationRequest("bad", q, params, pin_prefix=11))
        engine.delete_prefix(pid)
        with pytest.raises(PrefixNotFoundError):
            engine.generate(GenerationRequest("gone", q, params, prefix_id=pid))
        return ids[0], lps, engine.stats()

    ids, lps, stats = run_engine(ckpts["gla"], test, max_num_seqs=2, prefill_chunk=CHUNK)
    model = load_model(ckpts["gla"])
    assert ids == model.greedy_generate(doc + q, 5)
    with torch.no_grad():
        ref = model(torch.tensor([doc + q])).logits[0].log_softmax(-1)
    assert len(lps) == len(q) and lps[0] is None
    for t in range(1, len(q)):
        assert lps[t].token_id == q[t] and abs(lps[t].logprob - float(ref[len(doc) + t - 1, q[t]])) < 1e-4
    assert stats.extra["prefix_cache"]["pinned"] == 0 and stats.slots_used == 0


# --- the store: budgets, tiers, readiness ------------------------------------------------------

def test_budgets_hold_under_a_stream_of_distinct_prefixes(ckpts):
    """Device room for 3 snapshots, host for 4: every prompt is new, so the
    store fills, spills, evicts; its byte counts never pass the budgets (checked
    while requests run), pinned snapshots stay, and pins beyond the room are refused."""
    bps = load_model(ckpts["mamba2"]).state_spec().bytes_per_sequence
    rng = random.Random(4)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(20, 130))] for _ in range(24)]

    async def test(engine):
        cache = engine.prefix_cache
        stop, seen = asyncio.Event(), []

        async def watch():
            while not stop.is_set():
                cache.check_invariants()
                s = cache.stats()
                seen.append((s["bytes_device"], s["bytes_host"]))
                await asyncio.sleep(0.002)
        watcher = asyncio.create_task(watch())
        _, out = await greedy(engine, "pin0", prompts[0], 2, pin_prefix=len(prompts[0]))
        pinned = out.prefix_id
        await asyncio.gather(*(greedy(engine, f"s{i}", p, 3) for i, p in enumerate(prompts[1:])))
        stop.set()
        await watcher
        cache.check_invariants()
        full = cache.stats()
        assert [i.id for i in engine.list_prefixes()] == [pinned]
        ids, out = await greedy(engine, "again", prompts[0] + [7], 3)    # the pinned state is still there
        assert out.num_cached_tokens == len(prompts[0])
        pins = []
        with pytest.raises(InvalidRequestError, match="cannot pin another prefix") as exc:
            for i in range(10):
                pins.append((await greedy(engine, f"p{i}", [i + 1] * 5, 1, pin_prefix=5))[1].prefix_id)
        assert exc.value.code == "prefix_store_full" and len(pins) == 6           # 7 room, 1 held already
        for pid in pins:
            engine.delete_prefix(pid)
        _, out = await greedy(engine, "after", [9] * 5, 1, pin_prefix=5)
        assert out.prefix_id
        cache.check_invariants()
        return seen, full, ids

    seen, s, ids = run_engine(ckpts["mamba2"], test, max_num_seqs=6, prefill_chunk=CHUNK,
                              prefix_cache_memory=3 * bps + bps // 2, prefix_cache_host_memory=4 * bps)
    assert len(seen) > 5 and max(d for d, _ in seen) <= 3 * bps and max(h for _, h in seen) <= 4 * bps
    assert s["evictions"] > 0 and s["spills"] > 0 and s["stores"] > 20
    assert (s["bytes_device"], s["bytes_host"]) == (3 * bps, 4 * bps)
    assert ids[0] == load_model(ckpts["mamba2"]).greedy_generate(prompts[0] + [7], 3)


class _Copy:
    """A stand-in for a CUDA event: the copy is done when ``done`` is set."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_a_snapshot_is_not_handed_out_while_being_written():
    from model_registry.testing import build_tiny_model

    model = build_tiny_model("gla", seed=0)
    pools = model.allocate_state_pools(3)
    for layer in pools.pools:
        for t in layer.values():
            t[1].fill_(1.0)
    cache = PrefixCache(pools, "cpu", device_budget=10 * pools.spec.bytes_per_sequence, host_budget=0)
    tokens = as_token_array(range(50))
    keys = PrefixHasher(tokens)
    short = cache.store(keys.key(10), 10, tokens, slot=1)
    writing = cache.store(keys.key(40), 40, tokens, slot=1)
    writing.ready = _Copy()                           # its copy has not landed yet
    assert cache.lookup(tokens, limit=49) is short    # skipped while written
    writing.ready.done = True
    hit = cache.lookup(tokens, limit=49)
    assert hit is writing and hit.refs == 1
    cache.restore(hit, slot=2)
    assert all(bool((t[2] == 1.0).all()) for layer in pools.pools for t in layer.values())
    # a referenced entry that gets dropped stays readable until released, then its bytes are freed
    cache.pin(hit)
    cache.delete(hit.id)
    assert hit.state is not None and cache.used["device"] == 2 * cache.entry_bytes
    cache.release(hit)
    assert hit.state is None and cache.used["device"] == cache.entry_bytes
    cache.check_invariants()
    # keys are prefix hashes: the same tokens in another sequence give the same key
    assert prefix_key(range(10)) == PrefixHasher(as_token_array(range(50))).key(10) != prefix_key(range(11))


def test_the_host_tier_is_a_pool_of_slots_reused_as_entries_come_and_go():
    """On a GPU the host tier is one pinned pool allocated up front (no pinned
    allocation per spill); here the same pool on CPU: spilled snapshots restore
    exactly, and dropped ones give their slots back."""
    from model_registry.testing import build_tiny_model

    model = build_tiny_model("mamba2", seed=0)
    pools = model.allocate_state_pools(2)
    size = pools.spec.bytes_per_sequence
    cache = PrefixCache(pools, "cpu", device_budget=2 * size, host_budget=3 * size, host_pool=True)
    assert len(cache._host_free) == 3
    entries = []
    for i in range(8):                 # 2 on the device, 3 spilled to the pool, the rest dropped
        for layer in pools.pools:
            for t in layer.values():
                t[0].fill_(float(i))
        tokens = as_token_array([i] * 20)
        entries.append(cache.store(PrefixHasher(tokens).key(20), 20, tokens, slot=0))
        cache.check_invariants()
    stats = cache.stats()
    assert stats["entries_device"] == 2 and stats["entries_host"] == 3 and stats["spills"] == 6
    assert not cache._host_free
    for i in (3, 4, 5):                # on the host tier now: restore them
        e = entries[i]
        assert e.tier == "host" and e.host_slot is not None
        cache.restore(e, slot=1)
        assert all(bool((t[1] == float(i)).all()) for layer in pools.pools for t in layer.values())
    for e in entries[3:6]:
        cache._drop(e)
    assert sorted(cache._host_free) == [0, 1, 2]
    cache.check_invariants()


# --- HTTP ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(ckpts):
    with ServerProcess(ckpts["gla"], "--served-model-name", "tiny", "--max-num-seqs", "8", "--prefill-chunk",
                       str(CHUNK), "--prefix-cache-memory", "4MiB", env={"OMP_NUM_THREADS": "1"}) as s:
        yield s


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf'^{name}{{[^}}]*{sel}[^}}]*}} (\S+)$', text, re.MULTILINE)
    assert m, f"{name} {labels} not in /metrics"
    return float(m.group(1))


def test_pin_and_reuse_through_the_openai_client(server, ckpts):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    doc = "In the beginning there was a document about recurrent state, long enough to span segments. " * 3
    question = " Q: what was there?"
    kw = {"model": "tiny", "max_tokens": 8, "temperature": 0.0}
    r = client.completions.create(prompt=doc, extra_body={"pin_prefix": True, "ignore_eos": True}, **kw)
    pid = r.model_extra["prefix_id"]
    assert pid.startswith("pfx-") and r.usage.prompt_tokens_details.cached_tokens == 0
    doc_tokens = r.usage.prompt_tokens
    a = client.completions.create(prompt=question, extra_body={"prefix_id": pid, "ignore_eos": True}, **kw)
    b = client.completions.create(prompt=doc + question, extra_body={"ignore_eos": True}, **kw)
    tok = AutoTokenizer.from_pretrained(ckpts["gla"])
    want = load_model(ckpts["gla"]).greedy_generate(tok.encode(doc + question), 8)
    assert a.choices[0].text == b.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == doc_tokens + len(tok.encode(question))
    assert a.usage.prompt_tokens_details.cached_tokens == doc_tokens
    assert b.usage.prompt_tokens_details.cached_tokens == doc_tokens      # the pinned state, found by content
    # streaming and chat carry the fields too
    chunks = list(client.completions.create(prompt=question, stream=True, stream_options={"include_usage": True},
                                            extra_body={"prefix_id": pid, "ignore_eos": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == a.choices[0].text
    # the same prompt a third time: b cut a segment one token before its end, so all but one is restored
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          extra_body={"prefix_id": pid, "pin_prefix": True})
    assert chat.usage.prompt_tokens_details.cached_tokens == doc_tokens and chat.model_extra["prefix_id"] != pid
    # list, get, create without generating, delete
    listed = httpx.get(server.base_url + "/v1/prefixes").json()
    assert listed["object"] == "list" and {p["id"] for p in listed["data"]} == {pid, chat.model_extra["prefix_id"]}
    card = httpx.get(server.base_url + f"/v1/prefixes/{pid}").json()
    assert card["num_tokens"] == doc_tokens and card["location"] == "device" and card["hits"] >= 3
    made = httpx.post(server.base_url + "/v1/prefixes", json={"model": "tiny", "prompt": doc}).json()
    assert made["id"] == pid and made["num_tokens"] == doc_tokens and made["cached_tokens"] > 0   # same id
    for p in listed["data"]:
        assert httpx.delete(server.base_url + f"/v1/prefixes/{p['id']}").json() == {
            "id": p["id"], "object": "prefix", "deleted": True}
    assert httpx.get(server.base_url + "/v1/prefixes").json()["data"] == []
    assert metric(server, "statex_prefix_cache_hits_total") >= 4
    assert metric(server, "statex_prefix_cache_tokens_saved_total") >= 4 * doc_tokens - 1
    assert metric(server, "statex_prefix_cache_bytes", tier="device") > 0
    assert metric(server, "statex_prefix_cache_budget_bytes", tier="device") == 4 << 20
    assert metric(server, "statex_prefix_cache_bytes", tier="host") == 0
    for name in ("misses_total", "evictions_total", "spills_total", "pinned", "entries"):
        assert re.search(rf"^statex_prefix_cache_{name}", httpx.get(server.base_url + "/metrics").text, re.MULTILINE)


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "prefix_id": "pfx-does-not-exist"}),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "prefix_id": "nonsense"}),
    ("POST", "/v1/prefixes", {"prompt": "x", "prefix_id": "pfx-00"}),
    ("GET", "/v1/prefixes/pfx-00", None),
    ("DELETE", "/v1/prefixes/pfx-00", None),
])
def test_unknown_prefix_ids_get_a_404(server, method, path, body):
    r = httpx.request(method, server.base_url + path, json=body, timeout=30)
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "prefix_not_found" and err["param"] == "prefix_id"
    assert err["type"] == "invalid_request_error" and "No pinned prefix" in err["message"]


def test_bad_prefix_fields_get_a_400(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny", prompt="x", extra_body={"prefix_id": "pfx-1"})
    for extra, param in (({"pin_prefix": 0}, "pin_prefix"), ({"pin_prefix": 99}, "pin_prefix"),
                         ({"pin_prefix": "yes"}, "pin_prefix")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="abc", max_tokens=1, extra_body=extra)
        assert e.value.body["param"].split(".")[0] == param, e.value.body
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": ["a", "b"], "pin_prefix": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pin_prefix"


# --- the bench suite -----------------------------------------------------------------------------

def test_bench_prefix_suite(ckpts, tmp_path):
    """``python -m statex_serve.bench prefix`` on the in-process engine: every
    mode runs, and the cached-token counts show which prefix each request restored."""
    import json

    from statex_serve.bench import cli

    out = tmp_path / "bench"
    rc = cli.main(["prefix", "--quick", "--no-progress", "--contexts", "100,300", "--requests", "2",
                   "--target", f"engine:{ckpts['gla']}?label=tiny&prefill_chunk=64", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    suite = res["suites"]["prefix"]["tiny"]
    assert suite["pinnable"] and [r["document"] for r in suite["rows"]] == [100, 300]
    for r, followup in zip(suite["rows"], (64, 256)):          # the last segment end inside the document
        assert r["uncached"]["cached_tokens_median"] == 0
        assert r["first_followup"]["cached_tokens_median"] == followup
        assert r["cached"]["cached_tokens_median"] == r["pinned"]["cached_tokens_median"] == r["document"]
        assert r["cached"]["requests_ok"] == 3 and not r["pin"]["error"]
        assert r["cached"]["requests"][0]["prompt_tokens"] == r["document"] + 32
    assert set(suite["flatness"]) == {"uncached", "first_followup", "cached", "pinned"}
    assert "## Prefix cache" in (out / "results.md").read_text() and res["plots"] == ["prefix.png"]
