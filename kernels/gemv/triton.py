"""Skinny products of decode (a few rows times a weight matrix) on CUDA, in Triton.
Same signature as ``kernels.gemv.reference``.

At one to a few tokens per step a projection reads its whole weight matrix to
produce a few rows: a memory-bound matrix-vector product. In the H200 decode
profile (docs/perf.md) cuBLAS's tiles for it ran at 62% of the copy bandwidth
over the 1.3B model's projections, and at a quarter of it on the 2048 x 2048
``o_proj`` (a split-K GEMM plus a reduction kernel, 10.5 us for 8 MB).

Each program here owns BLOCK_N output columns: it streams their BLOCK_N rows
of the weight (contiguous along K) once, BLOCK_K at a time, multiplies them
with the (at most ``MAX_ROWS``) rows of x on the CUDA cores in fp32 and reduces
inside the kernel, so the output is written once, in x's dtype, with the bias
added: one launch per projection, no partial sums. With BLOCK_N = 2, N = 2048
is 1024 programs, enough to keep every SM streaming. The weights are read once
per step, so their loads are marked to leave L2 first. Measured against cuBLAS
(``python -m kernels.gemv.bench``) it wins at one row on the narrow outputs
(N = 2048: 4.9 against 6.1 us for o_proj, 7.8 against 9.4 us for Mamba2's
out_proj), ties on the rest and loses above one row, where the
[rows, BLOCK_N, BLOCK_K] products stop fitting the registers.
(A first version split K over programs and wrote fp32 partials that a second
pass added; its extra reductions and casts cost more than its GEMMs saved.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gemv import MAX_ROWS      # rows of x one launch takes

_TILE = 16384          # products per loop step (BM x BN x BK) at most: 128 fp32 registers a thread at 4 warps


@triton.jit
def _gemv_kernel(x, w, b, y, M, N, K, s_xm, s_wn, s_ym,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr):
    i_n = tl.program_id(0)
    o_m = tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_m = o_m < M
    m_n = o_n < N
    w_rows = w + o_n.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + o_k
        m_k = kk < K
        b_w = tl.load(w_rows + kk[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0,
                      eviction_policy="evict_first").to(tl.float32)                       # [BN, BK]
        b_x = tl.load(x + o_m[:, None] * s_xm + kk[None, :], mask=m_m[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)                                           # [BM, BK]
        acc += tl.sum(b_x[:, None, :] * b_w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y + o_m[:, None] * s_ym + o_n[None, :], acc.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def gemv_config(M: int, N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from the H200 sweeps at one row
    (docs/bench/h200-load/7-decode-step/gemv/): 2 columns a program for outputs up to 4096
    wide over K up to 2048, else 4; the whole of K up to 4096 per loop step,
    else 2048; 8 warps above K = 4096. BLOCK_K shrinks with more rows so that a
    step's tile stays at most ``_TILE`` products."""
    bm = triton.next_power_of_2(max(M, 1))
    bn = 2 if N <= 4096 and K <= 2048 else 4
    bk = triton.next_power_of_2(K) if K <= 4096 else 2048
    bk = max(16, min(bk, _TILE // (bm * bn)))
    return bn, bk, 8 if K > 4096 else 4


def gemv_launch(x, weight, bias, BN, BK, num_warps):
    M, K = x.shape
    N = weight.shape[0]
    assert M <= MAX_ROWS and weight.shape[1] == K, (tuple(x.shape), tuple(weight.shape))
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M and N:
        _gemv_kernel[(triton.cdiv(N, BN),)](
            x, weight, bias if bias is not None else y, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
            BM=triton.next_power_of_2(M), BN=BN, BK=BK, HAS_BIAS=bias is not None, num_warps=num_warps)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[M, K]`` (M <= MAX_ROWS), weight ``[N, K]``, bias ``[N]`` -> ``[M, N]`` in x's dtype."""
    return gemv_launch(x, weight, bias, *gemv_config(x.shape[0], weight.shape[0], weight.shape[1]))
