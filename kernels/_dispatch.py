"""Choosing between a Triton kernel and its torch reference."""
from __future__ import annotations

import os

import torch


def use_fast_path(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on CUDA and the reference is not forced."""
    if os.environ.get("STATEX_KERNELS", "auto") == "reference":
        return False
    return all(t.is_cuda for t in tensors if t is not None)
