"""Building blocks shared by the two families (all math in fp32 where upstream does it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (fla RMSNorm, HF Mamba2RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's gated norm (norm_before_gate=False): rmsnorm(x * silu(z)) * weight,
    normalised over groups of ``group_size`` channels (mamba_ssm's RMSNormGated)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(z.float())
        shape = x.shape
        x = x.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x.reshape(shape)).to(dtype)


class HeadRMSNormSwishGate(nn.Module):
    """GLA's output norm (fla FusedRMSNormGated): per head, rmsnorm(o) * weight * swish(g).
    ``hidden_size`` is the value dim of one head, so merging heads grows this weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        dtype = g.dtype
        o = o.float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (o * F.silu(g.float())).to(dtype)


class SwiGLUMLP(nn.Module):
    """fla's GatedMLP: down(swish(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


__all__ = ["GatedRMSNorm", "HeadRMSNormSwishGate", "RMSNorm", "SwiGLUMLP", "init"]
