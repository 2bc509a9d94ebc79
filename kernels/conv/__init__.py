"""Depthwise causal conv (Mamba2's short conv): whole sequences, decode, prefill."""
from __future__ import annotations

from kernels._dispatch import use_fast_path
from kernels.conv import reference


def causal_conv(x, weight, bias, initial_state=None, activation="silu"):
    # F.conv1d is already a good kernel on every device; no Triton variant needed.
    return reference.causal_conv(x, weight, bias, initial_state, activation)


def conv_decode(x, conv_pool, slots, weight, bias, activation="silu"):
    if use_fast_path(x, conv_pool):
        from kernels.conv import triton as fast

        return fast.conv_decode(x, conv_pool, slots, weight, bias, activation)
    return reference.conv_decode(x, conv_pool, slots, weight, bias, activation)


def conv_prefill(x, conv_pool, slots, cu_seqlens, has_initial_state, weight, bias, activation="silu"):
    if use_fast_path(x, conv_pool):
        from kernels.conv import triton as fast

        return fast.conv_prefill(x, conv_pool, slots, cu_seqlens, has_initial_state, weight, bias, activation)
    return reference.conv_prefill(x, conv_pool, slots, cu_seqlens, has_initial_state, weight, bias, activation)


__all__ = ["causal_conv", "conv_decode", "conv_prefill", "reference"]
