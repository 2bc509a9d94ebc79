"""Host (CPU) time the native engine spends per generated token, apart from the model:
    python scripts/host_overhead.py [--streams 64] [--tokens 256]
1. the per-sequence bookkeeping of one token (``SequenceState.append`` with
   incremental detokenization, then ``take_delta``), with the bundled model's
   tokenizer;
2. the whole engine loop with a model that costs nothing (``runner.decode``
   returns fixed logits): scheduling, sampling, bookkeeping, the hand-over to
   the event loop and a consumer per stream, per step and per token.
On a GPU the model's step overlaps (2) only partly (run-ahead, docs/perf.md),
so these numbers bound throughput at high concurrency.
"""
from __future__ import annotations

import argparse
import asyncio
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


def engine_loop(model_dir: str, streams: int, tokens: int) -> tuple[float, float]:
    """(ms per engine step, us per token) of ``streams`` concurrent requests with a zero-cost model."""
    from statex_serve.engine import EngineArgs, GenerationRequest, SamplingParams
    from statex_serve.engine.native import NativeEngine

    engine = NativeEngine(EngineArgs(model=model_dir, max_num_seqs=streams, device="cpu"))
    fixed = torch.randn(streams, engine.vocab_size)
    engine.runner.decode = lambda ids, slots: fixed[:len(ids)]     # a model that costs nothing

    async def one(i):
        n = 0
        prompt = [random.randrange(32, 120) for _ in range(16)]
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(GenerationRequest(f"r{i}", prompt, params)):
            n += sum(len(d.token_ids) for d in out.outputs)
        return n

    async def main():
        await engine.start()
        t0 = time.perf_counter()
        n = sum(await asyncio.gather(*(one(i) for i in range(streams))))
        wall = time.perf_counter() - t0
        steps = engine.stats().steps_total
        await engine.shutdown()
        return wall / steps * 1e3, wall / n * 1e6

    return asyncio.run(main())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent sequences")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    args = ap.parse_args(argv)
    if args.streams < 1 or args.tokens < 2:
        ap.error("--streams must be at least 1 and --tokens at least 2")
    torch.set_num_threads(1)
    from statex_serve import bundled
    from statex_serve.engine.loading import load_tokenizer

    model_dir = str(bundled.default_model_path())
    us = bookkeeping_us(load_tokenizer(model_dir), args.streams, args.tokens)
    print(f"bookkeeping (append + take_delta): {us:.1f} us per token", flush=True)
    ms_step, us_tok = engine_loop(model_dir, args.streams, args.tokens)
    print(f"engine loop, zero-cost model, {args.streams} streams: {ms_step:.2f} ms per step, "
          f"{us_tok:.1f} us per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
