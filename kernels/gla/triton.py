"""GLA on CUDA: slot-indexed decode (our Triton kernel) and prefill (fla ``chunk_gla``
with our slot handling). Same signatures as ``kernels.gla.reference``.

Decode is pure state traffic: per sequence and head the kernel reads S[K, V]
once, updates it in fp32 and writes it back in place, so it is bound by memory
bandwidth. One program owns a [K, BV] column strip of one (sequence, head):
the output o[BV] needs the whole K reduction, so strips never share results
and no atomics are needed; BV is chosen so that enough programs are in flight
at small batch.

Importing this module needs triton only; fla is imported when prefill runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gla_decode_kernel(
    q, k, v, g, o, pool, slots, scale,
    s_qb, s_qh, s_kb, s_kh, s_gb, s_gh, s_vb, s_vh, s_ob, s_oh,
    s_pn, s_ph, s_pk, s_pv,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    slot = tl.load(slots + i_b).to(tl.int64)
    if slot < 0:
        return
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_v, mask=m_v, other=0.0).to(tl.float32)
    p_base = pool + slot * s_pn + i_h * s_ph
    # o = sum_k q_k S[k, :]: accumulate per row, reduce across rows (threads and
    # warps) once after the loop rather than every step
    b_acc = tl.zeros([BK, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + i_b * s_kb + i_h * s_kh + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + i_b * s_gb + i_h * s_gh + o_k, mask=m_k, other=0.0).to(tl.float32)
        p_s = p_base + o_k[:, None] * s_pk + o_v[None, :] * s_pv
        m_s = m_k[:, None] & m_v[None, :]
        b_s = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_s)
        b_acc += b_s * b_q[:, None]
    b_o = tl.sum(b_acc, axis=0)
    tl.store(o + i_b * s_ob + i_h * s_oh + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_config(batch: int, H: int, K: int, V: int, state_bytes: int):
    """(BK, BV, num_warps) for the decode kernel, from sweeps on an H200
    (docs/perf.md, docs/perf/kernels-h200-sweep*.json): a 64 x 64 fp32 tile
    per loop step (256-byte rows), 32 x 128 for a bf16 pool (best for both GLA
    shapes at B = 64 and 256); narrower strips when fewer than ~2 programs per
    SM would run; with fewer programs than SMs even at 32-wide strips (B = 1,
    2), 16-wide strips and 256 rows per step, so each program walks few
    dependent steps."""
    if batch * H * triton.cdiv(V, 32) < 132:
        bv = min(16, triton.next_power_of_2(V))
        return min(256, triton.next_power_of_2(K)), bv, 4
    bv = 128 if state_bytes == 2 else 64
    while bv > 32 and batch * H * triton.cdiv(V, bv) < 264:
        bv //= 2
    bv = min(bv, triton.next_power_of_2(V))
    bk = min(32 if state_bytes == 2 and bv == 128 else 64, triton.next_power_of_2(K))
    return bk, bv, 8 if bk * bv >= 8192 else 4


def gla_decode_launch(q, k, v, g, state_pool, slots, scale, BK, BV, num_warps):
    B, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = (_last_dim_contiguous(t) for t in (q, k, v, g))
    assert state_pool.shape[1:] == (H, K, V), (tuple(state_pool.shape), (H, K, V))
    o = torch.empty_like(v)
    if B == 0:
        return o
    grid = (B * H, triton.cdiv(V, BV))
    _gla_decode_kernel[grid](
        q, k, v, g, o, state_pool, slots, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), g.stride(0), g.stride(1),
        v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        *state_pool.stride(),
        H=H, K=K, V=V, BK=BK, BV=BV, num_warps=num_warps,
    )
    return o


def gla_decode(q, k, v, g, state_pool, slots, scale):
    """One token per sequence, in place on ``state_pool[slots]`` (slot -1 skipped)."""
    B, H, K = q.shape
    V = v.shape[-1]
    BK, BV, nw = decode_config(B, H, K, V, state_pool.element_size())
    return gla_decode_launch(q, k, v, g, state_pool, slots, scale, BK, BV, nw)


# fla caches the chunk indices it derives from ``cu_seqlens`` (with a host sync)
# by tensor identity. Every layer of one forward passes the same offsets, so the
# int64 copy fla wants is made once per offsets tensor, not once per layer: one
# sync per forward instead of one per layer.
_last_offsets: list = [None, None]  # [offsets as passed in, their int64 copy]


def _int64_offsets(cu_seqlens: torch.Tensor) -> torch.Tensor:
    if cu_seqlens.dtype == torch.long:
        return cu_seqlens
    if _last_offsets[0] is not cu_seqlens:
        _last_offsets[:] = [cu_seqlens, cu_seqlens.to(torch.long)]
    return _last_offsets[1]


def gla_prefill(q, k, v, g, state_pool, slots, cu_seqlens, has_initial_state, scale, lanes=False):
    """Variable-length prompts through fla ``chunk_gla``; states gathered from and
    scattered back to the pool (one read and one write of B states per call),
    with no host sync of ours. A single sequence, or ``lanes`` (N sequences of
    equal length), takes fla's dense path: no host sync at all, so it can be
    captured in a CUDA graph."""
    from fla.ops.gla import chunk_gla

    from kernels._slot_copy import gather_states, scatter_states

    N = cu_seqlens.numel() - 1
    # fp32 initial states (chunk_gla's state dtype); fresh and padded rows get zeros
    h0 = gather_states(state_pool, slots, has_initial_state)
    if lanes or N == 1:
        T = q.shape[0] // N
        o, ht = chunk_gla(*(t.reshape(N, T, *t.shape[1:]) for t in (q, k, v, g)), scale=scale, initial_state=h0,
                          output_final_state=True)
    else:
        o, ht = chunk_gla(q[None], k[None], v[None], g[None], scale=scale, initial_state=h0,
                          output_final_state=True, cu_seqlens=_int64_offsets(cu_seqlens))
    scatter_states(ht, slots, state_pool)
    return o.reshape(-1, *o.shape[2:])
