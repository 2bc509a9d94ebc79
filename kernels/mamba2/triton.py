"""Mamba2 SSD on CUDA: slot-indexed decode (our Triton kernel) and variable-length
prefill (mamba-ssm's chunk scan plus our slot handling). Same signatures as
``kernels.mamba2.reference``.

Decode reads and writes each named sequence's h[H, P, N] once, in place; one
program owns a [BP, N] row strip of one (sequence, head), so the output y[BP]
is complete within the program.

Prefill: mamba-ssm's varlen chunk scan accepts one initial state for the whole
packed batch, so we run it from zero states and add the initial states' part
afterwards (the recurrence is linear in the state):
    y_t   += exp(sum_{s<=t} dt_s A) * (h0 C_t)
    h_end  = h_end(zero start) + exp(sum_s dt_s A) * h0
A single sequence goes straight through mamba-ssm with its initial state.

Importing this module needs triton only; mamba-ssm is imported when prefill runs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

CHUNK = 256  # mamba-ssm chunk size for prefill (Mamba2's default)


@triton.jit
def _softplus_clamp(dt, lo, hi, HAS_CLAMP: tl.constexpr):
    # torch's softplus (threshold 20), accurate for very negative inputs too
    sp = tl.where(dt > 20.0, dt, tl.where(dt < -15.0, tl.exp(dt), tl.log(1.0 + tl.exp(dt))))
    if HAS_CLAMP:
        sp = tl.minimum(tl.maximum(sp, lo), hi)
    return sp


@triton.jit
def _ssd_decode_kernel(
    x, dt, A, Bm, Cm, D, dt_bias, y, pool, slots, dt_lo, dt_hi,
    s_xb, s_xh, s_dtb, s_Bb, s_Bg, s_Cb, s_Cg, s_yb, s_yh,
    s_pn, s_ph, s_pp, s_pd,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_D: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_p = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    slot = tl.load(slots + i_b).to(tl.int64)
    if slot < 0:
        return
    i_g = i_h // (H // G)
    b_dt = tl.load(dt + i_b * s_dtb + i_h).to(tl.float32) + tl.load(dt_bias + i_h).to(tl.float32)
    b_dt = _softplus_clamp(b_dt, dt_lo, dt_hi, HAS_CLAMP)
    dA = tl.exp(b_dt * tl.load(A + i_h).to(tl.float32))
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    b_x = tl.load(x + i_b * s_xb + i_h * s_xh + o_p, mask=m_p, other=0.0).to(tl.float32)
    b_xdt = b_x * b_dt
    p_base = pool + slot * s_pn + i_h * s_ph
    b_acc = tl.zeros([BP, BN], dtype=tl.float32)   # reduced over N once, after the loop
    for i_n in range(0, tl.cdiv(N, BN)):
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < N
        b_B = tl.load(Bm + i_b * s_Bb + i_g * s_Bg + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(Cm + i_b * s_Cb + i_g * s_Cg + o_n, mask=m_n, other=0.0).to(tl.float32)
        p_s = p_base + o_p[:, None] * s_pp + o_n[None, :] * s_pd
        m_s = m_p[:, None] & m_n[None, :]
        b_s = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
        b_s = b_s * dA + b_xdt[:, None] * b_B[None, :]
        tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_s)
        b_acc += b_s * b_C[None, :]
    b_y = tl.sum(b_acc, axis=1)
    if HAS_D:
        b_y += tl.load(D + i_h).to(tl.float32) * b_x
    tl.store(y + i_b * s_yb + i_h * s_yh + o_p, b_y.to(y.dtype.element_ty), mask=m_p)


def _ld(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _clamp_args(dt_limit):
    lo, hi = (float(v) for v in dt_limit) if dt_limit is not None else (0.0, math.inf)
    has = lo > 0.0 or hi != math.inf
    return lo, (hi if hi != math.inf else 3.0e38), has


def decode_config(batch: int, H: int, P: int, N: int, state_bytes: int):
    """(BP, BN, num_warps), from sweeps on an H200 (docs/perf.md): 32 rows of
    256 bytes per loop step for an fp32 pool, 64 for a bf16 pool (best for
    N = 128 and 512 at B = 64 and 256). With few sequences (fewer than ~2
    programs per SM at that tile), one full-N step per program on narrow row
    strips instead (2048 elements: 16 x 128 with 8 warps for N = 128, 4 x 512
    with 4 for N = 512, best at B = 1, 2), so no program walks a dependent
    chain of loop steps."""
    bn = min(triton.next_power_of_2(N), 64 if state_bytes == 4 else 128)
    bp = min(triton.next_power_of_2(P), 32 if state_bytes == 4 else 64)
    if batch * H * triton.cdiv(P, bp) >= 264:
        return bp, bn, 8 if bp * bn >= 2048 else 4
    bn = min(triton.next_power_of_2(N), 512)
    bp = max(1, min(bp, 2048 // bn))
    return bp, bn, 8 if bn <= 128 and bp * bn >= 2048 else 4


def ssd_decode_launch(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots, BP, BN, num_warps):
    Bt, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    assert ssm_pool.shape[1:] == (H, P, N), (tuple(ssm_pool.shape), (H, P, N))
    assert H % G == 0
    x, dt, B, C = (_ld(t) for t in (x, dt, B, C))
    y = torch.empty_like(x)
    if Bt == 0:
        return y
    lo, hi, has_clamp = _clamp_args(dt_limit)
    grid = (Bt * H, triton.cdiv(P, BP))
    _ssd_decode_kernel[grid](
        x, dt, A, B, C, D if D is not None else A, dt_bias, y, ssm_pool, slots, lo, hi,
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        y.stride(0), y.stride(1), *ssm_pool.stride(),
        H=H, G=G, P=P, N=N, BP=BP, BN=BN, HAS_CLAMP=has_clamp, HAS_D=D is not None,
        num_warps=num_warps,
    )
    return y


def ssd_decode(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots):
    """One token per sequence, in place on ``ssm_pool[slots]`` (slot -1 skipped)."""
    Bt, H, P = x.shape
    N = B.shape[-1]
    BP, BN, nw = decode_config(Bt, H, P, N, ssm_pool.element_size())
    return ssd_decode_launch(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots, BP, BN, nw)


@triton.jit
def _ssd_init_state_kernel(
    y, dt, A, Cm, dt_bias, fin, pool, slots, cu, has_init, dt_lo, dt_hi,
    s_yt, s_yh, s_dtt, s_Ct, s_Cg, s_fn, s_fh, s_fp,
    s_pn, s_ph, s_pp, s_pd,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_CLAMP: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Per (sequence, head, P strip): add the initial state's part to y and write
    the final state (zero-start final state + decayed initial state) to the pool."""
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_p = tl.program_id(2)
    slot = tl.load(slots + i_n).to(tl.int64)
    if slot < 0:
        return
    i_g = i_h // (H // G)
    start = tl.load(cu + i_n)
    end = tl.load(cu + i_n + 1)
    init = tl.load(has_init + i_n) != 0
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    m_s = m_p[:, None] & m_n[None, :]
    p_s = pool + slot * s_pn + i_h * s_ph + o_p[:, None] * s_pp + o_n[None, :] * s_pd
    p_fin = fin + i_n * s_fn + i_h * s_fh + o_p[:, None] * s_fp + o_n[None, :]
    if init:
        b_h0 = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
        a_h = tl.load(A + i_h).to(tl.float32)
        b_bias = tl.load(dt_bias + i_h).to(tl.float32)
        carry = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
        t0 = start
        # once exp(carry) underflows, the initial state no longer contributes
        while (t0 < end) & (carry > -104.0):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < end
            b_dt = tl.load(dt + o_t.to(tl.int64) * s_dtt + i_h, mask=m_t, other=0.0).to(tl.float32) + b_bias
            b_dt = _softplus_clamp(b_dt, dt_lo, dt_hi, HAS_CLAMP)
            b_a = tl.where(m_t, b_dt * a_h, 0.0)
            b_cum = tl.cumsum(b_a, axis=0) + carry
            b_C = tl.load(Cm + o_t[:, None].to(tl.int64) * s_Ct + i_g * s_Cg + o_n[None, :],
                          mask=m_t[:, None] & m_n[None, :], other=0.0).to(tl.float32)
            if F32_DOT:
                b_c = tl.dot(b_C, tl.trans(b_h0), input_precision="ieee")       # [BT, BP]
            else:
                b_c = tl.dot(b_C, tl.trans(b_h0))
            p_y = y + o_t[:, None].to(tl.int64) * s_yt + i_h * s_yh + o_p[None, :]
            m_y = m_t[:, None] & m_p[None, :]
            b_y = tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
            tl.store(p_y, (b_y + tl.exp(b_cum)[:, None] * b_c).to(p_y.dtype.element_ty), mask=m_y)
            carry += tl.sum(b_a, axis=0)
            t0 += BT
        # past an early exit the decay is below exp(-104): the initial state is gone
        b_fin = tl.load(p_fin, mask=m_s, other=0.0) + tl.exp(tl.where(t0 < end, -1.0e4, carry)) * b_h0
    else:
        b_fin = tl.load(p_fin, mask=m_s, other=0.0)
    tl.store(p_s, b_fin.to(p_s.dtype.element_ty), mask=m_s)


def ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots, cu_seqlens, has_initial_state,
                lanes=False):
    """Variable-length prompts, each from its slot's state (or zero), final state written back.
    One sequence, or ``lanes`` (sequences of equal length), take mamba-ssm's dense
    batch with initial and final states: no host sync, so it can be captured in a
    CUDA graph."""
    from kernels.mamba2.mamba_ssm_ops import mamba_chunk_scan_combined

    N_tok, H, P = x.shape
    G, Nst = B.shape[-2], B.shape[-1]
    nseq = cu_seqlens.numel() - 1
    assert ssm_pool.shape[1:] == (H, P, Nst)
    lo, hi, has_clamp = _clamp_args(dt_limit)
    limit = (lo, hi if has_clamp and hi < 3.0e38 else math.inf)
    slots_l = slots.to(torch.long)
    if N_tok == 0:
        # no tokens: fresh sequences get a zero state
        ok = (slots_l >= 0) & ~has_initial_state.to(torch.bool)
        idx = slots_l[ok]
        ssm_pool.index_fill_(0, idx, 0)
        return torch.empty_like(x)
    with torch.no_grad():
        if nseq == 1 or lanes:
            # a dense batch: mamba-ssm takes the initial states directly
            from kernels._slot_copy import gather_states, scatter_states

            T = N_tok // nseq
            h0 = gather_states(ssm_pool, slots, has_initial_state)
            y, fin = mamba_chunk_scan_combined(
                *(t.reshape(nseq, T, *t.shape[1:]) for t in (x, dt)), A,
                *(t.reshape(nseq, T, *t.shape[1:]) for t in (B, C)), CHUNK, D=D, dt_bias=dt_bias,
                initial_states=h0, dt_softplus=True, dt_limit=limit, return_final_states=True)
            scatter_states(fin, slots, ssm_pool)
            return y.reshape(N_tok, *y.shape[2:])
        cu = cu_seqlens.to(torch.int32)
        seq_idx = torch.searchsorted(
            cu[1:].contiguous(), torch.arange(N_tok, device=x.device, dtype=torch.int32), right=True
        ).to(torch.int32)[None]
        y, fin = mamba_chunk_scan_combined(
            x[None], dt[None], A, B[None], C[None], CHUNK, D=D, dt_bias=dt_bias,
            seq_idx=seq_idx, cu_seqlens=cu.to(torch.long), dt_softplus=True, dt_limit=limit,
            return_varlen_states=True)
        y = y[0]
        fin = fin.float().contiguous()
    C_, dt_ = _ld(C), _ld(dt)
    BN = max(16, triton.next_power_of_2(Nst))
    BP = max(16, min(triton.next_power_of_2(P), 8192 // BN))
    BT = 32 if BN <= 128 else 16
    grid = (nseq, H, triton.cdiv(P, BP))
    _ssd_init_state_kernel[grid](
        y, dt_, A, C_, dt_bias, fin, ssm_pool, slots, cu, has_initial_state.to(torch.int8), lo, hi,
        y.stride(0), y.stride(1), dt_.stride(0), C_.stride(0), C_.stride(1),
        fin.stride(0), fin.stride(1), fin.stride(2), *ssm_pool.stride(),
        H=H, G=G, P=P, N=Nst, BT=BT, BP=BP, BN=BN, HAS_CLAMP=has_clamp,
        F32_DOT=x.dtype == torch.float32, num_warps=4 if BN <= 128 else 8,
    )
    return y
