"""Compare suite: two targets side by side from one run (base vs StateX
checkpoint, native vs vLLM backend, our server vs any URL). It reads the two
targets' latency, recall and memory results and pairs them up; B/A < 1 means
B is faster (latency) or smaller (memory)."""
from __future__ import annotations


def _p50(summary: dict, metric: str) -> float | None:
    s = summary.get(metric)
    return s["p50_ms"] if s else None


def _ratio(a, b):
    return b / a if a and b is not None else None


def compare(a: str, b: str, latency: dict, recall: dict, memory: dict | None) -> dict:
    """Target ``a``'s and ``b``'s latency cells, recall rows and memory paired up, with B/A ratios."""
    out = {"a": a, "b": b, "latency": [], "recall": [], "memory": None}
    if a in latency and b in latency:
        cells_b = {(c["context"], c["concurrency"]): c for c in latency[b]["cells"]}
        for ca in latency[a]["cells"]:
            cb = cells_b.get((ca["context"], ca["concurrency"]))
            if cb is None:
                continue
            row = {"context": ca["context"], "concurrency": ca["concurrency"]}
            for m in ("ttft", "tpot", "itl", "e2e"):
                va, vb = _p50(ca["summary"], m), _p50(cb["summary"], m)
                row[f"{m}_p50_ms"] = {"a": va, "b": vb, "b_over_a": _ratio(va, vb)}
            ta, tb = ca["summary"]["output_throughput_tok_s"], cb["summary"]["output_throughput_tok_s"]
            row["output_throughput_tok_s"] = {"a": ta, "b": tb, "b_over_a": _ratio(ta, tb)}
            out["latency"].append(row)
    if a in recall and b in recall:
        rows_b = {(r["task"], r["context"]): r for r in recall[b]["rows"]}
        for ra in recall[a]["rows"]:
            rb = rows_b.get((ra["task"], ra["context"]))
            if rb is not None:
                out["recall"].append({"task": ra["task"], "context": ra["context"], "accuracy_a": ra["accuracy"],
                                      "accuracy_b": rb["accuracy"], "b_minus_a": rb["accuracy"] - ra["accuracy"]})
    if memory:
        by_label = {e["label"]: e for e in memory["entries"]}
        if a in by_label and b in by_label:
            sa = by_label[a]["model"]["state_bytes_per_sequence"]
            sb = by_label[b]["model"]["state_bytes_per_sequence"]
            out["memory"] = {"state_bytes_per_sequence_a": sa, "state_bytes_per_sequence_b": sb,
                             "b_over_a": _ratio(sa, sb), "params_a": by_label[a]["model"]["params"],
                             "params_b": by_label[b]["model"]["params"]}
    return out
