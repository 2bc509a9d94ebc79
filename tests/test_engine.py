"""The native engine in-process (no HTTP): the state pool's exact size,
batching invariance against ``model.greedy_generate``, chunked prefill that
never stalls decoding, n > 1 from one prefill, aborts, the bounded queue, and
failures that stay with the requests they hit."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from model_registry.testing import make_tiny_checkpoint
from statex_serve.engine import (
    EngineArgs, EngineOverloadedError, GenerationRequest, InvalidRequestError, RequestFailedError, SamplingParams,
)
from statex_serve.engine.native import NativeEngine

from engine_helpers import run_engine

FAMILIES = ["gla", "gla_conv", "mamba2"]
VARIANTS = {"gla": ("gla", {}), "gla_conv": ("gla", {"use_short_conv": True}), "mamba2": ("mamba2", {})}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: str(make_tiny_checkpoint(root / f, family=VARIANTS[f][0], seed=1, **VARIANTS[f][1]))
            for f in FAMILIES}


async def collect(engine, rid, prompt, **params):
    """(token ids per sequence, text per sequence, outputs) of one request."""
    n = params.get("n", 1)
    ids, texts, outs = [[] for _ in range(n)], ["" for _ in range(n)], []
    async for out in engine.generate(GenerationRequest(rid, prompt, SamplingParams(**params))):
        outs.append(out)
        for d in out.outputs:
            ids[d.index] += d.token_ids
            texts[d.index] += d.text
    return ids, texts, outs


async def wait_until(cond, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def first_divergence_gap(model, prompt, got, want) -> str:
    """On a mismatch, how close the oracle's top two logits were where the
    outputs part (a numerical near-tie is the only excusable cause)."""
    j = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:j]])).logits[0, -1]
    top = logits.topk(2).values
    return f"first difference at token {j}; oracle top-2 logit gap there {float(top[0] - top[1]):.2e}"


# --- memory ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_pool_bytes_per_sequence_are_exact(checkpoints, family):
    engine = NativeEngine(EngineArgs(model=checkpoints[family], max_num_seqs=5))
    spec = engine.model.state_spec()
    bps = spec.bytes_per_sequence
    assert engine.spec.bytes_per_sequence == bps
    assert engine.runner.pools.nbytes == 5 * bps
    for layer_spec, layer_pool in zip(spec.layers, engine.runner.pools.pools):   # no padding anywhere
        for t in layer_spec.tensors:
            assert tuple(layer_pool[t.name].shape) == (5, *t.shape) and layer_pool[t.name].dtype == t.dtype
    budget = 7 * bps + bps // 2
    engine = NativeEngine(EngineArgs(model=checkpoints[family], state_memory=budget))
    assert engine.num_slots == budget // bps == spec.capacity(budget) == 7
    assert engine.runner.pools.nbytes == 7 * bps
    assert engine.stats().slots_total == 7 and engine.stats().state_pool_bytes == 7 * bps
    capped = NativeEngine(EngineArgs(model=checkpoints[family], state_memory=budget, max_num_seqs=3))
    assert capped.num_slots == 3
    half = NativeEngine(EngineArgs(model=checkpoints[family], state_memory=budget, state_dtype="bfloat16"))
    assert half.spec.bytes_per_sequence < bps and half.num_slots == budget // half.spec.bytes_per_sequence
    with pytest.raises(ValueError, match="holds no sequence"):
        NativeEngine(EngineArgs(model=checkpoints[family], state_memory=bps - 1))


def test_prefill_chunk_defaults_per_device(checkpoints):
    """Large segments on a GPU (a prefill call's fixed cost dominates there), small
    on CPU; an explicit --prefill-chunk wins everywhere."""
    args = EngineArgs(model=checkpoints["gla"])
    assert args.prefill_chunk_for("cuda") == 8192 and args.prefill_chunk_for("cpu") == 512
    assert EngineArgs(model=checkpoints["gla"], prefill_chunk=96).prefill_chunk_for("cuda") == 96
    engine = NativeEngine(args)
    assert engine.prefill_chunk == 512 and engine.scheduler.prefill_chunk == 512
    from statex_serve.engine.detokenizer import _BYTE_TABLES

    assert _BYTE_TABLES.get(engine.tokenizer) is not None     # built at start, not in the first request's step
    assert engine.describe()["prefill_chunk"] == 512
    with pytest.raises(ValueError, match="--prefill-chunk must be at least 1"):
        EngineArgs(model=checkpoints["gla"], prefill_chunk=0)


# --- batching invariance ----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_greedy_requests_match_the_oracle(checkpoints, family):
    """32 requests of different lengths (some prefilled in several segments),
    arriving in two waves so sequences join and leave running batches."""
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 140))] for _ in range(32)]
    lengths = [rng.randrange(4, 24) for _ in range(32)]

    async def test(engine):
        async def one(i):
            if i >= 16:
                await asyncio.sleep(0.05 * (i - 15))
            ids, _, _ = await collect(engine, f"r{i}", prompts[i], max_tokens=lengths[i], temperature=0.0,
                                      ignore_eos=True)
            return ids[0]
        got = await asyncio.gather(*(one(i) for i in range(32)))
        return got, engine.stats()

    got, stats = run_engine(checkpoints[family], test, max_num_seqs=20, prefill_chunk=48)
    assert stats.max_prefill_tokens_per_step <= 48 and stats.slots_used == 0
    model = NativeEngine(EngineArgs(model=checkpoints[family], max_num_seqs=1)).model
    for p, n, g in zip(prompts, lengths, got):
        want = model.greedy_generate(p, n)
        assert g == want, first_divergence_gap(model, p, g, want)


def test_gla_short_conv_engine_matches_whole_sequence_forwards(checkpoints):
    """GLA with use_short_conv through the engine (prompts prefilled in segments
    shorter than, and not a multiple of, the conv window; decoded in batches
    through the pool's conv windows): the greedy tokens of re-running the whole
    sequence with path (a) each step, which keeps no state at all."""
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 2, 5, 23, 40)]

    async def test(engine):
        async def one(i):
            ids, _, _ = await collect(engine, f"c{i}", prompts[i], max_tokens=8, temperature=0.0, ignore_eos=True)
            return ids[0]
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    engine_args = dict(max_num_seqs=3, prefill_chunk=3)
    got = run_engine(checkpoints["gla_conv"], test, **engine_args)
    model = NativeEngine(EngineArgs(model=checkpoints["gla_conv"], max_num_seqs=1)).model
    assert model.config.use_short_conv
    for p, g in zip(prompts, got):
        want = []
        with torch.no_grad():
            for _ in range(8):
                want.append(int(model(torch.tensor([p + want])).logits[0, -1].argmax()))
        assert g == want, first_divergence_gap(model, p, g, want)


def test_warm_up_covers_the_prefill_variants_and_leaves_slots_usable(checkpoints):
    """The GPU warm-up (run here on CPU, where it compiles nothing) prefills one,
    several and 16 sequences with token counts of 1, multiples of 16 and
    neither, fresh and carried; the slots it dirtied serve requests exactly."""
    engine = NativeEngine(EngineArgs(model=checkpoints["gla"], max_num_seqs=16, prefill_chunk=48))
    batches = engine.runner.prefill_warmup_batches(48)
    counts = {len(b) for b in batches}
    totals = {sum(b) for b in batches}
    assert {1, 2, 3, 16} <= counts
    assert 1 in totals and any(t % 16 == 0 for t in totals if t > 1) and any(t % 16 for t in totals if t > 1)
    assert engine.runner.warm_up_prefill(48, engine.vocab_size) >= 2 * len(batches)
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 60))] for _ in range(6)]

    async def test(engine):
        async def one(i):
            ids, _, _ = await collect(engine, f"w{i}", prompts[i], max_tokens=8, temperature=0.0, ignore_eos=True)
            return ids[0]
        return await asyncio.gather(*(one(i) for i in range(6)))

    async def main():
        await engine.start()
        try:
            return await test(engine)
        finally:
            await engine.shutdown()
    got = asyncio.run(main())
    for p, g in zip(prompts, got):
        assert g == engine.model.greedy_generate(p, 8)


def test_runner_sends_segments_to_the_prefill_graphs_it_has(checkpoints, monkeypatch):
    """Prefill graphs exist on CUDA only, so their replay is stood in for here (the
    choice of graph is the real one): one segment replays its token bucket's graph;
    a burst the smallest lanes graph that holds it, unless that is mostly padding;
    all-logits calls and segments longer than the graphs' stay eager."""
    from statex_serve.engine.runner import _PrefillGraphs, lane_buckets, prefill_buckets

    assert lane_buckets(8192) == sorted(
        [(2, 128), (2, 256), (2, 512), (2, 1024), (2, 2048), (2, 4096), (4, 128), (4, 256), (4, 512), (4, 1024),
         (4, 2048), (8, 128), (8, 256), (8, 512), (8, 1024)], key=lambda b: (b[0] * b[1], b[0]))
    graphs = object.__new__(_PrefillGraphs)        # the host-side choice only: no capture
    graphs.buckets = prefill_buckets(8192)
    graphs.keys = [(1, b) for b in graphs.buckets] + lane_buckets(8192)
    assert graphs.key_for([1024] * 8) == (8, 1024)          # the load bench's burst: no padding
    assert graphs.key_for([1024] * 7 + [100]) == (8, 1024)
    assert graphs.key_for([100, 30, 7]) == (4, 128)          # small: padding is cheaper than an eager launch
    assert graphs.key_for([2000, 20]) == (2, 2048)
    assert graphs.key_for([1000] * 8 + [192]) is None        # 9 segments: no 16-lane graph
    assert graphs.key_for([4000, 100, 100]) is None          # 4 x 4096 would be 5x padding
    assert graphs.key_for([700]) == (1, 768) and graphs.key_for([8193]) is None

    # what a replay is given: each prompt at the start of its lane, padding after it,
    # cu / slots / has_init in the layout of prefill(padded=True), unused lanes empty
    class Replay:
        def replay(self):
            pass

    graphs.ids = torch.full((16,), -7, dtype=torch.long)
    graphs.meta = {(4, 4): (torch.zeros(9, dtype=torch.int32), torch.zeros(8, dtype=torch.int32),
                            torch.zeros(8, dtype=torch.bool))}
    graphs.graphs = {(4, 4): (Replay(), torch.arange(4.0)[:, None].expand(4, 3))}
    got = graphs.run((4, 4), [1, 2, 3, 4, 5, 6], [2, 4], [3, 1], [False, True])
    assert graphs.ids.tolist() == [1, 2, 0, 0, 3, 4, 5, 6] + [-7] * 8     # unused lanes: left as they were
    cu, slot_t, init_t = graphs.meta[(4, 4)]
    assert cu.tolist() == [0, 2, 4, 8, 8, 8, 12, 12, 16]
    assert slot_t.tolist() == [3, -1, 1, -1, -1, -1, -1, -1]
    assert init_t.tolist() == [False, False, True, False, False, False, False, False]
    assert got.tolist() == [[0.0] * 3, [1.0] * 3]

    engine = NativeEngine(EngineArgs(model=checkpoints["gla"], max_num_seqs=4, prefill_chunk=48))
    runner = engine.runner
    replays, eager = [], []

    class Graphs:
        def key_for(self, seq_lens):
            return graphs.key_for(seq_lens) if max(seq_lens) <= 1024 else None

        def run(self, key, ids, seq_lens, slots, carried):
            replays.append((key, list(ids), list(seq_lens), list(slots), list(carried)))
            return torch.tensor([[float(s)] * 3 for s in slots])

    monkeypatch.setattr(runner, "prefill_graphs", Graphs())
    monkeypatch.setattr(runner, "_prefill_eager", lambda *a, **kw: eager.append((a, kw)) or torch.zeros(1, 3))
    got = runner.prefill([1, 2, 3, 4, 5], [2, 3], [1, 3], [False, True])
    assert replays == [((2, 128), [1, 2, 3, 4, 5], [2, 3], [1, 3], [False, True])] and not eager
    assert got.tolist() == [[1.0] * 3, [3.0] * 3]
    runner.prefill([7, 8], [2], [2], [True])
    assert replays[-1] == ((1, 64), [7, 8], [2], [2], [True])
    runner.prefill([7, 8], [2], [2], [True], all_logits=True)
    runner.prefill(list(range(1025)), [1025], [0], [False])
    runner.prefill(list(range(1034)), [1, 2, 3, 4, 1024], [0, 1, 2, 3, 0], [False] * 5)   # 8 x 1024: padding
    assert len(replays) == 2 and len(eager) == 3


# --- chunked prefill --------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_long_prefill_does_not_stall_decoding(checkpoints, family):
    """While a prompt of 12 segments is prefilled, a running stream gets a token
    in every one of those steps; the long prompt's output is still exact."""
    chunk, segments = 32, 12
    long_prompt = [random.Random(1).randrange(256) for _ in range(chunk * segments)]

    async def test(engine):
        a_tokens = []
        a_started = asyncio.Event()

        async def stream_a():
            req = GenerationRequest("a", [1, 2, 3], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
            async for out in engine.generate(req):
                a_tokens.extend(out.outputs[0].token_ids if out.outputs else [])
                a_started.set()
                if len(a_tokens) > 300:
                    break
        task = asyncio.create_task(stream_a())
        await a_started.wait()
        before_tokens, before_steps = len(a_tokens), engine.stats().steps_total
        b = engine.generate(GenerationRequest("b", long_prompt, SamplingParams(max_tokens=5, temperature=0,
                                                                               ignore_eos=True)))
        first = await b.__anext__()
        during_tokens, during_steps = len(a_tokens) - before_tokens, engine.stats().steps_total - before_steps
        rest = [d for out in [o async for o in b] for d in out.outputs]
        task.cancel()
        b_ids = first.outputs[0].token_ids + [t for d in rest for t in d.token_ids]
        return during_tokens, during_steps, b_ids, engine.stats()

    during_tokens, during_steps, b_ids, stats = run_engine(checkpoints[family], test, max_num_seqs=4,
                                                            prefill_chunk=chunk)
    assert during_steps >= segments
    assert during_tokens >= segments - 1, (during_tokens, during_steps)
    assert stats.max_prefill_tokens_per_step <= chunk
    model = NativeEngine(EngineArgs(model=checkpoints[family], max_num_seqs=1)).model
    assert b_ids == model.greedy_generate(long_prompt, 5)


def test_prompt_logprobs_across_segments(checkpoints):
    prompt = [random.Random(2).randrange(256) for _ in range(50)]

    async def test(engine):
        _, _, outs = await collect(engine, "s", prompt, max_tokens=0, prompt_logprobs=3)
        return outs

    outs = run_engine(checkpoints["gla"], test, max_num_seqs=2, prefill_chunk=16)
    assert outs[-1].finished and outs[0].prompt_logprobs is not None
    lps = outs[0].prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    model = NativeEngine(EngineArgs(model=checkpoints["gla"], max_num_seqs=1)).model
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for t in range(1, len(prompt)):
        assert lps[t].token_id == prompt[t]
        assert abs(lps[t].logprob - float(ref[t - 1, prompt[t]])) < 1e-4
        assert [i for i, _ in lps[t].top] == ref[t - 1].topk(3).indices.tolist()


def test_run_ahead_changes_no_output(checkpoints):
    """Launching decode step n+1 before step n's host work gives exactly the
    outputs of running the steps one after the other: lengths that end at
    different steps, a stop string, a stop token, seeded sampling with
    logprobs, n = 2, and an abort in the middle of a stream."""
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(3, 40))] for _ in range(8)]

    async def run(engine, params):
        async def one(i):
            if i == 7:            # aborted after its first output
                stream = engine.generate(GenerationRequest("abort-me", prompts[i], SamplingParams(
                    max_tokens=50, temperature=0.0, ignore_eos=True)))
                async for _ in stream:
                    break
                await stream.aclose()
                return None
            ids, texts, outs = await collect(engine, f"r{i}", prompts[i], **params[i])
            return ids, texts, [d.finish_reason for o in outs for d in o.outputs if d.finish_reason]
        got = await asyncio.gather(*(one(i) for i in range(8)))
        await wait_until(lambda: engine.stats().slots_used == 0)
        return got, engine._run_ahead_steps

    base = [dict(max_tokens=5 + 4 * i, temperature=0.0, ignore_eos=True) for i in range(8)]
    first, _ = run_engine(checkpoints["gla"], lambda e: run(e, base), max_num_seqs=10, run_ahead=False)
    params = [dict(p) for p in base]
    params[1].update(stop=(first[1][1][0][3:5],))                     # a stop string it meets
    params[2].update(stop_token_ids=(first[2][0][0][4],), ignore_eos=False)   # a stop token it meets
    params[3].update(temperature=1.0, seed=3, logprobs=2)
    params[4].update(n=2, temperature=0.8, seed=9)
    want, none = run_engine(checkpoints["gla"], lambda e: run(e, params), max_num_seqs=10, run_ahead=False)
    got, ahead = run_engine(checkpoints["gla"], lambda e: run(e, params), max_num_seqs=10)
    assert none == 0 and ahead > 10
    assert got == want
    assert want[1][2] == ["stop"] and want[2][2] == ["stop"] and len(want[2][0][0]) == 5


