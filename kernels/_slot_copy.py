"""Gather states out of a pool by slot and scatter them back, without host syncs.

Used around library prefill kernels (fla ``chunk_gla``, mamba-ssm's chunk scan)
that take and return dense per-sequence states. A slot of -1 is skipped; a row
whose ``use`` flag is False gathers zeros (its pool row is not read).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _gather_kernel(pool, slots, use, out, numel, s_slot, BLOCK: tl.constexpr):
    i_n = tl.program_id(0)
    i_b = tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    take = tl.load(use + i_n).to(tl.int32) * (slot >= 0).to(tl.int32)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    m_read = m & ((offs * 0 + take) != 0)
    x = tl.load(pool + slot * s_slot + offs, mask=m_read, other=0.0).to(tl.float32)
    tl.store(out + i_n.to(tl.int64) * numel + offs, x, mask=m)


@triton.jit
def _scatter_kernel(src, slots, pool, numel, s_slot, BLOCK: tl.constexpr):
    i_n = tl.program_id(0)
    i_b = tl.program_id(1)
    slot = tl.load(slots + i_n).to(tl.int64)
    if slot < 0:
        return
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(src + i_n.to(tl.int64) * numel + offs, mask=m, other=0.0)
    tl.store(pool + slot * s_slot + offs, x.to(pool.dtype.element_ty), mask=m)


def _rows_contiguous(pool: torch.Tensor) -> bool:
    return pool[0].is_contiguous() if pool.shape[0] > 0 else True


def gather_states(pool: torch.Tensor, slots: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """fp32 [len(slots), *pool.shape[1:]]: pool[slot] where use and slot >= 0, else 0."""
    n = slots.numel()
    out = torch.empty((n, *pool.shape[1:]), dtype=torch.float32, device=pool.device)
    if n == 0:
        return out
    if not _rows_contiguous(pool):   # e.g. a strided sub-state view: plain torch
        h = pool.index_select(0, slots.to(torch.long).clamp_min(0)).to(torch.float32)
        keep = (use.to(torch.bool) & (slots >= 0)).view(n, *([1] * (pool.dim() - 1)))
        return torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device))
    numel = out[0].numel()
    _gather_kernel[(n, triton.cdiv(numel, BLOCK))](
        pool, slots, use.to(torch.int8), out, numel, pool.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


def scatter_states(src: torch.Tensor, slots: torch.Tensor, pool: torch.Tensor) -> None:
    """pool[slot] = src[i] (cast to the pool's dtype) for every slot >= 0."""
    n = slots.numel()
    if n == 0:
        return
    src = src.contiguous()
    if not _rows_contiguous(pool):
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                pool[s] = src[i].to(pool.dtype)
        return
    numel = src[0].numel()
    _scatter_kernel[(n, triton.cdiv(numel, BLOCK))](
        src, slots, pool, numel, pool.stride(0), BLOCK=BLOCK, num_warps=4)
