"""Time the state kernels against the memory-bandwidth floor, with fla and
mamba-ssm side by side, in one run on one GPU.

    python -m kernels.bench [--quick] [--out PATH.json] [--sweep]

Decode: each call reads and writes B states in place. Timed as CUDA-graph
replays (as the serving engine runs decode) of many calls that rotate among
several pools whose total size is well above the L2, so states come from HBM;
the median over replays, after warm-up. GB/s counts the state read + written
plus the activations, once; for fla that is the same useful traffic (its
gather/scatter copies are overhead, not credit). The fraction is of the
device-to-device copy bandwidth measured at the start of the same run.

Prefill: one sequence of T tokens continuing from a slot's state (the
segment case), median of ``triton.testing.do_bench``; also 8 sequences of
T/8 tokens, mixed fresh / continuing, to show the varlen path.

On a fresh machine the whole run takes longer than 10 minutes, mostly fla's
autotuning of ``chunk_gla`` (point TRITON_CACHE_DIR at a kept directory, or run
``--no-prefill`` and ``--no-decode`` as two commands).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

L2_SAFE_BYTES = 256 << 20          # touch at least this much per graph replay (H200 L2 = 60 MB)

GLA_SHAPES = {"H4K256V512": (4, 256, 512), "H1K1024V2048": (1, 1024, 2048)}
SSD_SHAPES = {"H64P64N128": (64, 64, 128), "H64P64N512": (64, 64, 512)}
CONV_DIMS = {"C4352W4": 4352, "C5120W4": 5120}
DT_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------- timing

def _median_event_ms(fn, reps):
    times = []
    for _ in range(reps):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def copy_bandwidth_GBps(nbytes=2 << 30, reps=30):
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ms = _median_event_ms(lambda: dst.copy_(src), reps)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def time_decode(call, n_pools, reps, min_calls=16):
    """Median microseconds per call: CUDA graph of calls rotating over pools."""
    for i in range(n_pools):              # compile / autotune outside the capture
        call(i)
    torch.cuda.synchronize()
    n_calls = max(min_calls, n_pools)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(min(n_pools, 3)):
                call(i)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in range(n_calls):
                call(c % n_pools)
        graph.replay()
        torch.cuda.synchronize()
        ms = _median_event_ms(graph.replay, reps)
        mode = "graph"
    except Exception as e:  # not capturable: eager launches, launch overhead included
        print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eager)", file=sys.stderr)
        torch.cuda.synchronize()

        def run_all():
            for c in range(n_calls):
                call(c % n_pools)
        ms = _median_event_ms(run_all, reps)
        mode = "eager"
    return ms * 1e3 / n_calls, mode


def _n_pools(bytes_per_call):
    return int(min(128, max(2, math.ceil(L2_SAFE_BYTES / max(bytes_per_call, 1)))))


def _slots(B, num_slots):
    return torch.randperm(num_slots, device="cuda")[:B].to(torch.int32)


# ------------------------------------------------------------------------------ GLA

def _gla_decode_cases(H, K, V, B, sdt, in_dt=torch.bfloat16):
    state_bytes = H * K * V * torch.tensor([], dtype=sdt).element_size()
    act_bytes = (3 * H * K + 2 * H * V) * torch.tensor([], dtype=in_dt).element_size()
    nbytes = B * (2 * state_bytes + act_bytes)
    n_pools = _n_pools(B * 2 * state_bytes)
    pools = [torch.randn(B + 4, H, K, V, device="cuda").to(sdt) for _ in range(n_pools)]
    slots = [_slots(B, B + 4) for _ in range(n_pools)]
    q = torch.randn(B, H, K, device="cuda").to(in_dt)
    k = torch.randn(B, H, K, device="cuda").to(in_dt)
    v = torch.randn(B, H, V, device="cuda").to(in_dt)
    g = (F.logsigmoid(torch.randn(B, H, K, device="cuda")) / 16).to(in_dt)
    return pools, slots, (q, k, v, g), nbytes, n_pools


def bench_gla_decode(H, K, V, B, sdt, reps, impl, launch=None):
    pools, slots, (q, k, v, g), nbytes, n_pools = _gla_decode_cases(H, K, V, B, sdt)
    scale = K ** -0.5
    if impl == "ours":
        from kernels.gla import triton as ours
        if launch is None:
            def call(i):
                ours.gla_decode(q, k, v, g, pools[i], slots[i], scale)
        else:
            def call(i):
                ours.gla_decode_launch(q, k, v, g, pools[i], slots[i], scale, *launch)
    else:
        from fla.ops.gla import fused_recurrent_gla
        idx = [s.long() for s in slots]

        def call(i):
            h0 = pools[i].index_select(0, idx[i])
            o, ht = fused_recurrent_gla(q[:, None], k[:, None], v[:, None], gk=g[:, None], scale=scale,
                                        initial_state=h0, output_final_state=True)
            pools[i].index_copy_(0, idx[i], ht.to(pools[i].dtype))
    us, mode = time_decode(call, n_pools, reps)
    del pools
    return us, nbytes, mode


# --------------------------------------------------------------------------- Mamba2

def _ssd_inputs(n, H, P, N, G, in_dt):
    """x, dt, A, B, C, D, dt_bias for ``n`` tokens (decode: one per sequence)."""
    x = torch.randn(n, H, P, device="cuda").to(in_dt)
    dt = (torch.randn(n, H, device="cuda") * 0.5).to(in_dt)
    Bm = torch.randn(n, G, N, device="cuda").to(in_dt)
    Cm = torch.randn(n, G, N, device="cuda").to(in_dt)
    A = -torch.exp(torch.rand(H, device="cuda") * math.log(16))
    D = torch.randn(H, device="cuda")
    dt_bias = torch.rand(H, device="cuda") - 4.0
    return x, dt, A, Bm, Cm, D, dt_bias


def _ssd_case(H, P, N, B, sdt, in_dt=torch.bfloat16, G=1):
    state_bytes = H * P * N * torch.tensor([], dtype=sdt).element_size()
    act_bytes = (2 * H * P + H + 2 * G * N) * torch.tensor([], dtype=in_dt).element_size()
    nbytes = B * (2 * state_bytes + act_bytes)
    n_pools = _n_pools(B * 2 * state_bytes)
    pools = [torch.randn(B + 4, H, P, N, device="cuda").to(sdt) for _ in range(n_pools)]
    slots = [_slots(B, B + 4) for _ in range(n_pools)]
    return pools, slots, _ssd_inputs(B, H, P, N, G, in_dt), nbytes, n_pools


def bench_ssd_decode(H, P, N, B, sdt, reps, impl, launch=None):
    pools, slots, (x, dt, A, Bm, Cm, D, dt_bias), nbytes, n_pools = _ssd_case(H, P, N, B, sdt)
    lim = (0.0, math.inf)
    if impl == "ours":
        from kernels.mamba2 import triton as ours
        if launch is None:
            def call(i):
                ours.ssd_decode(x, dt, A, Bm, Cm, D, dt_bias, lim, pools[i], slots[i])
        else:
            def call(i):
                ours.ssd_decode_launch(x, dt, A, Bm, Cm, D, dt_bias, lim, pools[i], slots[i], *launch)
    else:
        from kernels.mamba2.mamba_ssm_ops import selective_state_update
        # mamba-ssm's multi-head fast path: per-head scalars broadcast over (P, N)
        A_ = A[:, None, None].expand(H, P, N)
        dt_ = dt[:, :, None].expand(B, H, P)
        D_ = D[:, None].expand(H, P)
        bias_ = dt_bias[:, None].expand(H, P)

        def call(i):
            selective_state_update(pools[i], x, dt_, A_, Bm, Cm, D=D_, dt_bias=bias_, dt_softplus=True,
                                   state_batch_indices=slots[i])
    us, mode = time_decode(call, n_pools, reps)
    del pools
    return us, nbytes, mode


def bench_conv_decode(C, B, dtype, reps):
    from kernels.conv import triton as ours
    W = 4
    nbytes = B * (2 * C * (W - 1) + 2 * C) * torch.tensor([], dtype=dtype).element_size()
    n_pools = _n_pools(nbytes)
    pools = [torch.randn(B + 4, C, W - 1, device="cuda").to(dtype) for _ in range(n_pools)]
    slots = [_slots(B, B + 4) for _ in range(n_pools)]
    x = torch.randn(B, C, device="cuda").to(dtype)
    w = torch.randn(C, W, device="cuda").to(dtype)
    b = torch.randn(C, device="cuda").to(dtype)

    def call(i):
        ours.conv_decode(x, pools[i], slots[i], w, b, "silu")
    us, mode = time_decode(call, n_pools, reps)
    return us, nbytes, mode


# ---------------------------------------------------------------------------- prefill

def _do_bench_us(fn, quick):
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50 if quick else 200, rep=200 if quick else 1000,
                                   return_mode="median") * 1e3


def _prefill_layout(T, nseq):
    lens = [T // nseq] * nseq
    lens[-1] += T - sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    has_init = torch.tensor([i % 2 == 0 for i in range(nseq)], device="cuda")
    if nseq == 1:
        has_init[0] = True
    return cu, has_init


def bench_gla_prefill(H, K, V, T, nseq, impl, quick, sdt=torch.float32, in_dt=torch.bfloat16):
    q = torch.randn(T, H, K, device="cuda").to(in_dt)
    k = torch.randn(T, H, K, device="cuda").to(in_dt)
    v = torch.randn(T, H, V, device="cuda").to(in_dt)
    g = (F.logsigmoid(torch.randn(T, H, K, device="cuda")) / 16).to(in_dt)
    cu, has_init = _prefill_layout(T, nseq)
    pool = torch.randn(nseq + 4, H, K, V, device="cuda").to(sdt)
    slots = _slots(nseq, nseq + 4)
    scale = K ** -0.5
    esz = torch.tensor([], dtype=in_dt).element_size()
    nbytes = T * (3 * H * K + 2 * H * V) * esz + nseq * 2 * H * K * V * pool.element_size()
    if impl == "ours":
        from kernels.gla import triton as ours

        def fn():
            ours.gla_prefill(q, k, v, g, pool, slots, cu, has_init, scale)
    else:
        from fla.ops.gla import chunk_gla
        h0 = torch.randn(nseq, H, K, V, device="cuda")
        cu_l = cu.long()

        def fn():
            chunk_gla(q[None], k[None], v[None], g[None], scale=scale, initial_state=h0,
                      output_final_state=True, cu_seqlens=cu_l if nseq > 1 else None)
    return _do_bench_us(fn, quick), nbytes


def bench_ssd_prefill(H, P, N, T, nseq, impl, quick, sdt=torch.float32, in_dt=torch.bfloat16, G=1):
    """(median us, bytes moved) of one SSD prefill of ``T`` tokens in ``nseq`` sequences, ours or mamba-ssm's."""
    x, dt, A, Bm, Cm, D, dt_bias = _ssd_inputs(T, H, P, N, G, in_dt)
    cu, has_init = _prefill_layout(T, nseq)
    pool = torch.randn(nseq + 4, H, P, N, device="cuda").to(sdt)
    slots = _slots(nseq, nseq + 4)
    esz = torch.tensor([], dtype=in_dt).element_size()
    nbytes = T * (2 * H * P + H + 2 * G * N) * esz + nseq * 2 * H * P * N * pool.element_size()
    lim = (0.0, math.inf)
    if impl == "ours":
        from kernels.mamba2 import triton as ours

        def fn():
            ours.ssd_prefill(x, dt, A, Bm, Cm, D, dt_bias, lim, pool, slots, cu, has_init)
    else:
        from kernels.mamba2.mamba_ssm_ops import mamba_chunk_scan_combined
        from kernels.mamba2.triton import CHUNK
        if nseq == 1:
            h0 = torch.randn(1, H, P, N, device="cuda")

            def fn():
                mamba_chunk_scan_combined(x[None], dt[None], A, Bm[None], Cm[None], CHUNK, D=D, dt_bias=dt_bias,
                                          initial_states=h0, dt_softplus=True, return_final_states=True)
        else:
            seq_idx = torch.searchsorted(cu[1:].contiguous(), torch.arange(T, device="cuda", dtype=torch.int32),
                                         right=True).to(torch.int32)[None]
            cu_l = cu.long()

            def fn():
                mamba_chunk_scan_combined(x[None], dt[None], A, Bm[None], Cm[None], CHUNK, D=D, dt_bias=dt_bias,
                                          seq_idx=seq_idx, cu_seqlens=cu_l, dt_softplus=True,
                                          return_varlen_states=True)
    return _do_bench_us(fn, quick), nbytes


