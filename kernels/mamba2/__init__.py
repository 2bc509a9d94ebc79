"""Mamba2 SSD: chunked (training), slot-indexed decode and prefill."""
from __future__ import annotations

from kernels._dispatch import use_fast_path
from kernels.mamba2 import reference


def ssd_chunk(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state=None):
    """Whole sequences, differentiable: mamba-ssm's chunk scan on CUDA, torch SSD elsewhere."""
    if use_fast_path(x):
        from kernels.mamba2.mamba_ssm_ops import mamba_chunk_scan_combined

        y, final = mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size=256, D=D, dt_bias=dt_bias, dt_softplus=True,
            initial_states=initial_state, dt_limit=tuple(dt_limit), return_final_states=True)
        return y, final
    return reference.ssd_chunk(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state)


def ssd_decode(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots):
    if use_fast_path(x, ssm_pool):
        from kernels.mamba2 import triton as fast

        return fast.ssd_decode(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots)
    return reference.ssd_decode(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots)


def ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots, cu_seqlens, has_initial_state,
                lanes=False):
    """``lanes``: every sequence has the same length (see ``kernels.gla.gla_prefill``)."""
    if use_fast_path(x, ssm_pool):
        from kernels.mamba2 import triton as fast

        return fast.ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots, cu_seqlens,
                                has_initial_state, lanes=lanes)
    return reference.ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_pool, slots, cu_seqlens,
                                 has_initial_state)


__all__ = ["ssd_chunk", "ssd_decode", "ssd_prefill", "reference"]
