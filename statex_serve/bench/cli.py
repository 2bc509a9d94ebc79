"""``python -m statex_serve.bench [SUITE ...] --target SPEC [--target SPEC] [--quick] [--out DIR]``

Suites: latency, recall, memory, compare (two targets side by side), all
(the default: every suite that applies), prefix (a question after a long
document with and without the prefix cache; only when named). Targets: ``spawn:DIR`` (start
``statex-serve --model DIR`` here), ``engine:DIR`` (in this process),
``url:http://host:port`` or any ``http(s)://`` base URL; options after ``?``
(see ``statex_serve.bench.targets``). Writes results.json (every raw number,
the command, versions, hardware), results.md and PNG plots to --out.
"""
from __future__ import annotations

import argparse
import logging
import asyncio
import contextlib
import datetime as _dt
import os
import shlex
import signal
import sys
import time
from pathlib import Path

SUITES = ("latency", "recall", "memory", "compare", "prefix")   # prefix: not in "all"
PROG = "python -m statex_serve.bench"

# full: GPU-sized; quick: a CPU-sized run of the tiny/bundled model (seconds per suite)
DEFAULTS = {
    "full": {"contexts": [1024 << i for i in range(8)], "concurrency": [1, 16], "output_len": 128, "requests": 8,
             "warmup": 2, "recall_contexts": [1024 << i for i in range(8)], "samples": 10,
             "recall_concurrency": 8},
    "quick": {"contexts": [64, 128, 256, 512, 1024], "concurrency": [1, 4], "output_len": 32, "requests": 2,
              "warmup": 1, "recall_contexts": [384, 512, 1024], "samples": 5, "recall_concurrency": 4},
}
MEMORY_CONTEXTS = [1024 << i for i in range(8)]
MEMORY_PRESETS = "gla-1.3b,gla-1.3b-statex,mamba2-1.3b,mamba2-1.3b-statex"


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit 2
        self.exit(2, f"{PROG}: error: {message}\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x.strip().lower().replace("k", "")) * (1024 if x.strip().lower().endswith("k") else 1)
                  for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1K,2K,4096)")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: need positive integers")
    return values


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line: suites, targets, each suite's knobs; the module docstring's body as epilog."""
    p = _Parser(prog=PROG, description="Long-context latency, recall and memory of statex-serve (or any "
                                       "OpenAI-compatible server), with JSON, Markdown and PNG output.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"{', '.join(SUITES)} or all (default: all)")
    p.add_argument("--target", action="append", default=[], metavar="SPEC",
                   help="spawn:DIR, engine:DIR, url:URL or a bare URL/DIR; options after '?', e.g. "
                        "spawn:ckpt?label=statex&max_num_seqs=16 (repeat for compare)")
    p.add_argument("--model", action="append", default=[], metavar="DIR", help="shorthand for --target spawn:DIR")
    p.add_argument("--out", default="bench-results", help="output directory")
    p.add_argument("--quick", action="store_true", help="a CPU-sized run (small contexts, few requests)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="log level of an engine target's own log (info shows its start-up stages)")
    g = p.add_argument_group("latency")
    g.add_argument("--contexts", type=_int_list, help="context lengths in tokens, e.g. 1K,2K,4K "
                   "(full: 1K..128K; quick: 64..1024)")
    g.add_argument("--concurrency", type=_int_list, help="requests in flight (full: 1,16; quick: 1,4)")
    g.add_argument("--output-len", type=_positive, help="generated tokens per request (full 128, quick 32)")
    g.add_argument("--requests", type=_positive, help="requests per cell, at least the concurrency (full 8, quick 2)")
    g.add_argument("--warmup", type=int, help="untimed requests before the sweep (full 2, quick 1)")
    g.add_argument("--bandwidth", default=None,
                   help="memory bandwidth for the decode floor (default 4.25TB/s, the H200's measured copy rate)")
    g = p.add_argument_group("recall")
    g.add_argument("--tasks", default="passkey,niah,mqar",
                   help="training.tasks names with options, comma-separated (e.g. passkey,niah?needles=8,mqar), "
                        "or the capacity experiment's cells (capacity:mqar@2048/16p?mqar_layout=zoology)")
    g.add_argument("--recall-contexts", type=_int_list, help="context lengths (full: 1K..128K; quick: 384..1024)")
    g.add_argument("--samples", type=_positive, help="samples per task and context; passkey/niah depths cycle "
                   "0, .25, .5, .75, 1 (full 10, quick 5)")
    g.add_argument("--mqar-queries", type=_positive, default=4, help="MQAR answers asked per sample")
    g.add_argument("--recall-concurrency", type=_positive, help="recall requests in flight (full 8, quick 4)")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-models", default=None,
                   help="presets or checkpoint dirs besides the targets' models, e.g. "
                        f"{MEMORY_PRESETS} (default: none, or those presets when there is no target)")
    g.add_argument("--memory-contexts", type=_int_list, default=MEMORY_CONTEXTS, help="default 1K..128K")
    g.add_argument("--memory-budget", default="auto",
                   help="memory for state / KV cache, e.g. 64GiB; auto: the memory of the GPU the targets run "
                        "on, else of this machine")
    g.add_argument("--kv-heads", type=_positive, default=None,
                   help="KV heads of the comparison Transformer (default: as many as query heads, MHA)")
    g.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: the model's weight dtype)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (recall uses training's eval seed 1234 + this)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Check everything that can be checked before anything starts (raises BenchError)."""
    from statex_serve.bench.modelinfo import H200_BANDWIDTH, PRESETS, dtype_bytes, parse_bandwidth
    from statex_serve.bench.recall import check_tasks
    from statex_serve.bench.targets import BenchError, parse_target
    from statex_serve.engine.args import parse_memory_size

    suites = args.suites or ["all"]
    bad = [s for s in suites if s not in (*SUITES, "all")]
    if bad:
        raise BenchError(f"unknown suite {bad[0]!r} (one of {', '.join(SUITES)}, all)")
    specs = [parse_target(t) for t in args.target] + [parse_target(f"spawn:{m}") for m in args.model]
    if not specs and suites != ["memory"]:
        specs = [_bundled_target()]
    if "all" in suites:
        suites = ["latency", "recall", "memory"] + (["compare"] if len(specs) == 2 else [])
    if "compare" in suites:
        if len(specs) != 2:
            raise BenchError(f"compare needs exactly two targets, got {len(specs)} (use --target twice)")
        suites = list(dict.fromkeys(["latency", "recall", "memory", *suites]))
    labels = []
    for s in specs:
        base, k = s.label, 2
        while s.label in labels:
            s.options["label"] = f"{base}#{k}"
            k += 1
        labels.append(s.label)
    d = dict(DEFAULTS["quick" if args.quick else "full"])
    for key in d:
        if getattr(args, key, None) is not None:
            d[key] = getattr(args, key)
    for key in ("contexts", "concurrency", "recall_contexts"):
        d[key] = sorted(set(d[key]))
    d["memory_contexts"] = sorted(set(args.memory_contexts))
    if d["warmup"] < 0:
        raise BenchError("--warmup must be at least 0")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if "recall" in suites:
        if not tasks:
            raise BenchError("--tasks is empty")
        check_tasks(tasks)
    try:
        bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else H200_BANDWIDTH
        budget = None if args.memory_budget == "auto" else parse_memory_size(args.memory_budget)
        if args.kv_dtype:
            dtype_bytes(args.kv_dtype)
    except ValueError as e:
        raise BenchError(str(e)) from None
    asked = args.memory_models if args.memory_models is not None else ("" if specs else MEMORY_PRESETS)
    models = [m.strip() for m in asked.split(",") if m.strip()]
    for m in models:
        if m not in PRESETS and not (Path(m) / "config.json").is_file():
            raise BenchError(f"--memory-models: {m} is neither a preset ({', '.join(PRESETS)}) "
                             "nor a checkpoint directory")
    if "memory" in suites and not models and not specs:
        raise BenchError("memory: nothing to measure (give --target or --memory-models)")
    return {"suites": [s for s in SUITES if s in suites], "specs": specs, "tasks": tasks, "bandwidth": bandwidth,
            "bandwidth_given": args.bandwidth is not None, "budget": budget, "memory_models": models, **d}


