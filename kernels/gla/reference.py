"""Gated linear attention in plain torch: the oracle for the Triton kernels and
the CPU execution path.

Per head:  S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = (scale * q_t) S_t
(the state is updated with the current token before it is read, as in fla's
``naive_recurrent_gla``). All math runs in fp32 (or fp64 when the inputs are
fp64, which the tests use); outputs come back in v's dtype.
"""
from __future__ import annotations

import torch

# Chunk length of the chunked form. Its intra-chunk scores factor the decays around the
# chunk's midpoint (two matmuls: fast) where the factors stay far from overflow, which is
# the case for GLA's usual gates (logsigmoid / 16: about -0.05 per token). A trained gate
# can reach g = logsigmoid(-113) / 16 = -7.1 per token, and 16 such tokens overflowed
# fp32 there (NaN on the CPU path); chunks like that take ``A_intra``, where every decay
# factor is exp of a non-positive number, in sub-blocks of SUB rows (slower: a loop of small
# products instead of two matmuls).
CHUNK = 32
SUB = 8
# the largest |cumulative log decay - the midpoint's| the midpoint form takes: factors up
# to e^30 (fp32) or e^300 (fp64), and their products for masked pairs, stay finite
MIDPOINT_MAX_EXP = {torch.float32: 30.0, torch.float64: 300.0}


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gla_recurrent(q, k, v, g, scale, initial_state=None):
    """Token-by-token recurrence. q,k,g [B,T,H,K], v [B,T,H,V] -> (o, S [B,H,K,V])."""
    dt = _math_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = (torch.zeros(B, H, K, V, dtype=dt, device=q.device) if initial_state is None
         else initial_state.to(dt).clone())
    o = torch.empty(B, T, H, V, dtype=dt, device=q.device)
    for t in range(T):
        S = S * g[:, t].to(dt).exp()[..., None] + k[:, t].to(dt)[..., None] * v[:, t].to(dt)[..., None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t].to(dt) * scale, S)
    return o.to(v.dtype), S


def gla_chunk(q, k, v, g, scale, initial_state=None, chunk_size: int = CHUNK):
    """Chunked form (same function as ``gla_recurrent``, O(T) with matmuls).

    Differentiable. q,k,g [B,T,H,K], v [B,T,H,V], initial_state [B,H,K,V].
    Returns (o [B,T,H,V] in v's dtype, final_state [B,H,K,V] fp32/fp64).
    """
    dt = _math_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    # [B,H,T,*] in math precision; padded steps have g=0 (no decay), k=v=0.
    q_, k_, v_, g_ = (x.to(dt).transpose(1, 2) for x in (q, k, v, g))
    if pad:
        q_, k_, v_, g_ = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q_, k_, v_, g_))
    n = (T + pad) // C
    q_ = q_.reshape(B, H, n, C, K) * scale
    k_ = k_.reshape(B, H, n, C, K)
    v_ = v_.reshape(B, H, n, C, V)
    G = g_.reshape(B, H, n, C, K).cumsum(-2)              # log decay from chunk start, inclusive (non-increasing)
    from_mid = G - G[..., C // 2 - 1: C // 2, :]            # log decay relative to the chunk's midpoint
    if float(from_mid.abs().amax()) <= MIDPOINT_MAX_EXP[dt]:
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        A = ((q_ * from_mid.exp()) @ (k_ * (-from_mid).exp()).transpose(-1, -2)).masked_fill(~causal, 0.0)
    else:
        A = A_intra(q_, k_, G)                                # [B,H,n,C,C]
    o_intra = A @ v_                                          # [B,H,n,C,V]

    q_inter = q_ * G.exp()                                   # decay from chunk start to token
    k_to_end = k_ * (G[..., -1:, :] - G).exp()               # decay from token to chunk end
    decay_chunk = G[..., -1, :].exp()                        # [B,H,n,K]

    S = (torch.zeros(B, H, K, V, dtype=dt, device=q.device) if initial_state is None
         else initial_state.to(dt))
    outs = []
    for c in range(n):
        outs.append(o_intra[:, :, c] + q_inter[:, :, c] @ S)
        S = decay_chunk[:, :, c, :, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ v_[:, :, c]
    o = torch.stack(outs, dim=2).reshape(B, H, n * C, V)[:, :, :T]
    return o.transpose(1, 2).to(v.dtype), S


def A_intra(q, k, G, sub: int = SUB):
    """Causal scores within each chunk, A[i, j] = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i
    (q already scaled), [..., C, K] -> [..., C, C]. Rows go in sub-blocks: columns of earlier
    sub-blocks factor around the cumulative decay just before the row block (r), so both
    factors, exp(G_i - G_r) and exp(G_r - G_j), are at most 1; the diagonal block takes the
    pairwise exponent, masked to -inf above the diagonal before exp."""
    C = q.shape[-2]
    rows = []
    for s in range(0, C, sub):
        e = min(s + sub, C)
        Gi = G[..., s:e, :]
        diff = (Gi[..., :, None, :] - Gi[..., None, :, :])                    # [..., c, c, K]
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
        diag = torch.einsum("...ik,...jk,...ijk->...ij", q[..., s:e, :], k[..., s:e, :],
                            diff.masked_fill(~causal[:, :, None], float("-inf")).exp())
        parts = [diag, diag.new_zeros(*diag.shape[:-1], C - e)]
        if s:
            Gr = G[..., s - 1:s, :]
            earlier = (q[..., s:e, :] * (Gi - Gr).exp()) @ (k[..., :s, :] * (Gr - G[..., :s, :]).exp()).transpose(-1, -2)
            parts.insert(0, earlier)
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


def gla_decode(q, k, v, g, state_pool, slots, scale):
    """One token per sequence, in place on ``state_pool[slots]`` (slot -1 skipped)."""
    o = torch.zeros_like(v)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        dt = torch.float64 if state_pool.dtype == torch.float64 else torch.float32
        S = state_pool[slot].to(dt)
        S = S * g[i].to(dt).exp()[..., None] + k[i].to(dt)[..., None] * v[i].to(dt)[..., None, :]
        o[i] = torch.einsum("hk,hkv->hv", q[i].to(dt) * scale, S).to(v.dtype)
        state_pool[slot] = S.to(state_pool.dtype)
    return o


def gla_prefill(q, k, v, g, state_pool, slots, cu_seqlens, has_initial_state, scale):
    """Variable-length prompts, each from its slot's state (or zero), final state written back."""
    o = torch.zeros_like(v)
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        s, e = bounds[i], bounds[i + 1]
        init = state_pool[slot][None] if bool(has_initial_state[i]) else None
        oi, S = gla_chunk(q[None, s:e], k[None, s:e], v[None, s:e], g[None, s:e], scale, init)
        o[s:e] = oi[0]
        state_pool[slot] = S[0].to(state_pool.dtype)
    return o
