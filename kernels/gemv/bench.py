"""Decode projections on the GPU: our kernel against torch's F.linear
(cuBLAS) at the 1.3B shapes, 1-8 rows, each in a CUDA graph rotating over
enough weight copies to defeat the L2 cache (as ``kernels.bench`` times decode).

    python -m kernels.gemv.bench [--out gemv.json] [--rows 1,2,4,8] [--sweep 1]

``--sweep ROWS`` also times every launch configuration of a grid per shape at
those row counts and reports the best beside ``gemv_config``'s pick.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from kernels.gemv import MAX_ROWS

# (name, N, K): GLA-1.3B-StateX's fused q|k|v|g|gk-low-rank, o_proj, MLP gate|up and down, the LM head;
# Mamba2-1.3B's in_proj and out_proj
SHAPES = [("gla_in", 6160, 2048), ("gla_o", 2048, 2048), ("mlp_gate_up", 11264, 2048), ("mlp_down", 2048, 5632),
          ("lm_head", 32000, 2048), ("mamba2_in", 8512, 2048), ("mamba2_out", 2048, 4096)]
SWEEP = {"BN": (2, 4, 8, 16, 32), "BK": (256, 512, 1024, 2048, 4096), "num_warps": (4, 8)}
SWEEP_MAX_TILE = 32768     # BM x BN x BK products per loop step: more spills registers


def _weights(N, K, M, dtype=torch.bfloat16):
    """Enough copies of an N x K weight that rotating over them defeats the L2 cache, and x."""
    from kernels.bench import _n_pools

    ws = [torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5 for _ in range(_n_pools(N * K * 2))]
    return ws, torch.randn(M, K, device="cuda", dtype=dtype)


def time_case(fn, ws, x, reps):
    """Microseconds per call of ``fn(x, w)`` over the rotating weight copies, in a CUDA graph."""
    from kernels.bench import time_decode

    return time_decode(lambda i: fn(x, ws[i]), len(ws), reps)


def bench(rows, reps, sweep_rows) -> list[dict]:
    from kernels.bench import copy_bandwidth_GBps
    from kernels.gemv import triton as fast

    copy = copy_bandwidth_GBps()
    print(f"copy bandwidth {copy:.0f} GB/s", file=sys.stderr)
    out = []
    for (name, N, K), M in itertools.product(SHAPES, rows):
        nbytes = N * K * 2
        ws, x = _weights(N, K, M)
        cfg = fast.gemv_config(M, N, K)
        ours, mode = time_case(lambda x, w: fast.gemv_launch(x, w, None, *cfg), ws, x, reps)
        torch_us, _ = time_case(lambda x, w: F.linear(x, w), ws, x, reps)
        row = {"shape": name, "N": N, "K": K, "M": M, "config": cfg, "ours_us": ours, "torch_us": torch_us,
               "ours_pct_copy": 100 * nbytes / (ours * 1e-6) / 1e9 / copy,
               "torch_pct_copy": 100 * nbytes / (torch_us * 1e-6) / 1e9 / copy, "timing": mode,
               "copy_GBps": copy}
        if M in sweep_rows:
            grid = [c for c in itertools.product(*SWEEP.values())
                    if 2 ** (M - 1).bit_length() * c[0] * c[1] <= SWEEP_MAX_TILE and c[1] <= 2 * K]
            best = min(((time_case(lambda x, w, c=c: fast.gemv_launch(x, w, None, *c), ws, x, reps)[0], c)
                        for c in grid), key=lambda t: t[0])
            row |= {"best_us": best[0], "best_config": best[1],
                    "best_pct_copy": 100 * nbytes / (best[0] * 1e-6) / 1e9 / copy}
        del ws
        print(f"{name:12s} N{N:6d} K{K:5d} M{M:3d}  ours {ours:7.1f} us ({row['ours_pct_copy']:4.1f}% copy)  "
              f"torch {torch_us:7.1f} us ({row['torch_pct_copy']:4.1f}%)"
              + (f"  best {row['best_us']:7.1f} us {row['best_config']}" if "best_us" in row else ""), flush=True)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.gemv.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8",
                    help=f"rows of x (tokens per step), comma-separated, each 1-{MAX_ROWS}")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays per case")
    ap.add_argument("--sweep", default="", metavar="ROWS",
                    help="at these row counts (comma-separated) also time a grid of launch configurations")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",") if r]
        sweep_rows = {int(r) for r in args.sweep.split(",") if r}
    except ValueError:
        ap.error(f"--rows / --sweep: {args.rows!r} / {args.sweep!r} is not a list of integers")
    if not rows or any(not 1 <= r <= MAX_ROWS for r in rows):
        ap.error(f"--rows: each must be 1-{MAX_ROWS}")
    if not torch.cuda.is_available():
        print("kernels.gemv.bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    result = bench(rows, args.reps, sweep_rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
