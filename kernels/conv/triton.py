"""Depthwise causal conv (Mamba2's short conv) on CUDA: slot-indexed decode and
variable-length prefill, in Triton. Same signatures as ``kernels.conv.reference``.

The conv pool row of a sequence holds its last W-1 inputs, oldest first.
Math in fp32; y in x's dtype; the pool keeps its own dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _activation_flag(activation) -> bool:
    if activation in (None, "identity"):
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"unsupported conv activation {activation!r} (expected 'silu' or None)")


@triton.jit
def _conv_decode_kernel(
    x, y, pool, slots, w, bias,
    s_xb, s_yb, s_pn, s_pc, s_pw, s_wc, s_ww,
    C, W: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_c = tl.program_id(1)
    slot = tl.load(slots + i_b).to(tl.int64)
    if slot < 0:
        return
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_w = tl.arange(0, WP)
    # window = [state (W-1 values), x]; state column j holds input t-(W-1)+j.
    m_st = m_c[:, None] & (o_w[None, :] < W - 1)
    p_st = pool + slot * s_pn + o_c[:, None] * s_pc + o_w[None, :] * s_pw
    b_st = tl.load(p_st, mask=m_st, other=0.0).to(tl.float32)
    # the shifted state (column j <- column j+1), read now, written after the barrier
    m_sh = m_c[:, None] & (o_w[None, :] < W - 2)
    b_sh = tl.load(p_st + s_pw, mask=m_sh, other=0.0)
    b_x = tl.load(x + i_b * s_xb + o_c, mask=m_c, other=0.0)
    b_w = tl.load(w + o_c[:, None] * s_wc + o_w[None, :] * s_ww, mask=m_c[:, None] & (o_w[None, :] < W),
                  other=0.0).to(tl.float32)
    # weight column W-1 multiplies x; columns < W-1 multiply the state
    w_last = tl.sum(tl.where(o_w[None, :] == W - 1, b_w, 0.0), axis=1)
    acc = tl.sum(b_st * b_w, axis=1) + w_last * b_x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y + i_b * s_yb + o_c, acc.to(y.dtype.element_ty), mask=m_c)
    # every thread has read the old window before anyone overwrites it
    tl.debug_barrier()
    b_new = tl.where(o_w[None, :] == W - 2, b_x[:, None].to(tl.float32), b_sh.to(tl.float32))
    tl.store(p_st, b_new.to(p_st.dtype.element_ty), mask=m_st)


def conv_decode(x, conv_pool, slots, weight, bias, activation="silu"):
    """x [B,C]: one token per sequence; each named slot's window shifts left in place."""
    silu = _activation_flag(activation)
    B, C = x.shape
    W = weight.shape[-1]
    assert W >= 2 and conv_pool.shape[1:] == (C, W - 1)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty_like(x)
    if B == 0:
        return y
    BC = 256
    grid = (B, triton.cdiv(C, BC))
    _conv_decode_kernel[grid](
        x, y, conv_pool, slots, weight, bias if bias is not None else weight,
        x.stride(0), y.stride(0), *conv_pool.stride(), *weight.stride(),
        C, W=W, WP=triton.next_power_of_2(W), BC=BC,
        HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
    )
    return y


