"""Prefix suite: the time to the first token of a short question asked after
a long document, with the document's state reused (the prefix cache) and
without, vs document length. ``python -m statex_serve.bench prefix ...``
(not part of ``all``). The four modes (``MODES``), what each request sends and
how to read the table: docs/prefix-cache.md ("Results").
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from statex_serve.bench.formatting import DPI, ctx_label, fmt_ms, log2_x, md_table
from statex_serve.bench.latency import percentiles, prompt_token_pool, random_prompt
from statex_serve.bench.targets import EngineTarget, OpenAITarget, Target

QUESTION_TOKENS = 32
OUTPUT_TOKENS = 4
MODES = ("uncached", "first_followup", "cached", "pinned")


@dataclass
class PrefixConfig:
    documents: list[int]          # document lengths in tokens
    questions: int                # timed requests per mode and document (first follow-up: one)
    seed: int = 0


@dataclass
class Timed:
    ttft: float | None = None
    cached_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"ttft_s": self.ttft, "cached_tokens": self.cached_tokens, "prompt_tokens": self.prompt_tokens,
                "error": self.error}


# --- one request, through whichever kind of target ------------------------------------------------

async def _ask_url(t: OpenAITarget, prompt: list[int], prefix_id: str | None) -> Timed:
    body = {"model": t.model_name, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if prefix_id is not None:
        body["prefix_id"] = prefix_id
    res = Timed()
    t0 = time.perf_counter()
    try:
        async with t.client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))[:300]
                    break
                usage = chunk.get("usage") or {}
                got = usage.get("completion_tokens") if usage else any(c.get("text") for c in chunk.get("choices", []))
                if got and res.ttft is None:
                    res.ttft = time.perf_counter() - t0
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    except Exception as e:          # noqa: BLE001 - one failed request is a row, not a crash
        res.error = f"{type(e).__name__}: {e}"[:300]
    if res.error is None and res.ttft is None:
        res.error = "the stream ended without a token"
    return res


async def _ask_engine(t: EngineTarget, prompt: list[int], prefix_id: str | None) -> Timed:
    from statex_serve.engine import EngineError, GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    req = GenerationRequest(f"prefix-{uuid.uuid4().hex}", list(prompt), params, prefix_id=prefix_id)
    res = Timed()
    t0 = time.perf_counter()
    try:
        async for out in t.engine.generate(req):
            if res.ttft is None and any(d.token_ids for d in out.outputs):
                res.ttft = time.perf_counter() - t0
            res.cached_tokens, res.prompt_tokens = out.num_cached_tokens, out.num_prompt_tokens
    except EngineError as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    if res.error is None and res.ttft is None:
        res.error = "the engine finished without a token"
    return res


async def ask(t: Target, prompt: list[int], prefix_id: str | None = None) -> Timed:
    if isinstance(t, EngineTarget):
        return await _ask_engine(t, prompt, prefix_id)
    return await _ask_url(t, prompt, prefix_id)


def can_pin(t: Target) -> bool:
    """Our server or engine with its prefix cache on."""
    return bool((t.info.get("engine") or {}).get("prefix_cache")) and isinstance(t, (EngineTarget, OpenAITarget))


async def pin(t: Target, document: list[int]) -> tuple[str | None, float, str | None]:
    """(prefix id, seconds, error) of pinning ``document``."""
    t0 = time.perf_counter()
    if isinstance(t, EngineTarget):
        from statex_serve.engine import EngineError, GenerationRequest, SamplingParams

        req = GenerationRequest(f"pin-{uuid.uuid4().hex}", list(document), SamplingParams(max_tokens=1),
                                pin_prefix=len(document))
        pid = None
        try:
            async for out in t.engine.generate(req):
                pid = out.prefix_id or pid
        except EngineError as e:
            return None, 0.0, str(e)[:300]
        return pid, time.perf_counter() - t0, None
    r = await t.client.post("/v1/prefixes", json={"model": t.model_name, "prompt": list(document)})
    if r.status_code != 200:
        return None, 0.0, f"HTTP {r.status_code}: {r.text[:300]}"
    return r.json()["id"], time.perf_counter() - t0, None


async def unpin(t: Target, prefix_id: str) -> None:
    if isinstance(t, EngineTarget):
        t.engine.delete_prefix(prefix_id)
    else:
        await t.client.delete(f"/v1/prefixes/{prefix_id}")


# --- the suite --------------------------------------------------------------------------------------

def _summary(results: list[Timed]) -> dict:
    ok = [r for r in results if r.error is None]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return {"ttft": percentiles([r.ttft for r in ok]), "requests_ok": len(ok),
            "requests_failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error})[:3],
            "cached_tokens_median": float(np.median(cached)) if cached else None,
            "requests": [r.to_dict() for r in results]}


async def run_prefix(target: Target, cfg: PrefixConfig, log=lambda msg: None) -> dict:
    """The prefix suite on one target: per document length, the TTFT of each mode (``MODES``)."""
    pool = prompt_token_pool(target.tokenizer())
    max_len = target.max_model_len
    pinnable = can_pin(target)
    rows, skipped = [], []
    await ask(target, random_prompt(pool, QUESTION_TOKENS, f"prefix/warmup/{cfg.seed}"))   # first-request costs
    for d in cfg.documents:
        if max_len and d + QUESTION_TOKENS + OUTPUT_TOKENS > max_len:
            skipped.append({"document": d, "reason": f"document + question + output > max_model_len {max_len}"})
            continue
        def question(i: int, kind: str, d: int = d) -> list[int]:
            return random_prompt(pool, QUESTION_TOKENS, f"prefix/{cfg.seed}/{d}/{kind}/{i}")
        row = {"document": d, "question_tokens": QUESTION_TOKENS}
        uncached = []
        for i in range(cfg.questions):
            doc = random_prompt(pool, d, f"prefix/{cfg.seed}/{d}/fresh/{i}")
            uncached.append(await ask(target, doc + question(i, "fresh")))
        row["uncached"] = _summary(uncached)
        doc = random_prompt(pool, d, f"prefix/{cfg.seed}/{d}/doc")
        await ask(target, doc + question(0, "auto"))                       # stores the document's segment ends
        row["first_followup"] = _summary([await ask(target, doc + question(1, "auto"))])
        row["cached"] = _summary([await ask(target, doc + question(2 + i, "auto")) for i in range(cfg.questions)])
        if pinnable:
            pid, seconds, err = await pin(target, random_prompt(pool, d, f"prefix/{cfg.seed}/{d}/pinned-doc"))
            row["pin"] = {"seconds": seconds, "error": err}
            if pid is not None:
                row["pinned"] = _summary([await ask(target, question(i, "pinned"), pid)
                                          for i in range(cfg.questions)])
                await unpin(target, pid)
        u, c = row["uncached"]["ttft"], row["cached"]["ttft"]
        row["speedup_p50"] = u["p50_ms"] / c["p50_ms"] if u and c and c["p50_ms"] > 0 else None
        rows.append(row)
        log(f"prefix {target.label}: document {d}: TTFT p50 uncached {_p50(row, 'uncached')} ms, "
            f"cached {_p50(row, 'cached')} ms, pinned {_p50(row, 'pinned')} ms")
    return {"config": {**cfg.__dict__, "question_tokens": QUESTION_TOKENS, "output_tokens": OUTPUT_TOKENS},
            "pinnable": pinnable, "rows": rows, "skipped": skipped, "flatness": flatness(rows)}


def _p50(row: dict, mode: str) -> float | None:
    s = (row.get(mode) or {}).get("ttft")
    return round(s["p50_ms"], 2) if s else None


def flatness(rows: list[dict]) -> dict:
    """Per mode: median TTFT at the longest document over the shortest, and the
    least-squares slope in ms per 1K document tokens."""
    out = {}
    for mode in MODES:
        pts = [(r["document"], _p50(r, mode)) for r in rows if _p50(r, mode) is not None]
        if len(pts) < 2:
            continue
        x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        out[mode] = {"documents": [int(v) for v in x], "ttft_p50_ms": [float(v) for v in y],
                     "ratio_longest_to_shortest": float(y[-1] / y[0]) if y[0] > 0 else None,
                     "slope_ms_per_1k_tokens": float(np.polyfit(x / 1e3, y, 1)[0])}
    return out


# --- report ---------------------------------------------------------------------------------------

_LABELS = {"uncached": "uncached", "first_followup": "first follow-up", "cached": "cached", "pinned": "pinned"}


def markdown(prefix: dict) -> list[str]:
    """The prefix suite's section of the report: a TTFT table per target, flatness, skips, errors."""
    out = ["## Prefix cache: a question after a long document", "",
           (f"TTFT in milliseconds (p50, p90 in brackets) of a {QUESTION_TOKENS}-token question after a document, one "
            "request at a time. uncached: a new document each time; first follow-up: the second question about "
            "one document; cached: the questions after that; pinned: the question alone, from the pinned "
            "document (prefix_id). cached tok: prompt tokens restored, not prefilled (median)."), ""]
    for label, res in prefix.items():
        modes = [m for m in MODES if any(m in r for r in res["rows"])]
        rows = []
        for r in res["rows"]:
            row = [ctx_label(r["document"])]
            for m in modes:
                s = r.get(m)
                t = s["ttft"] if s else None
                row.append(f"{fmt_ms(t['p50_ms'])} ({fmt_ms(t['p90_ms'])})" if t else "-")
                row.append("-" if not s or s["cached_tokens_median"] is None else f"{s['cached_tokens_median']:.0f}")
            row.append(f"×{r['speedup_p50']:.1f}" if r.get("speedup_p50") else "-")
            if "pin" in r:
                row.append(fmt_ms(r["pin"]["seconds"] * 1e3) if r["pin"]["error"] is None else "failed")
            rows.append(row)
        header = ["document"] + [x for m in modes for x in (f"{_LABELS[m]} TTFT", "cached tok")] + [
            "uncached / cached"] + (["pin ms"] if res["pinnable"] else [])
        out += [f"### {label}", ""] + md_table(header, rows) + [""]
        for m, f in res["flatness"].items():
            out.append(f"- {_LABELS[m]} TTFT p50: {fmt_ms(f['ttft_p50_ms'][0])} ms at "
                       f"{ctx_label(f['documents'][0])} → {fmt_ms(f['ttft_p50_ms'][-1])} ms at "
                       f"{ctx_label(f['documents'][-1])} "
                       f"(×{f['ratio_longest_to_shortest']:.2f}; slope {f['slope_ms_per_1k_tokens']:+.3f} ms per 1K "
                       "tokens)")
        for s in res["skipped"]:
            out.append(f"- skipped document {ctx_label(s['document'])}: {s['reason']}")
        failed = sorted({e for r in res["rows"] for m in MODES for e in (r.get(m) or {}).get("errors", [])})
        if failed:
            out.append(f"- errors: {'; '.join(failed[:3])}")
        out.append("")
    return out


def plot(results: dict, path: Path) -> Path | None:
    """TTFT p50 vs document length, a line per target and mode; None without rows."""
    prefix = results["suites"].get("prefix") or {}
    if not any(res["rows"] for res in prefix.values()):
        return None
    import matplotlib.pyplot as plt   # through plots.write_plots, which has chosen the Agg backend

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=DPI)
    xs = []
    for label, res in prefix.items():
        for mode, style in (("uncached", "-"), ("cached", "--"), ("pinned", ":")):
            pts = [(r["document"], _p50(r, mode)) for r in res["rows"] if _p50(r, mode) is not None]
            if pts:
                xs += [p[0] for p in pts]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                        label=f"{label} {_LABELS[mode]}")
    ax.set_title(f"TTFT p50 (ms) of a {QUESTION_TOKENS}-token question after a document", fontsize=9)
    log2_x(ax, xs)
    ax.set_yscale("log")
    ax.set_xlabel("document (tokens)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
