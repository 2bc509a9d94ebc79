"""Decode's skinny projections (a few rows of x times a weight): a Triton
kernel on CUDA for up to ``MAX_ROWS`` rows of a 16-bit dtype, torch elsewhere.
The models reach it through ``model_registry.layers.project`` where
``preferred`` says so: by default (``STATEX_GEMV=auto``) for one row into an
output at most ``AUTO_MAX_N`` wide, the shapes where it beat cuBLAS on the H200
(``python -m kernels.gemv.bench``, docs/perf.md); ``STATEX_GEMV=1`` for every
input of at most ``MAX_ROWS`` rows, ``STATEX_GEMV=0`` never."""
from __future__ import annotations

import os

import torch

from kernels._dispatch import use_fast_path
from kernels.gemv import reference

MAX_ROWS = 8       # rows of x the kernel takes; above that the weight is reused enough for cuBLAS's GEMM tiles
AUTO_MAX_N = 4096  # the auto policy's widest output: wider ones tied or lost against cuBLAS


def preferred(rows: int, n_out: int) -> bool:
    """Whether a projection of ``rows`` rows into ``n_out`` outputs should take this kernel."""
    mode = os.environ.get("STATEX_GEMV") or "auto"
    if mode == "0":
        return False
    if mode == "1":
        return rows <= MAX_ROWS
    if mode != "auto":   # a typo must not measure the default while the user believes otherwise
        raise ValueError(f"STATEX_GEMV={mode!r}: expected auto, 0 or 1")
    return rows == 1 and n_out <= AUTO_MAX_N


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and use_fast_path(x, weight, bias)):
        from kernels.gemv import triton as fast

        return fast.gemv(x, weight, bias)
    return reference.gemv(x, weight, bias)


__all__ = ["AUTO_MAX_N", "MAX_ROWS", "gemv", "preferred", "reference"]