def test_chained_greedy_steps_change_no_output(checkpoints):
    """Plain greedy streams chain their steps on the device (the next step reads
    this step's argmax before the host does): outputs equal the unchained run's,
    where streams end by length and by stop tokens mid-run (a step computed for
    nothing then), and slots freed that way serve the next requests exactly."""
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(3, 40))] for _ in range(9)]

    async def run(engine, params):
        async def one(i):
            ids, _, outs = await collect(engine, f"c{i}", prompts[i], **params[i])
            return ids, [d.finish_reason for o in outs for d in o.outputs if d.finish_reason]
        got = await asyncio.gather(*(one(i) for i in range(6)))
        got += await asyncio.gather(*(one(i) for i in range(6, 9)))     # into the slots just freed
        await wait_until(lambda: engine.stats().slots_used == 0)
        return got, engine._chained_steps

    params = [dict(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True) for i in range(9)]
    first, _ = run_engine(checkpoints["gla"], lambda e: run(e, params), max_num_seqs=6, run_ahead=False)
    for i in (1, 3, 4):      # a stop token each stream meets mid-run
        params[i].update(stop_token_ids=(first[i][0][0][2 + i],), ignore_eos=False)
    want, none = run_engine(checkpoints["gla"], lambda e: run(e, params), max_num_seqs=6, run_ahead=False)
    got, chained = run_engine(checkpoints["gla"], lambda e: run(e, params), max_num_seqs=6)
    assert none == 0 and chained > 10
    assert got == want
    assert all(want[i][1] == ["stop"] for i in (1, 3, 4)) and want[0][1] == ["length"]


