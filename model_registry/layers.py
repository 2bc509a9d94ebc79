"""Building blocks shared by the two families (all math in fp32 where upstream does it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_registry.compile import inference_compiled

try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, what nn.Linear computes. Decode-sized inputs on
    CUDA outside autograd take ``kernels.gemv``'s kernel instead of cuBLAS where
    ``kernels.gemv.preferred`` says it is faster (by default one row into a
    narrow output, such as the projections back to the hidden size)."""
    if x.is_cuda and not torch.is_grad_enabled():
        from kernels import gemv as gemv_ops

        rows = x.numel() // x.shape[-1]
        if gemv_ops.preferred(rows, weight.shape[0]):
            y = gemv_ops.gemv(x.reshape(rows, x.shape[-1]), weight, bias)
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


# --- the math, as plain functions (compiled to one kernel each on CUDA inference) ---
@inference_compiled
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight in fp32, returned in x's dtype (fla RMSNorm, HF Mamba2RMSNorm)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)


@inference_compiled
def cast_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x rounded to weight's dtype first (Mamba2's pre-norm over an fp32 residual)."""
    return rms_norm.eager(x.to(weight.dtype), weight, eps)


@inference_compiled
def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual step and the next pre-norm together: ``h + y`` (in fp32 when
    ``residual_fp32``, else in h's dtype) and its RMSNorm in weight's dtype."""
    h = (h.float() if residual_fp32 else h) + y
    return h, rms_norm.eager(h.to(weight.dtype), weight, eps)


def deferred_residual_norm(h: torch.Tensor, y: torch.Tensor | None, norm: nn.Module, residual_fp32: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's pre-norm in decode, with the previous block's residual add
    deferred into it: (``h + y``, its RMSNorm) in one kernel, or for the first
    block (``y`` None) (``h``, its RMSNorm)."""
    if y is None:
        return h, cast_rms_norm(h, norm.weight, norm.eps)
    return add_rms_norm(h, y, norm.weight, norm.eps, residual_fp32)


@inference_compiled
def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
                   ) -> torch.Tensor:
    """Mamba2's gated norm: rmsnorm(x * silu(z)) * weight over groups of channels."""
    dtype = x.dtype
    x = x.float() * F.silu(z.float())
    shape = x.shape
    x = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x.reshape(shape)).to(dtype)


@inference_compiled
def head_rms_norm_swish_gate(o: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GLA's output norm: per head (last dim), rmsnorm(o) * weight * swish(g), in g's dtype."""
    dtype = g.dtype
    o = o.float()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (o * F.silu(g.float())).to(dtype)


@inference_compiled
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# --- modules ------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (fla RMSNorm, HF Mamba2RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba2's gated norm (norm_before_gate=False): rmsnorm(x * silu(z)) * weight,
    normalised over groups of ``group_size`` channels (mamba_ssm's RMSNormGated)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.group_size, self.eps)


class HeadRMSNormSwishGate(nn.Module):
    """GLA's output norm (fla FusedRMSNormGated): per head, rmsnorm(o) * weight * swish(g).
    ``hidden_size`` is the value dim of one head, so merging heads grows this weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return head_rms_norm_swish_gate(o, g, self.weight, self.eps)


class SwiGLUMLP(nn.Module):
    """fla's GatedMLP: down(swish(gate(x)) * up(x)). For inference
    ``fuse_projections_`` makes gate and up one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self._gate_up: torch.Tensor | None = None

    def fuse_projections_(self) -> None:
        self._gate_up = fuse_linear_weights_([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None and not torch.is_grad_enabled():
            gate, up = project(x, self._gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return project(swiglu(gate, up), self.down_proj.weight)


def fuse_linear_weights_(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenate bias-free Linear weights (same input) into one matrix and make
    each layer's weight a view of its rows: one GEMM reads them all at once (a
    single-token GEMM per small matrix reaches a fraction of the bandwidth a
    large one does, docs/perf.md), with no second copy of the weights. For
    inference: the views are no longer leaves of their own."""
    assert all(lin.bias is None for lin in linears)
    fused = torch.cat([lin.weight.detach() for lin in linears])
    offset = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[offset:offset + rows], requires_grad=False)
        offset += rows
    return fused


__all__ = ["GatedRMSNorm", "HeadRMSNormSwishGate", "RMSNorm", "SwiGLUMLP", "add_rms_norm", "cast_rms_norm",
           "deferred_residual_norm", "fuse_linear_weights_", "project",
           "gated_rms_norm", "head_rms_norm_swish_gate", "init", "rms_norm", "swiglu"]
