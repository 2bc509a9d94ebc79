"""Host (CPU) time the native engine spends per generated token, apart from the model:
    python scripts/host_overhead.py [--streams 64] [--tokens 256]
1. the per-sequence bookkeeping of one token (``SequenceState.append`` with
   incremental detokenization, then ``take_delta``), with the bundled model's
   tokenizer;
2. the whole engine loop with a model that costs nothing (``runner.decode`` and
   ``runner.prefill`` return fixed logits): scheduling, sampling, bookkeeping,
   the hand-over to the event loop and a consumer per stream, per step and per
   token, in wall and CPU time, and the garbage collector's pauses meanwhile
   (``--no-gc-freeze``: without the engine's freeze of its start-up heap);
3. (printed before 2) what one full garbage collection costs once an engine is
   built, with and without that freeze.
On a GPU the model's step overlaps (2) only partly (run-ahead, docs/perf.md),
so these numbers bound throughput at high concurrency.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import time

import torch


def bookkeeping_us(tokenizer, streams: int, tokens: int) -> float:
    from statex_serve.engine.base import SamplingParams
    from statex_serve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
    from statex_serve.engine.sequence import SequenceState

    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    seqs = [SequenceState(index=0, slot=i, params=params, generator=None,
                          detokenizer=IncrementalDetokenizer(tokenizer, [65, 66, 67], True),
                          stops=StopStringMatcher((), False), stop_token_ids=frozenset()) for i in range(streams)]
    ids = [random.randrange(32, 120) for _ in range(tokens)]
    t0 = time.perf_counter()
    for tok in ids:
        for s in seqs:
            s.append(tok, None, 10**6)
            s.take_delta()
    return (time.perf_counter() - t0) / (tokens * streams) * 1e6


def engine_loop(model_dir: str, streams: int, tokens: int, gc_freeze: bool = True,
                real_prefill: bool = False) -> dict:
    """``streams`` concurrent requests with a zero-cost model (decode, and prefill
    unless ``real_prefill``, return fixed logits): ms per engine step, us per token of wall and of the
    process's CPU time, and the cyclic garbage collector's pauses while they ran.
    ``gc_freeze=False`` undoes the engine's freeze of its start-up heap, to show
    what it saves."""
    from statex_serve.engine import EngineArgs, GenerationRequest, SamplingParams
    from statex_serve.engine.native import NativeEngine

    engine = NativeEngine(EngineArgs(model=model_dir, max_num_seqs=streams, device="cpu"))
    fixed = torch.randn(streams, engine.vocab_size)
    engine.runner.decode = lambda ids, slots: fixed[:len(slots)]     # a model that costs nothing
    if not real_prefill:
        engine.runner.prefill = lambda ids, lens, slots, init, all_logits=False: fixed[:len(lens)]
    pauses: list[tuple[int, float]] = []        # (generation, seconds) per collection
    began: list[float] = []

    def on_gc(phase, info):
        if phase == "start":
            began[:] = [time.perf_counter()]
        elif began:
            pauses.append((info["generation"], time.perf_counter() - began[0]))

    async def one(i):
        n = 0
        prompt = [random.randrange(32, 120) for _ in range(16)]
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(f"r{i}", prompt, params)):
            n += sum(len(d.token_ids) for d in out.outputs)
        return n

    async def main():
        await engine.start()
        if not gc_freeze:
            gc.unfreeze()
        gc.callbacks.append(on_gc)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(await asyncio.gather(*(one(i) for i in range(streams))))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            gc.callbacks.remove(on_gc)
        steps = engine.stats().steps_total
        await engine.shutdown()
        return {"ms_per_step": wall / steps * 1e3, "us_per_token": wall / n * 1e6, "cpu_us_per_token": cpu / n * 1e6,
                "gc_collections": len(pauses), "gc_ms": sum(p for _, p in pauses) * 1e3,
                "gc_longest_ms": max((p for _, p in pauses), default=0.0) * 1e3,
                "gc_full_collections": sum(g == 2 for g, _ in pauses)}

    return asyncio.run(main())


def full_collection_ms(model_dir: str) -> tuple[int, float, float]:
    """(objects the collector tracks once an engine is built, ms of a full
    collection, ms of one with that heap frozen as NativeEngine.start does)."""
    from statex_serve.engine import EngineArgs
    from statex_serve.engine.native import NativeEngine

    engine = NativeEngine(EngineArgs(model=model_dir, max_num_seqs=8, device="cpu"))

    def collect_ms() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - t0) * 1e3

    tracked = len(gc.get_objects())
    plain = min(collect_ms() for _ in range(3))
    gc.freeze()
    try:
        frozen = min(collect_ms() for _ in range(3))
    finally:
        gc.unfreeze()
    del engine
    return tracked, plain, frozen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent sequences")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--real-prefill", action="store_true",
                    help="run the model's own prefill on the CPU (by default prefill costs nothing too)")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="undo the engine's freeze of its start-up heap (gc.freeze) before the loop, to see "
                         "the garbage collector's pauses without it")
    args = ap.parse_args(argv)
    if args.streams < 1 or args.tokens < 2:
        ap.error("--streams must be at least 1 and --tokens at least 2")
    torch.set_num_threads(1)
    from statex_serve import bundled
    from statex_serve.engine.loading import load_tokenizer

    model_dir = str(bundled.default_model_path())
    us = bookkeeping_us(load_tokenizer(model_dir), args.streams, args.tokens)
    print(f"bookkeeping (append + take_delta): {us:.1f} us per token", flush=True)
    tracked, plain, frozen = full_collection_ms(model_dir)
    print(f"a full garbage collection with an engine built: {plain:.1f} ms over {tracked:,} tracked objects; "
          f"{frozen:.1f} ms with them frozen", flush=True)
    r = engine_loop(model_dir, args.streams, args.tokens, gc_freeze=not args.no_gc_freeze,
                    real_prefill=args.real_prefill)
    print(f"engine loop, zero-cost model, {args.streams} streams: {r['ms_per_step']:.2f} ms per step, "
          f"{r['us_per_token']:.1f} us per token ({r['cpu_us_per_token']:.1f} us of CPU)")
    print(f"garbage collector{' (start-up heap not frozen)' if args.no_gc_freeze else ''}: "
          f"{r['gc_collections']} collections, {r['gc_full_collections']} full, {r['gc_ms']:.1f} ms in all, "
          f"the longest {r['gc_longest_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