def _machine_memory(targets) -> tuple[int, str]:
    """--memory-budget auto: (bytes, what they are): the memory of the GPU a target
    runs on (this process sees the same GPUs as a server it spawned), else this
    machine's RAM."""
    devices = [str((t.info.get("engine") or {}).get("device") or "") for t in targets]
    if any(d.startswith("cuda") for d in devices):
        import torch

        if torch.cuda.is_available():
            index = next((int(d.split(":")[1]) for d in devices if d.startswith("cuda:")), 0)
            return torch.cuda.get_device_properties(index).total_memory, "the GPU's memory"
    from statex_serve.bench.report import machine_memory_bytes

    return machine_memory_bytes() or 64 << 30, "this machine's memory"


def _name_targets(targets) -> None:
    """A server given by URL without ?label= is named after the model it serves
    (known once started), not its address; names stay unique."""
    taken = {t.label for t in targets if t.kind != "url" or "label" in t.spec.options}
    for t in targets:
        if t.kind == "url" and "label" not in t.spec.options and t.info.get("model"):
            name, k = t.info["model"], 2
            while name in taken:
                name, k = f"{t.info['model']}#{k}", k + 1
            t.label = name
            taken.add(name)


def _bundled_target():
    from statex_serve.bench.targets import BenchError, parse_target

    try:
        from statex_serve import bundled

        return parse_target(f"spawn:{bundled.default_model_path()}?label=bundled")
    except (ImportError, FileNotFoundError, AttributeError):
        raise BenchError("no --target given and this build has no bundled model "
                         "(e.g. --target spawn:CHECKPOINT_DIR or --target http://127.0.0.1:8000)") from None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0)


