"""Mamba2's state space duality (SSD) in plain torch, after mamba-ssm's
``ssd_minimal.py``: the oracle for the Triton kernels and the CPU path.

Per head h (P = headdim, N = d_state, group g(h) = h // (H // G)):
    dt_t = clamp(softplus(dt_raw_t + dt_bias), *dt_limit)
    h_t  = exp(dt_t * A) h_{t-1} + dt_t * x_t^T B_t        h: [P, N]
    y_t  = h_t C_t + D x_t
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 64


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def discretize_dt(dt, dt_bias, dt_limit):
    dt = F.softplus(dt + dt_bias)
    lo, hi = dt_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(lo, hi)
    return dt


def _heads(t, H):
    """[..., G, N] -> [..., H, N] (each group serves H // G consecutive heads)."""
    G = t.shape[-2]
    return t.repeat_interleave(H // G, dim=-2)


def _segsum(x):
    """x [..., L] -> [..., L, L] with out[i, j] = sum_{j < s <= i} x[s] (−inf above the diagonal)."""
    L = x.shape[-1]
    cs = x.cumsum(-1)
    out = cs[..., :, None] - cs[..., None, :]
    mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~mask, -math.inf)


def ssd_recurrent(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state=None):
    """Token-by-token form. x [Bt,T,H,P], dt [Bt,T,H], B,C [Bt,T,G,N]."""
    md = _math_dtype(x)
    Bt, T, H, P = x.shape
    N = B.shape[-1]
    dtv = discretize_dt(dt.to(md), dt_bias.to(md), dt_limit)
    Bh, Ch = _heads(B.to(md), H), _heads(C.to(md), H)
    h = (torch.zeros(Bt, H, P, N, dtype=md, device=x.device) if initial_state is None
         else initial_state.to(md).clone())
    y = torch.empty(Bt, T, H, P, dtype=md, device=x.device)
    for t in range(T):
        dA = (dtv[:, t] * A.to(md)).exp()                                     # [Bt,H]
        h = h * dA[..., None, None] + (dtv[:, t, :, None] * x[:, t].to(md))[..., None] * Bh[:, t, :, None, :]
        y[:, t] = torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]) + D.to(md)[:, None] * x[:, t].to(md)
    return y.to(x.dtype), h


def ssd_chunk(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state=None, chunk_size: int = CHUNK):
    """Chunked SSD (same function as ``ssd_recurrent``); differentiable.

    Returns (y [Bt,T,H,P] in x's dtype, final_state [Bt,H,P,N] fp32/fp64).
    """
    md = _math_dtype(x)
    Bt, T, H, P = x.shape
    N = B.shape[-1]
    L = chunk_size
    pad = (-T) % L
    dtv = discretize_dt(dt.to(md), dt_bias.to(md), dt_limit)              # [Bt,T,H]
    xd = x.to(md) * dtv[..., None]                                         # dt-scaled input
    a = dtv * A.to(md)                                                     # log decay per step
    Bh, Ch = _heads(B.to(md), H), _heads(C.to(md), H)
    if pad:  # padded steps: no decay, no input
        xd, a, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xd, a, Bh, Ch))
    n = (T + pad) // L
    xd = xd.reshape(Bt, n, L, H, P)
    Bh = Bh.reshape(Bt, n, L, H, N)
    Ch = Ch.reshape(Bt, n, L, H, N)
    a = a.reshape(Bt, n, L, H).permute(0, 3, 1, 2)                         # [Bt,H,n,L]
    a_cum = a.cumsum(-1)

    # within a chunk: y_i += sum_{j<=i} (C_i . B_j) exp(a_cum_i - a_cum_j) dt_j x_j
    decay_in = _segsum(a).exp()                                            # [Bt,H,n,L,L]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, decay_in, xd)
    # each chunk's contribution to the state at its end
    decay_to_end = (a_cum[..., -1:] - a_cum).exp()                         # [Bt,H,n,L]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, xd)
    decay_chunk = a_cum[..., -1].exp()                                     # [Bt,H,n]
    decay_from_start = a_cum.exp()                                         # [Bt,H,n,L]

    h = (torch.zeros(Bt, H, P, N, dtype=md, device=x.device) if initial_state is None
         else initial_state.to(md))
    y_off = []
    for c in range(n):
        y_off.append(torch.einsum("blhn,bhpn,bhl->blhp", Ch[:, c], h, decay_from_start[:, :, c]))
        h = h * decay_chunk[:, :, c, None, None] + chunk_states[:, c]
    y = y_diag + torch.stack(y_off, dim=1)
    y = y.reshape(Bt, n * L, H, P)[:, :T] + D.to(md)[:, None] * x.to(md)
    return y.to(x.dtype), h


def ssd_decode(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots):
    """One token per sequence, in place on ``ssm_pool[slots]`` (slot -1 skipped)."""
    y = torch.zeros_like(x)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        yi, h = ssd_recurrent(x[i][None, None], dt[i][None, None], A, B[i][None, None], C[i][None, None],
                              D, dt_bias, dt_limit, ssm_pool[slot][None])
        y[i] = yi[0, 0]
        ssm_pool[slot] = h[0].to(ssm_pool.dtype)
    return y


def ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots, cu_seqlens, has_initial_state):
    """Variable-length prompts, each from its slot's state (or zero), final state written back."""
    y = torch.zeros_like(x)
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        s, e = bounds[i], bounds[i + 1]
        init = ssm_pool[slot][None] if bool(has_initial_state[i]) else None
        yi, h = ssd_chunk(x[None, s:e], dt[None, s:e], A, B[None, s:e], C[None, s:e], D, dt_bias,
                          dt_limit, init)
        y[s:e] = yi[0]
        ssm_pool[slot] = h[0].to(ssm_pool.dtype)
    return y