def test_step_trace_records_every_step(checkpoints, tmp_path, monkeypatch):
    """STATEX_STEP_TRACE: a line per step whose decode rows and prefill tokens add
    up to what the requests generated and prefilled; the summary reads it."""
    from statex_serve.engine import step_trace

    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("STATEX_STEP_TRACE", str(path))
    prompts = [list(range(3, 3 + n)) for n in (5, 70, 130)]

    async def test(engine):
        outs = await asyncio.gather(*(collect(engine, f"t{i}", p, max_tokens=7, temperature=0.0, ignore_eos=True)
                                      for i, p in enumerate(prompts)))
        return engine.stats(), outs

    stats, outs = run_engine(checkpoints["gla"], test, max_num_seqs=4, prefill_chunk=64)
    records = step_trace.read(str(path))
    assert len(records) == stats.steps_total
    assert sum(r["prefill_tokens"] for r in records) == sum(map(len, prompts))
    assert max(r["prefill_tokens"] for r in records) <= 64
    # each request's first token comes from its prefill, the other six from decode steps
    # (a step launched ahead counts its rows where it is consumed)
    assert sum(r["decode_rows"] for r in records) == 6 * len(prompts)
    assert all(r["t"] >= 0 and r.get("decode_ms", 0) >= 0 for r in records)
    assert [len(ids[0]) for ids, _, _ in outs] == [7, 7, 7]
    table = step_trace.summarize(records)
    assert "| decode |" in table and "| mixed |" in table and f"{len(records)} steps" in table
    assert step_trace.main([str(tmp_path / "missing.jsonl")]) == 1
    monkeypatch.setenv("STATEX_STEP_TRACE", str(tmp_path / "no-such-dir" / "steps.jsonl"))
    with pytest.raises(OSError, match="STATEX_STEP_TRACE=.*cannot write there"):
        NativeEngine(EngineArgs(model=checkpoints["gla"], max_num_seqs=2))


