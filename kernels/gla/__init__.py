"""Gated linear attention: chunked (training), slot-indexed decode and prefill."""
from __future__ import annotations

from kernels._dispatch import use_fast_path
from kernels.gla import reference


def gla_chunk(q, k, v, g, scale, initial_state=None):
    """Whole sequences, differentiable: fla ``chunk_gla`` on CUDA, torch chunked form elsewhere."""
    if use_fast_path(q):
        from fla.ops.gla import chunk_gla

        o, final = chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=True)
        return o, final
    return reference.gla_chunk(q, k, v, g, scale, initial_state)


def gla_decode(q, k, v, g, state_pool, slots, scale):
    if use_fast_path(q, state_pool):
        from kernels.gla import triton as fast

        return fast.gla_decode(q, k, v, g, state_pool, slots, scale)
    return reference.gla_decode(q, k, v, g, state_pool, slots, scale)


def gla_prefill(q, k, v, g, state_pool, slots, cu_seqlens, has_initial_state, scale, lanes=False):
    """``lanes``: the caller guarantees every sequence has the same length (cu_seqlens
    [0, L, 2L, ...]); the fast path then takes them as a dense batch, with no host
    sync (the reference, a loop over sequences, needs no hint)."""
    if use_fast_path(q, state_pool):
        from kernels.gla import triton as fast

        return fast.gla_prefill(q, k, v, g, state_pool, slots, cu_seqlens, has_initial_state, scale, lanes=lanes)
    return reference.gla_prefill(q, k, v, g, state_pool, slots, cu_seqlens, has_initial_state, scale)


__all__ = ["gla_chunk", "gla_decode", "gla_prefill", "reference"]
