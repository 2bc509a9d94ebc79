"""Depthwise causal convolution (Mamba2's short conv over x|B|C) in plain torch.

The conv state holds the last W-1 inputs of a sequence, oldest first, so that
``y_t = act(bias + sum_j weight[:, j] * window_t[:, j])`` with
``window_t = [state, x]`` sliced to the W inputs ending at t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _act(y, activation):
    if activation in (None, "identity"):
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unsupported conv activation {activation!r} (expected 'silu' or None)")


def causal_conv(x, weight, bias, initial_state=None, activation="silu"):
    """x [B,T,C], weight [C,W], initial_state [B,C,W-1] -> (y [B,T,C], final_state [B,C,W-1])."""
    B, T, C = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)                                     # [B,C,T]
    state = (torch.zeros(B, C, W - 1, dtype=x.dtype, device=x.device) if initial_state is None
             else initial_state.to(x.dtype))
    full = torch.cat([state, xt], dim=-1)                      # [B,C,W-1+T]
    y = F.conv1d(full, weight[:, None, :].to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                 groups=C)                                     # [B,C,T]
    final = full[..., -(W - 1):] if W > 1 else full[..., :0]
    return _act(y, activation).transpose(1, 2), final


def conv_decode(x, conv_pool, slots, weight, bias, activation="silu"):
    """x [B,C]: one token per sequence; the window shifts left in place."""
    y = torch.zeros_like(x)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        yi, final = causal_conv(x[i][None, None], weight, bias, conv_pool[slot][None], activation)
        y[i] = yi[0, 0]
        conv_pool[slot] = final[0].to(conv_pool.dtype)
    return y


def conv_prefill(x, conv_pool, slots, cu_seqlens, has_initial_state, weight, bias, activation="silu"):
    """x [N_tok,C] of variable-length sequences (cu_seqlens), state carried through the pool."""
    y = torch.zeros_like(x)
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        s, e = bounds[i], bounds[i + 1]
        init = conv_pool[slot][None] if bool(has_initial_state[i]) else None
        yi, final = causal_conv(x[None, s:e], weight, bias, init, activation)
        y[s:e] = yi[0]
        conv_pool[slot] = final[0].to(conv_pool.dtype)
    return y
