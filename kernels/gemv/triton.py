"""Skinny products of decode (a few rows times a weight matrix) on CUDA, in Triton.
Same signature as ``kernels.gemv.reference``.

At one to a few tokens per step a projection reads its whole weight matrix to
produce a few rows, so it is a memory-bound matrix-vector product. cuBLAS's
tiles for it reached about a third of the H200's copy bandwidth in the decode
profile (docs/perf.md, "Engine step"). This kernel splits the weight over
column blocks of N and, where that gives too few programs to keep every SM
reading, over K as well (split-K): each program reads a BLOCK_N x K/SPLIT_K
strip once, multiplies it with the (at most 16) rows of x on the tensor cores
(``tl.dot`` needs 16 rows, so x is padded with masked rows), and writes fp32
partial sums; the partials are added in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gemv import MAX_ROWS      # rows of x one launch takes: tl.dot's smallest tile
_SMS = 132             # H200 streaming multiprocessors
_TARGET_PROGRAMS = 8 * _SMS


@triton.jit
def _gemv_kernel(x, w, part, M, N, K, s_xm, s_wn, s_ps, s_pm,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_m = tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_m = o_m < M
    m_n = o_n < N
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK      # this program's K range, whole blocks
    k_lo = i_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + o_k
        m_k = kk < k_hi
        b_x = tl.load(x + o_m[:, None] * s_xm + kk[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(w + o_n[None, :].to(tl.int64) * s_wn + kk[:, None], mask=m_k[:, None] & m_n[None, :],
                      other=0.0)
        # 16-bit inputs widen exactly to tf32 (tl.dot's fp32 default on the GPU); fp32 ones ask for ieee
        acc += tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), input_precision=PRECISION)
    tl.store(part + i_s * s_ps + o_m[:, None] * s_pm + o_n[None, :], acc, mask=m_m[:, None] & m_n[None, :])


def gemv_config(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps): 64 x 128 weight tiles (16 KiB of
    bf16 per loop step), and K split until about eight programs per SM read at
    once, keeping at least two loop steps per program. A first guess for the
    H200, to be replaced by a sweep (``python -m kernels.gemv.bench --sweep``)."""
    bn = 64
    bk = min(128, max(16, triton.next_power_of_2(K)))
    blocks = triton.cdiv(N, bn)
    split = 1
    while blocks * split * 2 <= _TARGET_PROGRAMS and K // (split * 2) >= 2 * bk:
        split *= 2
    return bn, bk, split, 4


def gemv_launch(x, weight, bias, BN, BK, SPLIT_K, num_warps):
    M, K = x.shape
    N = weight.shape[0]
    assert M <= MAX_ROWS and weight.shape[1] == K, (tuple(x.shape), tuple(weight.shape))
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    part = torch.empty(SPLIT_K, M, N, device=x.device, dtype=torch.float32)
    if M and N:
        _gemv_kernel[(triton.cdiv(N, BN), SPLIT_K)](
            x, weight, part, M, N, K, x.stride(0), weight.stride(0), part.stride(0), part.stride(1),
            BM=MAX_ROWS, BN=BN, BK=BK, SPLIT_K=SPLIT_K,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps)
    out = part[0] if SPLIT_K == 1 else part.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[M, K]`` (M <= 16), weight ``[N, K]``, bias ``[N]`` -> ``[M, N]`` in x's dtype."""
    return gemv_launch(x, weight, bias, *gemv_config(x.shape[0], weight.shape[0], weight.shape[1]))