async def run(args: argparse.Namespace, cfg: dict, argv: list[str], results: dict, checkpoint=lambda: None
              ) -> dict:
    """Fills ``results`` suite by suite, calling ``checkpoint()`` after each
    target's part, so a run that is stopped still leaves what it measured."""
    from statex_serve.bench import compare as compare_mod
    from statex_serve.bench import latency as latency_mod
    from statex_serve.bench import memory as memory_mod
    from statex_serve.bench import recall as recall_mod
    from statex_serve.bench.targets import make_target

    suites, show = cfg["suites"], not args.no_progress
    with contextlib.suppress(NotImplementedError, RuntimeError):   # SIGTERM: stop the spawned servers too
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    t0 = time.perf_counter()
    results.update(_run_header(args, cfg, argv))
    targets = [make_target(s, args.timeout) for s in cfg["specs"]]
    log = (lambda msg: print(msg, file=sys.stderr)) if show else (lambda msg: None)
    try:
        timings = results["timings_s"] = {}
        # 1. start the targets, name them, size their models (for the floor and the memory suite)
        await _start_targets(targets, results, timings, log)
        facts = _model_facts(targets, log)

        async def per_target(suite: str, measure) -> None:
            """``measure(target)`` for each target in turn, timed and checkpointed."""
            out = results["suites"][suite] = {}
            for t in targets:
                t1 = time.perf_counter()
                out[t.label] = await measure(t)
                timings[f"{suite} {t.label}"] = time.perf_counter() - t1
                checkpoint()

        # 2. the suites, in this order, one target after the other
        if "latency" in suites:
            lc = latency_mod.LatencyConfig(cfg["contexts"], cfg["concurrency"], cfg["output_len"], cfg["requests"],
                                           cfg["warmup"], args.seed)

            async def latency(t):
                with _progress(latency_mod.planned_requests(lc, t.max_model_len), f"latency {t.label}", show) as bar:
                    return await latency_mod.run_latency(t, lc, facts[t.label], cfg["bandwidth"], bar)
            await per_target("latency", latency)
        if "recall" in suites:
            rc = recall_mod.RecallConfig(cfg["tasks"], cfg["recall_contexts"], cfg["samples"], args.mqar_queries,
                                         cfg["recall_concurrency"], 1234 + args.seed)

            async def recall(t):
                codec = recall_mod.make_codec(t)
                vocab = facts[t.label].vocab_size if facts[t.label] else None   # checked by capacity cells
                cells = await asyncio.to_thread(recall_mod.plan, codec, rc, t.max_model_len, vocab, t.label)
                total = sum(len(c.get("queries", ())) for c in cells)
                with _progress(total, f"recall {t.label}", show) as bar:
                    return await recall_mod.run_recall(t, rc, cells, codec, bar)
            await per_target("recall", recall)
        if "memory" in suites:
            mc, source = _memory_config(args, cfg, targets)
            served = [(t.label, t.model_dir, t.info.get("engine") or {}) for t in targets if t.model_dir]
            t1 = time.perf_counter()
            results["suites"]["memory"] = await asyncio.to_thread(memory_mod.run_memory, mc, served)
            if source:
                results["suites"]["memory"]["budget_source"] = source
            timings["memory"] = time.perf_counter() - t1
            checkpoint()
        if "prefix" in suites:
            from statex_serve.bench import prefix as prefix_mod

            pc = prefix_mod.PrefixConfig(cfg["contexts"], max(cfg["requests"], 3), args.seed)
            await per_target("prefix", lambda t: prefix_mod.run_prefix(t, pc, log))
        if "compare" in suites:
            a, b = (t.label for t in targets)
            s = results["suites"]
            s["compare"] = compare_mod.compare(a, b, s.get("latency", {}), s.get("recall", {}), s.get("memory"))
    finally:
        await asyncio.gather(*(t.stop() for t in targets), return_exceptions=True)
        results["duration_s"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        results["load_average_1m_end"] = os.getloadavg()[0]
    return results


def _run_header(args: argparse.Namespace, cfg: dict, argv: list[str]) -> dict:
    """What the record says before anything is measured: the command, when, where, with which settings."""
    from statex_serve.bench.report import environment

    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return {"command": shlex.join([*PROG.split(), *argv]), "started": started.isoformat(),
            "environment": environment(),
            "settings": {k: v for k, v in cfg.items() if k != "specs"} | {
                "bandwidth_bytes_s": cfg["bandwidth"], "quick": args.quick, "seed": args.seed},
            "targets": [], "suites": {}}


def _memory_config(args: argparse.Namespace, cfg: dict, targets):
    """The memory suite's config, and where its budget came from (None: --memory-budget)."""
    from statex_serve.bench import memory as memory_mod

    budget, source = cfg["budget"], None
    if budget is None:
        budget, source = _machine_memory(targets)
    return memory_mod.MemoryConfig(cfg["memory_contexts"], budget, cfg["memory_models"], args.kv_heads,
                                   args.kv_dtype), source


async def _start_targets(targets, results: dict, timings: dict, log) -> None:
    """Starts every target at once, names them and records what each serves (and
    what its checkpoint was trained on, so the plots can say "never trained")."""
    from training.report import trained_tasks

    if targets:
        log(f"starting {len(targets)} target(s): {', '.join(t.label for t in targets)}")
        t1 = time.perf_counter()
        await asyncio.gather(*(t.start() for t in targets))
        timings["start_targets"] = time.perf_counter() - t1
    _name_targets(targets)
    results["targets"] = [t.describe() for t in targets]
    for t, d in zip(targets, results["targets"]):
        d["trained_on"] = trained_tasks(t.model_dir)


def _model_facts(targets, log) -> dict:
    """Per target label, the facts of its checkpoint (None: served by URL, or a
    model we cannot size: no floor, no memory row)."""
    from statex_serve.bench.modelinfo import load_facts

    facts = {}
    for t in targets:
        desc = t.info.get("engine") or {}
        facts[t.label] = None
        if t.model_dir:
            try:
                facts[t.label] = load_facts(t.model_dir, desc.get("dtype"), desc.get("state_dtype") or "float32")
            except (ValueError, OSError, KeyError) as e:
                log(f"{t.label}: no model facts ({str(e).strip().splitlines()[0]})")
    return facts


def main(argv: list[str] | None = None) -> int:
    """Run the bench from the command line: exit code 0, 2 on bad input, 130/143 when stopped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from statex_serve.bench.targets import BenchError

    try:
        cfg = resolve(args)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise BenchError(f"--out {out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from statex_serve.bench.report import write_json

    results: dict = {}
    try:
        asyncio.run(run(args, cfg, argv, results, lambda: write_json(out / "results.json", results | {
            "incomplete": "partial: written while the run was still going"})))
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError) as e:
        stop, code = ("interrupted", 130) if isinstance(e, KeyboardInterrupt) else ("terminated", 143)
        print(f"{PROG}: {stop}", file=sys.stderr)
        if results.get("suites"):   # keep what was measured before the stop
            results["incomplete"] = f"{stop} before the run finished; the tables hold what completed"
            write_outputs(results, out)
        return code
    write_outputs(results, out)
    return 0


def write_outputs(results: dict, out: Path) -> None:
    from statex_serve.bench.plots import write_plots
    from statex_serve.bench.report import markdown, write_json

    results["plots"] = write_plots(results, out)
    write_json(out / "results.json", results)
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + "".join(f", {out / p}" for p in results["plots"]), file=sys.stderr)