def bench_conv_prefill(C, T, dtype, quick):
    from kernels.conv import triton as ours
    W = 4
    x = torch.randn(T, C, device="cuda").to(dtype)
    w = torch.randn(C, W, device="cuda").to(dtype)
    b = torch.randn(C, device="cuda").to(dtype)
    pool = torch.randn(5, C, W - 1, device="cuda").to(dtype)
    slots = _slots(1, 5)
    cu, has_init = _prefill_layout(T, 1)
    nbytes = 2 * T * C * x.element_size()
    return _do_bench_us(lambda: ours.conv_prefill(x, pool, slots, cu, has_init, w, b, "silu"), quick), nbytes


# ------------------------------------------------------------------------------- sweep

def _dump(obj, path):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f)


def _sweep_wanted(cases, kernel, shape, sdt):
    return cases is None or f"{kernel}:{shape}:{DT_NAME[sdt]}" in cases


def _sweep_report(kind, name, B, sdt, res, nbytes, out_rows, path):
    res.sort()
    best = res[0]
    print(f"sweep {kind} {name} B={B} {DT_NAME[sdt]}: best {best[1]} {best[0]:.1f} us "
          f"({nbytes / best[0] / 1e3:.0f} GB/s); next {[(round(u, 1), c) for u, c in res[1:4]]}", flush=True)
    out_rows.append({"kernel": f"{kind}_decode", "shape": name, "batch": B, "state_dtype": DT_NAME[sdt],
                     "configs": [[u, list(c)] for u, c in res]})
    _dump(out_rows, path)


