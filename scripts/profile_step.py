"""Where does an engine step's time go? Times one decode step and one prefill
of a 1.3B-shaped model (random weights) on the GPU:

    python scripts/profile_step.py gla-1.3b-statex [--batch 1,16] [--prefill 1024,8192] [--out DIR]

For decode it prints, per batch size: the captured graph's replay time (what
the engine runs), the same step eager (launch-bound when it is much slower),
the runner's full decode call with sampling (graph + input copies + argmax +
``tolist``), and the memory-bandwidth floor (weights + states read and written
once). For prefill: the model's eager prefill call at each length, tokens/s, and
the runner's captured prefill (one segment padded to its token bucket).
Then a ``torch.profiler`` table of the GPU kernels of one eager decode step and
one prefill, so a gap from the floor can be attributed to kernels (how many,
which) rather than guessed. Writes ``SHAPE.json`` and ``SHAPE-kernels.md`` to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from kernels.bench import _int_list, _median_event_ms


def _cuda_ms(fn, reps=50, warmup=5):
    """Median GPU time between CUDA events around ``fn``, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _median_event_ms(fn, reps)


def _wall_ms(fn, reps=50, warmup=5):
    """Host wall time including any host sync inside ``fn`` (the engine's view)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _kernel_table(fn, path: Path, title: str, rows=25) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    try:
        n_kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    except Exception:      # profiler API drift must not lose the timings
        n_kernels = -1
    table = events.table(sort_by="cuda_time_total", row_limit=rows)
    text = f"## {title}: {n_kernels} GPU kernel launches\n\n{table}\n"
    with open(path, "a") as f:
        f.write(text)
    return text


def _decode_rows(model, runner, batches, weight_bytes, state_bytes, copy_GBps, tables) -> list[dict]:
    """Per batch size: the captured step, the eager step, the runner's call with sampling, the floor."""
    from statex_serve.engine import sampler as sampling

    out = []
    for B in batches:
        ids = torch.randint(0, model.config.vocab_size, (B,), device="cuda")
        slots = torch.arange(B, dtype=torch.int32, device="cuda")
        graph_ms = _cuda_ms(lambda: runner.graphs.run(ids, slots)) if runner.graphs else None
        eager_ms = _cuda_ms(lambda: model.decode(ids, slots, runner.pools))
        rows = [sampling.SamplingRow() for _ in range(B)]
        ids_l, slots_l = ids.tolist(), slots.tolist()
        step_ms = _wall_ms(lambda: sampling.sample(runner.decode(ids_l, slots_l), rows))
        # every weight read once, every state read and written once, at the copy bandwidth
        floor = (weight_bytes + 2 * B * state_bytes) / (copy_GBps * 1e9) * 1e3
        row = {"batch": B, "graph_ms": graph_ms, "eager_ms": eager_ms, "runner_step_ms": step_ms,
               "floor_ms": floor}
        out.append(row)
        print(f"decode B={B}: graph {graph_ms:.3f} ms, eager {eager_ms:.3f} ms, runner+sample {step_ms:.3f} ms, "
              f"floor {floor:.3f} ms -> graph/floor {graph_ms / floor:.2f}x", flush=True)
        print(_kernel_table(lambda: model.decode(ids, slots, runner.pools), tables, f"eager decode B={B}"),
              flush=True)
    return out