# --- n > 1 ------------------------------------------------------------------------------

def test_n_sequences_share_one_prefill(checkpoints):
    prompt = list(range(40, 90))

    async def test(engine):
        before = engine.stats().prompt_tokens_total
        greedy, _, _ = await collect(engine, "g", prompt, n=4, max_tokens=12, temperature=0, ignore_eos=True)
        prefilled = engine.stats().prompt_tokens_total - before
        s1, t1, _ = await collect(engine, "s1", prompt, n=3, max_tokens=12, temperature=1.0, seed=5)
        s2, t2, _ = await collect(engine, "s2", prompt, n=3, max_tokens=12, temperature=1.0, seed=5)
        return greedy, prefilled, (s1, t1), (s2, t2), engine.stats()

    greedy, prefilled, first, second, stats = run_engine(checkpoints["gla"], test, max_num_seqs=4)
    assert prefilled == len(prompt)                       # once, not n times
    model = NativeEngine(EngineArgs(model=checkpoints["gla"], max_num_seqs=1)).model
    assert greedy == [model.greedy_generate(prompt, 12)] * 4
    assert first == second                                # seeds reproduce, text included
    assert len({tuple(s) for s in first[0]}) > 1          # sequence i samples with seed + i
    assert stats.slots_used == 0


# --- aborts, the queue, failures ----------------------------------------------------------