def _gla_launches(H, K, V):
    """(BK, BV, num_warps) of the GLA decode kernel worth timing for this shape."""
    for BV in (32, 64, 128, 256):
        for tile in (2048, 4096, 8192, 16384):
            BK = tile // BV
            if BK > K or BK < 8 or BV > V:
                continue
            for nw in (4, 8, 16):
                if tile // (32 * nw) < 8:       # under 8 elements per thread: idle lanes
                    continue
                yield (BK, BV, nw)


def _ssd_launches(H, P, N):
    """(BP, BN, num_warps) of the SSD decode kernel worth timing for this shape."""
    for BN in (64, 128, 256, 512):
        if BN > N:
            continue
        for BP in (4, 8, 16, 32, 64):
            if BP * BN > 16384 or BP * BN < 512 or BP > P:
                continue
            for nw in (4, 8, 16):
                if BP * BN // (32 * nw) < 8:
                    continue
                yield (BP, BN, nw)


# each state kernel family: its shapes, its decode and prefill benches, the peer it is timed against,
# and the launch configurations the sweep tries
FAMILIES = (("gla", GLA_SHAPES, bench_gla_decode, bench_gla_prefill, "fla", _gla_launches),
            ("ssd", SSD_SHAPES, bench_ssd_decode, bench_ssd_prefill, "mamba_ssm", _ssd_launches))


