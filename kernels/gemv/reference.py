"""The decode projections' reference: ``x @ weight.T (+ bias)``, as torch computes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[M, K]``, weight ``[N, K]``, bias ``[N]`` -> ``[M, N]`` in x's dtype."""
    return F.linear(x, weight, bias)
