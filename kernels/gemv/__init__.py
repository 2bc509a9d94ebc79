"""Decode's skinny projections (a few rows of x times a weight): a Triton
kernel on CUDA for up to ``MAX_ROWS`` rows of a 16-bit dtype, torch elsewhere.
The models reach it through ``model_registry.layers.project`` only with
``STATEX_GEMV=1``, until its speed against cuBLAS is measured
(``python -m kernels.gemv.bench``, docs/perf.md)."""
from __future__ import annotations

import torch

from kernels._dispatch import use_fast_path
from kernels.gemv import reference

MAX_ROWS = 8       # rows of x the kernel takes; above that the weight is reused enough for cuBLAS's GEMM tiles


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and use_fast_path(x, weight, bias)):
        from kernels.gemv import triton as fast

        return fast.gemv(x, weight, bias)
    return reference.gemv(x, weight, bias)


__all__ = ["MAX_ROWS", "gemv", "reference"]