def _gemv_rows(model, runner, batches, tables) -> list[dict]:
    """Per batch size up to kernels.gemv.MAX_ROWS: the runner's decode graph (the
    projections as ``kernels.gemv.preferred`` routes them) against the same step
    captured with every projection through cuBLAS (STATEX_GEMV=0) and with every
    one through kernels.gemv (STATEX_GEMV=1)."""
    from kernels.gemv import MAX_ROWS
    from statex_serve.engine.runner import _DecodeGraphs

    out = []
    for B in (b for b in batches if b <= MAX_ROWS):
        ids = torch.randint(0, model.config.vocab_size, (B,), device="cuda")
        slots = torch.arange(B, dtype=torch.int32, device="cuda")
        row = {"batch": B, "default_graph_ms": _cuda_ms(lambda: runner.graphs.run(ids, slots))}
        before = os.environ.get("STATEX_GEMV")
        for mode in ("0", "1"):
            os.environ["STATEX_GEMV"] = mode      # read by model_registry.layers.project at each call
            try:
                graphs = _DecodeGraphs(model, runner.pools, B, torch.device("cuda"))
                row[f"gemv{mode}_graph_ms"] = _cuda_ms(lambda: graphs.run(ids, slots))
                print(_kernel_table(lambda: model.decode(ids, slots, runner.pools), tables,
                                    f"eager decode B={B}, STATEX_GEMV={mode}"), flush=True)
            finally:
                os.environ.pop("STATEX_GEMV")
                if before is not None:
                    os.environ["STATEX_GEMV"] = before
        out.append(row)
        print(f"decode B={B}: graph as served {row['default_graph_ms']:.3f} ms, every projection through cuBLAS "
              f"{row['gemv0_graph_ms']:.3f} ms, through kernels.gemv {row['gemv1_graph_ms']:.3f} ms", flush=True)
    return out


def _prefill_rows(model, runner, lengths, tables) -> list[dict]:
    """Per prompt length (one sequence): the eager prefill and the runner's captured one."""
    out = []
    for T in lengths:
        ids = torch.randint(0, model.config.vocab_size, (T,), device="cuda")
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        slot = torch.zeros(1, dtype=torch.int32, device="cuda")
        fresh = torch.zeros(1, dtype=torch.bool, device="cuda")

        def run():
            model.prefill(ids, cu, slot, fresh, runner.pools)

        ms = _wall_ms(run, reps=10, warmup=2)
        row = {"tokens": T, "ms": ms, "tok_per_s": T / ms * 1e3, "graph_ms": None}
        if runner.prefill_graphs is not None:       # the runner's call, as the engine makes it
            ids_l = ids.tolist()
            row["graph_ms"] = _wall_ms(lambda: runner.prefill(ids_l, [T], [0], [False]), reps=10, warmup=2)
        out.append(row)
        print(f"prefill T={T}: eager {ms:.2f} ms ({T / ms * 1e3 / 1e3:.0f}K tok/s)"
              + (f", graph {row['graph_ms']:.2f} ms" if row["graph_ms"] is not None else ""), flush=True)
        print(_kernel_table(run, tables, f"prefill T={T}"), flush=True)
    return out


def _burst_rows(model, runner, bursts, tables) -> list[dict]:
    """Per burst (n segments of T tokens, fresh, n slots): one eager variable-length
    prefill call against the runner's call, as the engine makes it (the lanes graph
    that holds the burst, where there is one)."""
    out = []
    for n, T in bursts:
        key = runner.prefill_graphs.key_for([T] * n) if runner.prefill_graphs is not None else None
        if key is None or n > runner.pools.num_slots:
            print(f"burst {n}x{T}: skipped (no lanes graph holds it, or fewer than {n} slots)", flush=True)
            continue
        ids = torch.randint(0, model.config.vocab_size, (n * T,)).tolist()
        args = (ids, [T] * n, list(range(n)), [False] * n)
        row = {"segments": n, "tokens": T, "graph": f"{key[0]}x{key[1]}",
               "eager_ms": _wall_ms(lambda: runner._prefill_eager(*args), reps=10, warmup=2),
               "graph_ms": _wall_ms(lambda: runner.prefill(*args), reps=10, warmup=2)}
        out.append(row)
        print(f"burst {n}x{T}: eager varlen {row['eager_ms']:.2f} ms, lanes graph {row['graph']} "
              f"{row['graph_ms']:.2f} ms ({n * T / row['graph_ms']:.0f}K tok/s)", flush=True)
        print(_kernel_table(lambda: runner._prefill_eager(*args), tables, f"eager burst {n}x{T}"), flush=True)
    return out