@triton.jit
def _conv_prefill_kernel(
    x, y, pool, slots, cu, has_init, tok_seq, w, bias,
    s_xt, s_yt, s_pn, s_pc, s_pw, s_wc, s_ww,
    N_tok, C, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_c = tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < N_tok
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    seq = tl.load(tok_seq + o_t, mask=m_t, other=0)
    start = tl.load(cu + seq, mask=m_t, other=0)
    slot = tl.load(slots + seq, mask=m_t, other=-1).to(tl.int64)
    init = tl.load(has_init + seq, mask=m_t, other=0) != 0
    from_pool = init & (slot >= 0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        pos = o_t - (W - 1) + j          # input position feeding weight column j
        in_seq = pos >= start
        b_in = tl.load(x + pos[:, None].to(tl.int64) * s_xt + o_c[None, :],
                       mask=(m_t & in_seq)[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        # before the sequence start: state column (W-1) - (start - pos)
        col = (W - 1) - (start - pos)
        m_p = (m_t & (~in_seq) & from_pool)[:, None] & m_c[None, :]
        b_p = tl.load(pool + slot[:, None] * s_pn + o_c[None, :] * s_pc + col[:, None] * s_pw,
                      mask=m_p, other=0.0).to(tl.float32)
        b_w = tl.load(w + o_c * s_wc + j * s_ww, mask=m_c, other=0.0).to(tl.float32)
        acc += (b_in + b_p) * b_w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y + o_t[:, None].to(tl.int64) * s_yt + o_c[None, :], acc.to(y.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _conv_state_kernel(
    x, pool, slots, cu, has_init,
    s_xt, s_pn, s_pc, s_pw,
    C, W: tl.constexpr, WP: tl.constexpr, BC: tl.constexpr,
):
    """New window of each sequence = its last W-1 inputs, reaching back into the
    old window (or zeros) when the sequence is shorter than W-1."""
    i_n = tl.program_id(0)
    i_c = tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    if slot < 0:
        return
    start = tl.load(cu + i_n)
    end = tl.load(cu + i_n + 1)
    init = tl.load(has_init + i_n).to(tl.int32)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_w = tl.arange(0, WP)
    m_w = o_w < W - 1
    pos = end - (W - 1) + o_w
    in_seq = pos >= start
    m_old = m_w & (pos < start) & ((tl.zeros([WP], dtype=tl.int32) + init) != 0)
    b_in = tl.load(x + pos[None, :].to(tl.int64) * s_xt + o_c[:, None],
                   mask=m_c[:, None] & (m_w & in_seq)[None, :], other=0.0).to(tl.float32)
    col = (W - 1) - (start - pos)
    p_row = pool + slot * s_pn + o_c[:, None] * s_pc
    b_old = tl.load(p_row + col[None, :] * s_pw,
                    mask=m_c[:, None] & m_old[None, :], other=0.0).to(tl.float32)
    tl.debug_barrier()
    tl.store(p_row + o_w[None, :] * s_pw, (b_in + b_old).to(pool.dtype.element_ty),
             mask=m_c[:, None] & m_w[None, :])


def token_to_seq(cu_seqlens: torch.Tensor, n_tok: int) -> torch.Tensor:
    """Sequence index of each flattened token (no host sync)."""
    pos = torch.arange(n_tok, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True).to(torch.int32)


def conv_prefill(x, conv_pool, slots, cu_seqlens, has_initial_state, weight, bias, activation="silu"):
    """x [N_tok,C] of variable-length sequences (cu_seqlens), state carried through the pool."""
    silu = _activation_flag(activation)
    N_tok, C = x.shape
    W = weight.shape[-1]
    N = cu_seqlens.numel() - 1
    assert W >= 2 and conv_pool.shape[1:] == (C, W - 1)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty_like(x)
    if N == 0:
        return y
    cu = cu_seqlens.to(torch.int32)
    init = has_initial_state.to(torch.int8)
    if N_tok > 0:
        tok_seq = token_to_seq(cu, N_tok)
        BT, BC = 32, 128
        grid = (triton.cdiv(N_tok, BT), triton.cdiv(C, BC))
        _conv_prefill_kernel[grid](
            x, y, conv_pool, slots, cu, init, tok_seq, weight, bias if bias is not None else weight,
            x.stride(0), y.stride(0), *conv_pool.stride(), *weight.stride(),
            N_tok, C, W=W, BT=BT, BC=BC, HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
        )
    # after every read of the old windows (stream order), write the new ones
    BC = 256
    _conv_state_kernel[(N, triton.cdiv(C, BC))](
        x, conv_pool, slots, cu, init, x.stride(0), *conv_pool.stride(),
        C, W=W, WP=triton.next_power_of_2(W - 1), BC=BC, num_warps=4,
    )
    return y
