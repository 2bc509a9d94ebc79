"""Latency suite: TTFT, TPOT, ITL, end-to-end latency and throughput vs context
length, at each concurrency level, with percentiles, the memory-bandwidth floor
of the model, and how flat TPOT stays as the context grows.

Each cell (context length, concurrency c) sends ``max(requests, c)`` requests
with c in flight at a time. A prompt is ``context`` random token ids (no special
tokens; a fresh seed per request, so no prefix cache helps); the completion is
``output_len`` tokens, greedy, EOS ignored.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import numpy as np

from statex_serve.bench.modelinfo import ModelFacts
from statex_serve.bench.targets import RequestResult, Target

METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass
class LatencyConfig:
    contexts: list[int]
    concurrency: list[int]
    output_len: int
    requests: int
    warmup: int = 1
    seed: int = 0


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float) * 1e3
    return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "min_ms": float(a.min()), "max_ms": float(a.max()), "n": len(a)}


def prompt_token_pool(tokenizer, vocab_limit: int | None = None) -> list[int]:
    """Token ids a prompt may use: the tokenizer's vocabulary minus special tokens."""
    special = set(tokenizer.all_special_ids or [])
    n = len(tokenizer)
    if vocab_limit:
        n = min(n, vocab_limit)
    return [i for i in range(n) if i not in special]


def random_prompt(pool: list[int], length: int, seed: str) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(length)]


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "ttft": percentiles([r.ttft for r in ok]),
        "tpot": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl": percentiles([x for r in ok for x in r.itl]),
        "e2e": percentiles([r.e2e for r in ok]),
        "requests_ok": len(ok), "requests_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "wall_s": wall, "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "output_throughput_tok_s": out_tokens / wall if wall > 0 else None,
        "total_throughput_tok_s": (in_tokens + out_tokens) / wall if wall > 0 else None,
        "request_throughput_s": len(ok) / wall if wall > 0 else None,
    }


async def run_cell(target: Target, prompts: list[list[int]], output_len: int, concurrency: int,
                   on_done=None) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(concurrency)

    async def one(p):
        async with sem:
            r = await target.generate(p, output_len)
        if on_done:
            on_done()
        return r

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return list(results), time.perf_counter() - t0


def flatness(cells: list[dict]) -> dict:
    """Per concurrency: median TPOT at the longest context over the shortest, and
    the least-squares slope in ms per 1K tokens of context."""
    out = {}
    for c in sorted({cell["concurrency"] for cell in cells}):
        pts = [(cell["context"], cell["summary"]["tpot"]["p50_ms"]) for cell in cells
               if cell["concurrency"] == c and cell["summary"]["tpot"]]
        if len(pts) < 2:
            continue
        x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        slope = float(np.polyfit(x / 1e3, y, 1)[0]) if len(set(x)) > 1 else 0.0
        out[str(c)] = {"contexts": [int(v) for v in x], "tpot_p50_ms": [float(v) for v in y],
                       "ratio_longest_to_shortest": float(y[-1] / y[0]) if y[0] > 0 else None,
                       "slope_ms_per_1k_tokens": slope}
    return out


async def run_latency(target: Target, cfg: LatencyConfig, facts: ModelFacts | None, bandwidth: float,
                      progress=None) -> dict:
    """The latency suite on one target: a cell per (context, concurrency), the skipped contexts, flatness, the floor."""
    tok = target.tokenizer()
    pool = prompt_token_pool(tok, facts.vocab_size if facts else None)
    max_len = target.max_model_len
    runnable, skipped = [], []
    for ctx in cfg.contexts:
        if max_len and ctx + cfg.output_len > max_len:
            skipped.append({"context": ctx, "reason": f"context + output_len > max_model_len {max_len}"})
        else:
            runnable.append(ctx)
    tick = (lambda: progress.update(1)) if progress is not None else None
    if runnable and cfg.warmup:
        warm = [random_prompt(pool, runnable[0], f"warmup/{cfg.seed}/{i}") for i in range(cfg.warmup)]
        await run_cell(target, warm, cfg.output_len, max(cfg.concurrency), tick)
    cells = []
    for ctx in runnable:
        for c in cfg.concurrency:
            n = max(cfg.requests, c)
            prompts = [random_prompt(pool, ctx, f"latency/{cfg.seed}/{ctx}/{c}/{i}") for i in range(n)]
            results, wall = await run_cell(target, prompts, cfg.output_len, c, tick)
            cell = {"context": ctx, "concurrency": c, "summary": summarize(results, wall),
                    "requests": [r.to_dict() for r in results]}
            if facts is not None:
                floor_s = facts.decode_floor_s(c, ctx, bandwidth)
                cell["floor_tpot_ms"] = floor_s * 1e3
                # c streams each at the floor step time: the decode rate the memory system allows
                cell["floor_out_tok_s"] = c / floor_s
                got = cell["summary"]["output_throughput_tok_s"]
                cell["out_tok_s_pct_of_floor"] = 100.0 * got / cell["floor_out_tok_s"] if got else None
            cells.append(cell)
    return {"config": cfg.__dict__, "cells": cells, "skipped": skipped, "tpot_flatness": flatness(cells),
            "floor": {"bandwidth_bytes_s": bandwidth, "model": facts.to_dict() if facts else None,
                      "formula": "(weight bytes + batch x (2 x state bytes + KV bytes of the context)) / bandwidth"}}


def planned_requests(cfg: LatencyConfig, max_len: int | None) -> int:
    n = sum(max(cfg.requests, c) for ctx in cfg.contexts for c in cfg.concurrency
            if not (max_len and ctx + cfg.output_len > max_len))
    return n + (cfg.warmup if n else 0)