def _bursts(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in b.split("x")) for b in text.split(",") if b]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NxT,... (segments x tokens)") from None


@torch.inference_mode()   # as the engine runs (the runner's graph buffers are inference tensors)
def main(argv=None) -> int:
    """Time one preset shape's decode steps and prefills on the GPU; writes the JSON and kernel tables to --out."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", help="a bench preset, e.g. gla-1.3b-statex, mamba2-1.3b-statex")
    ap.add_argument("--batch", type=_int_list, default="1,16", help="decode batch sizes")
    ap.add_argument("--prefill", type=_int_list, default="1024,8192", help="prefill lengths (one sequence)")
    ap.add_argument("--burst", type=_bursts, default="8x1024,8x900,4x2000",
                    help="bursts of N prompts of T tokens prefilled in one call (NxT,...): eager varlen against "
                         "the lanes graph that holds them")
    ap.add_argument("--gemv", action="store_true",
                    help="also capture the decode step with every projection through cuBLAS and with every one "
                         "through kernels.gemv, timed beside the step as served (batch sizes up to "
                         "kernels.gemv.MAX_ROWS)")
    ap.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--unfused", action="store_true",
                    help="the step as before the fusions (separate projection GEMMs, eager elementwise "
                         "kernels: STATEX_COMPILE=0), for a before/after table in one run")
    ap.add_argument("--out", default="profile-step", help="output directory")
    args = ap.parse_args(argv)
    if args.unfused:
        os.environ["STATEX_COMPILE"] = "0"
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU", file=sys.stderr)
        return 2

    from kernels.autotune import limit_autotune_search
    from statex_serve.engine.native import FAST_AUTOTUNE_CONFIGS

    # as the engine's default --autotune fast, before fla / mamba-ssm define their autotuners: the full
    # search over the prefill kernels takes minutes on a cold cache
    limit_autotune_search(FAST_AUTOTUNE_CONFIGS)
    from model_registry import MODEL_TYPES
    from model_registry.tokenizer import BOS_ID, EOS_ID, PAD_ID
    from kernels.bench import copy_bandwidth_GBps
    from statex_serve.bench.modelinfo import preset_config
    from statex_serve.engine.runner import ModelRunner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.shape + ("-unfused" if args.unfused else "")
    tables = out / f"{name}-kernels.md"
    tables.write_text(f"# {args.shape}: GPU kernels per step ({torch.cuda.get_device_name()})\n\n")
    config = preset_config(args.shape, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    model = MODEL_TYPES[config.model_type][1](config).to(torch.bfloat16).cuda().eval()
    if not args.unfused:
        model.fuse_projections_()        # as the engine serves it
    sdt = getattr(torch, args.state_dtype)
    # the one-segment prefill graphs up to the longest --prefill length (not with --unfused: the "before")
    runner = ModelRunner(model, max(args.batch + [n for n, _ in args.burst]), torch.device("cuda"), sdt,
                         prefill_graph_tokens=0 if args.unfused else max(args.prefill + [t for _, t in args.burst]))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = runner.pools.spec.bytes_per_sequence
    copy_GBps = copy_bandwidth_GBps()
    result = {"shape": args.shape, "fused": not args.unfused, "device": torch.cuda.get_device_name(),
              "weight_bytes": weight_bytes, "state_bytes_per_sequence": state_bytes, "state_dtype": args.state_dtype,
              "copy_GBps": copy_GBps}
    print(f"{args.shape}: weights {weight_bytes / 1e9:.2f} GB, state {state_bytes / 2**20:.1f} MiB per sequence, "
          f"copy bandwidth {copy_GBps:.0f} GB/s", flush=True)

    result["decode"] = _decode_rows(model, runner, args.batch, weight_bytes, state_bytes, copy_GBps, tables)
    result["prefill"] = _prefill_rows(model, runner, args.prefill, tables)
    result["burst"] = _burst_rows(model, runner, args.burst, tables)
    if args.gemv and runner.graphs is not None:
        result["gemv"] = _gemv_rows(model, runner, args.batch, tables)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