def test_abort_frees_slots_at_once_and_the_queue_is_bounded(checkpoints):
    async def test(engine):
        long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
        a = engine.generate(GenerationRequest("a", [5, 6], long))
        await a.__anext__()
        b = engine.generate(GenerationRequest("b", [7], long))         # waits: the pool has one slot
        with pytest.raises(EngineOverloadedError) as exc:
            engine.generate(GenerationRequest("c", [8], long))          # --max-queue 1
        assert exc.value.retry_after > 0
        s = engine.stats()
        assert (s.slots_used, s.running_requests, s.waiting_requests) == (1, 1, 1)
        await b.aclose()                                                # a waiting request leaves
        await wait_until(lambda: engine.stats().waiting_requests == 0)
        c = engine.generate(GenerationRequest("c", [8], long))
        await a.aclose()                                                # the running one leaves: c starts
        out = await c.__anext__()
        assert out.outputs and out.outputs[0].token_ids
        await c.aclose()
        await wait_until(lambda: engine.stats().slots_used == 0)
        return engine.stats()

    stats = run_engine(checkpoints["gla"], test, max_num_seqs=1, max_queue=1)
    assert stats.requests_aborted_total == 3


def test_a_failing_step_fails_only_its_requests(checkpoints):
    async def test(engine):
        real = engine.runner.decode
        calls = {"n": 0}

        def flaky(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected decode failure")
            return real(*args, **kw)
        engine.runner.decode = flaky
        with pytest.raises(RequestFailedError, match="engine failed") as failed:
            await collect(engine, "x", [1, 2, 3], max_tokens=10, temperature=0, ignore_eos=True)
        assert "injected" not in str(failed.value)      # the client sees no internals (the log has them)
        assert engine.stats().slots_used == 0
        ids, _, _ = await collect(engine, "y", [1, 2, 3], max_tokens=10, temperature=0, ignore_eos=True)
        return ids[0]

    ids = run_engine(checkpoints["gla"], test, max_num_seqs=2)
    assert len(ids) == 10


def test_requests_the_engine_refuses(checkpoints):
    async def test(engine):
        cases = [
            ([], SamplingParams(), "empty"),
            ([1, 9999], SamplingParams(), "outside the vocabulary"),
            ([1] * 60, SamplingParams(max_tokens=10), "maximum context length"),
            ([1], SamplingParams(n=3), "n must be between 1 and 2"),
            ([1], SamplingParams(max_tokens=0), "max_tokens must be at least 1"),
            ([1], SamplingParams(top_p=0.0), "top_p"),
            ([1], SamplingParams(logprobs=21), "logprobs"),
            ([1], SamplingParams(stop=("",)), "stop strings"),
        ]
        for prompt, params, message in cases:
            with pytest.raises(InvalidRequestError, match=message):
                engine.generate(GenerationRequest("r", prompt, params))
        ids, _, _ = await collect(engine, "ok", [1, 2], max_tokens=3, temperature=0, ignore_eos=True)
        return ids[0]

    assert len(run_engine(checkpoints["gla"], test, max_num_seqs=2, max_model_len=64)) == 3