def sweep(reps, out_rows, path=None, cases=None, batches=(8, 64, 256)):
    """Time launch configurations of our decode kernels; print the best per case.
    ``cases``: None for all, else a set of "gla:SHAPE:DTYPE" / "ssd:SHAPE:DTYPE"."""
    for family, shapes, bench_decode, _, _, launches in FAMILIES:
        for name, dims in shapes.items():
            for sdt in (torch.float32, torch.bfloat16):
                if not _sweep_wanted(cases, family, name, sdt):
                    continue
                for B in batches:
                    res = []
                    for launch in launches(*dims):
                        us, nbytes, _ = bench_decode(*dims, B, sdt, reps, "ours", launch)
                        res.append((us, launch))
                    _sweep_report(family, name, B, sdt, res, nbytes, out_rows, path)


# -------------------------------------------------------------------------------- main

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


class _Rows:
    """The run's result: every row is printed, and written to ``out`` (if any) as
    soon as it is measured, so a run cut short keeps what it measured."""

    def __init__(self, device: str, copy: float, out: str | None):
        self.copy, self.out = copy, out
        self.result = {"rows": [], "copy_GBps": round(copy, 1),
                       "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "device": device}

    def add(self, impl, kernel, shape, batch, sdt, us, nbytes, note=""):
        copy = self.copy
        gbps = nbytes / (us * 1e-6) / 1e9
        self.result["rows"].append({"impl": impl, "kernel": kernel, "shape": shape, "batch": batch,
                                    "state_dtype": sdt, "us": round(us, 2), "GBps": round(gbps, 1),
                                    "fraction_of_copy_bw": round(gbps / copy, 3)})
        if self.out:
            with open(self.out, "w") as f:
                json.dump(self.result, f, indent=1)
        print(f"{impl:9s} {kernel:14s} {shape:22s} B={batch:<4d} {sdt:5s} {us:10.1f} us {gbps:8.0f} GB/s "
              f"{gbps / copy:6.1%} {note}", flush=True)

    @staticmethod
    def guarded(fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # keep the run going; the row is simply missing
            print(f"  FAILED {fn.__name__}{a[:4]}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            torch.cuda.synchronize()
            return None


def decode_table(rows: _Rows, reps, batches, sdts):
    """Ours and the peer for every family, shape, state dtype and batch, then the conv."""
    for family, shapes, bench_decode, _, peer, _ in FAMILIES:
        for name, dims in shapes.items():
            for sdt in sdts:
                for B in batches:
                    for impl in ("ours", peer):
                        r = rows.guarded(bench_decode, *dims, B, sdt, reps, impl)
                        if r:
                            rows.add(impl, f"{family}_decode", name, B, DT_NAME[sdt], r[0], r[1], r[2])
                    torch.cuda.empty_cache()
    for name, C in CONV_DIMS.items():
        for B in batches:
            r = rows.guarded(bench_conv_decode, C, B, torch.bfloat16, reps)
            if r:
                rows.add("ours", "conv_decode", name, B, "bf16", r[0], r[1], r[2])


def prefill_table(rows: _Rows, lengths, nseqs, quick):
    """Per prefill length: ours and the peer for every family and shape, then the conv."""
    for T in lengths:
        for nseq in nseqs:
            for family, shapes, _, bench_prefill, peer, _ in FAMILIES:
                for name, dims in shapes.items():
                    for impl in ("ours", peer):
                        r = rows.guarded(bench_prefill, *dims, T, nseq, impl, quick)
                        if r:
                            rows.add(impl, f"{family}_prefill", f"{name},T={T}", nseq, "fp32", r[0], r[1],
                                     f"{T / r[0]:.1f} Mtok/s")
                    torch.cuda.empty_cache()
        for name, C in CONV_DIMS.items():
            r = rows.guarded(bench_conv_prefill, C, T, torch.bfloat16, quick)
            if r:
                rows.add("ours", "conv_prefill", f"{name},T={T}", 1, "bf16", r[0], r[1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches, dtypes and repetitions")
    ap.add_argument("--out", default=None, help="write the JSON rows here")
    ap.add_argument("--sweep", action="store_true", help="also time launch configurations of our decode kernels")
    ap.add_argument("--sweep-out", default=None, help="JSON for the sweep results")
    ap.add_argument("--sweep-cases", default=None,
                    help="comma-separated KERNEL:SHAPE:DTYPE to sweep, e.g. gla:H4K256V512:bf16 (default: all)")
    ap.add_argument("--sweep-batches", type=_int_list, default="8,64,256", help="batch sizes for the sweep")
    ap.add_argument("--no-prefill", action="store_true", help="decode only")
    ap.add_argument("--no-decode", action="store_true", help="prefill only")
    ap.add_argument("--prefill-lengths", type=_int_list, default=None,
                    help="prefill tokens per call, in run order (default 8192,32768; quick 8192)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    # 1. the yardstick: this device's copy bandwidth, measured in the same run
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy = copy_bandwidth_GBps()
    print(f"device {device}; copy bandwidth {copy:.0f} GB/s (read + write)", flush=True)
    rows = _Rows(device, copy, args.out)
    # 2. decode, then prefill, ours beside the peer
    if not args.no_decode:
        decode_table(rows, 7 if args.quick else 25, (1, 64) if args.quick else (1, 8, 64, 256),
                    (torch.float32,) if args.quick else (torch.float32, torch.bfloat16))
    if not args.no_prefill:
        lengths = ((8192,) if args.quick else (8192, 32768)) if args.prefill_lengths is None else args.prefill_lengths
        prefill_table(rows, lengths, (1,) if args.quick else (1, 8), args.quick)
    # 3. the table, and optionally the launch-configuration sweep
    print_table(rows.result)
    if args.sweep:
        sweep_rows = []
        cases = set(args.sweep_cases.split(",")) if args.sweep_cases else None
        sweep(5, sweep_rows, args.sweep_out, cases, tuple(args.sweep_batches))
    return 0


def print_table(result):
    """Ours next to the peer for every (kernel, shape, batch, dtype)."""
    copy = result["copy_GBps"]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["kernel"], r["shape"], r["batch"], r["state_dtype"]), {})[r["impl"]] = r
    print(f"\n{result['device']}, copy {copy:.0f} GB/s, {result['date']}")
    print(f"{'kernel':12s} {'shape':22s} {'B':>4s} {'state':5s} | {'ours us':>9s} {'GB/s':>6s} {'%copy':>6s} | "
          f"{'peer us':>9s} {'%copy':>6s} | speedup")
    for (kernel, shape, batch, sdt), d in by.items():
        o = d.get("ours")
        p = d.get("fla") or d.get("mamba_ssm")
        os_ = f"{o['us']:9.1f} {o['GBps']:6.0f} {o['fraction_of_copy_bw']:6.1%}" if o else f"{'-':>9s} {'':6s} {'':6s}"
        ps = f"{p['us']:9.1f} {p['fraction_of_copy_bw']:6.1%}" if p else f"{'-':>9s} {'':6s}"
        sp = f"{p['us'] / o['us']:6.2f}x" if (o and p) else ""
        print(f"{kernel:12s} {shape:22s} {batch:4d} {sdt:5s} | {os_} | {ps} | {sp}")


if __name__ == "__main__":
    sys.exit(main())
