"""Mamba2 with per-layer d_state (StateX) as a vLLM model.

Same math and tensor names as ``model_registry.mamba2`` (the oracle; HF
``Mamba2ForCausalLM`` names), on vLLM's parallel layers.

Tensor parallelism: heads split over ranks (T must divide nheads). B and C
groups follow the heads: split when T divides n_groups, replicated when
n_groups divides T (n_groups = 1: every rank keeps the whole B, C). Each
rank's conv window holds its own x channels plus its groups' B, C channels;
the ssm state is ``[H/T, P, N_l]``. The gated RMSNorm all-reduces its sum of
squares when a norm group spans ranks (e.g. HF-imported checkpoints normalise
over all of d_inner).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

import kernels.conv as conv_ops
import kernels.mamba2 as ssd_ops
from model_registry.configs import StateXMamba2Config
from model_registry.layers import RMSNorm, gated_rms_norm
from model_registry.vllm_models.common import (StateMixer, StateXBackbone, StateXForCausalLM, reduce_norm_sq,
                                               rows_loader, set_loader, state_dtypes)
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.sequence import IntermediateTensors


@dataclass(frozen=True)
class Mamba2Shard:
    """One layer's slice on one TP rank."""

    heads: int          # local heads
    head0: int          # first global head
    head_dim: int
    groups: int         # local B/C groups
    group0: int         # first global group
    state_size: int     # N of this layer
    inner: int          # local d_inner (heads * head_dim)
    conv_dim: int       # local conv channels: inner + 2 * groups * N
    norm_group: int     # norm group (of d_inner) this rank's channels belong to, when reduced
    norm_groups: int    # number of norm groups when reduced across ranks; 0: norm is local
    norm_group_size: int


def mamba2_shard(config: StateXMamba2Config, layer: int, rank: int, tp: int) -> Mamba2Shard:
    H, P, G = config.num_heads, config.head_dim, config.n_groups
    N = config.layer_state_size[layer]
    if H % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide num_heads={H}")
    if G % tp and tp % G:
        raise ValueError(f"n_groups={G} and tensor_parallel_size={tp}: one must divide the other")
    h = H // tp
    h0 = rank * h
    hpg = H // G
    g0, g1 = h0 // hpg, (h0 + h - 1) // hpg + 1
    inner = h * P
    I = config.intermediate_size
    gs = config.norm_group_size
    if inner % gs == 0:
        ng, grp = 0, 0
    elif gs % inner == 0:
        ng, grp = I // gs, h0 * P // gs
    else:
        raise ValueError(f"norm_group_size={gs} and the per-rank d_inner {inner} do not nest")
    return Mamba2Shard(h, h0, P, g1 - g0, g0, N, inner, inner + 2 * (g1 - g0) * N, grp, ng, gs)


def mamba2_state_tensors(vllm_config: VllmConfig, layers: Iterable[int], rank: int, tp: int):
    config: StateXMamba2Config = vllm_config.model_config.hf_config
    sdt, cdt = state_dtypes(vllm_config)
    out = {}
    for i in layers:
        s = mamba2_shard(config, i, rank, tp)
        out[i] = [("conv", (s.conv_dim, config.conv_kernel - 1), cdt),
                  ("ssm", (s.heads, s.head_dim, s.state_size), sdt)]
    return out


class Mamba2GatedNorm(nn.Module):
    """rmsnorm(y * silu(z)) * weight over groups of ``norm_group_size`` channels
    (mamba_ssm's RMSNormGated, norm_before_gate=False)."""

    def __init__(self, s: Mamba2Shard, eps: float):
        super().__init__()
        self.s = s
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(s.inner), requires_grad=False)
        set_loader(self.weight, rows_loader([(s.head0 * s.head_dim, s.inner)]))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.s.norm_groups == 0:
            # groups inside this rank: the oracle's function (GatedRMSNorm), eager as
            # everything inside the state op
            return gated_rms_norm.eager(x, z, self.weight, self.s.norm_group_size, self.eps)
        dtype = x.dtype
        x = x.float() * torch.nn.functional.silu(z.float())
        sq = reduce_norm_sq(x.pow(2).sum(-1), self.s.norm_group, self.s.norm_groups)
        x = x * torch.rsqrt(sq / self.s.norm_group_size + self.eps)[..., None]
        return (self.weight.float() * x).to(dtype)


class Mamba2Mixer(StateMixer):
    def __init__(self, config: StateXMamba2Config, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__(layer_idx, prefix)
        tp = get_tensor_model_parallel_world_size()
        s = self.s = mamba2_shard(config, layer_idx, get_tensor_model_parallel_rank(), tp)
        P, G, N = config.head_dim, config.n_groups, s.state_size
        I, conv_dim = config.intermediate_size, config.conv_dim(layer_idx)
        W = config.conv_kernel
        self.activation = config.hidden_act
        self.dt_limit = tuple(config.time_step_limit)
        quant = vllm_config.quant_config
        # rows of this rank in the checkpoint's xBC (x | B | C) and in_proj (z | xBC | dt)
        xbc_rows = [(s.head0 * P, s.inner), (I + s.group0 * N, s.groups * N), (I + G * N + s.group0 * N, s.groups * N)]
        in_rows = ([(s.head0 * P, s.inner)] + [(I + a, n) for a, n in xbc_rows] + [(I + conv_dim + s.head0, s.heads)])
        local_in = s.inner + s.conv_dim + s.heads
        self.in_proj = ColumnParallelLinear(config.hidden_size, local_in * tp, bias=config.use_bias,
                                            quant_config=quant, return_bias=False, prefix=f"{prefix}.in_proj")
        set_loader(self.in_proj.weight, rows_loader(in_rows))
        if config.use_bias:
            set_loader(self.in_proj.bias, rows_loader(in_rows))
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(s.conv_dim, W), requires_grad=False)
        set_loader(self.conv1d.weight, rows_loader(xbc_rows, transform=lambda w: w.reshape(w.shape[0], -1)))
        if config.use_conv_bias:
            self.conv1d.bias = nn.Parameter(torch.empty(s.conv_dim), requires_grad=False)
            set_loader(self.conv1d.bias, rows_loader(xbc_rows))
        else:
            self.conv1d.bias = None
        heads = [(s.head0, s.heads)]
        self.A_log = nn.Parameter(torch.empty(s.heads, dtype=torch.float32), requires_grad=False)
        self.D = nn.Parameter(torch.empty(s.heads), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(s.heads), requires_grad=False)
        for p in (self.A_log, self.D, self.dt_bias):
            set_loader(p, rows_loader(heads))
        self.norm = Mamba2GatedNorm(s, config.layer_norm_epsilon)
        self.out_proj = RowParallelLinear(I, config.hidden_size, bias=config.use_bias, input_is_parallel=True,
                                          quant_config=quant, return_bias=False, prefix=f"{prefix}.out_proj")

    def forward_impl(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """The mixer inside the custom op: this step's decodes and prefills into ``output``."""
        split = self.step()
        n = hidden_states.shape[0] if split is None else split.num_actual_tokens
        s = self.s
        z, xbc, dt = torch.split(self.in_proj(hidden_states[:n]), [s.inner, s.conv_dim, s.heads], dim=-1)
        w, b = self.conv1d.weight, self.conv1d.bias
        A, D, dt_bias = -torch.exp(self.A_log.float()), self.D, self.dt_bias
        y = torch.zeros(n, s.heads, s.head_dim, dtype=xbc.dtype, device=xbc.device)
        if split is not None:
            conv_pool = self.state_page.pool(self.layer_idx, "conv")
            ssm_pool = self.state_page.pool(self.layer_idx, "ssm")
            nd = split.num_decodes
            xbc_out = torch.empty_like(xbc)
            if nd:
                xbc_out[:nd] = conv_ops.conv_decode(xbc[:nd], conv_pool, split.slots_d, w, b, self.activation)
            if split.num_prefills:
                xbc_out[nd:] = conv_ops.conv_prefill(xbc[nd:], conv_pool, split.slots_p, split.cu_seqlens_p,
                                                     split.has_initial_state_p, w, b, self.activation)
            xs, B, C = torch.split(xbc_out, [s.inner, s.groups * s.state_size, s.groups * s.state_size], dim=-1)
            xs = xs.unflatten(-1, (s.heads, s.head_dim))
            B = B.unflatten(-1, (s.groups, s.state_size))
            C = C.unflatten(-1, (s.groups, s.state_size))
            if nd:
                y[:nd] = ssd_ops.ssd_decode(xs[:nd], dt[:nd], A, B[:nd], C[:nd], D, dt_bias, self.dt_limit,
                                            ssm_pool, split.slots_d)
            if split.num_prefills:
                y[nd:] = ssd_ops.ssd_prefill(xs[nd:], dt[nd:], A, B[nd:], C[nd:], D, dt_bias, self.dt_limit,
                                             ssm_pool, split.slots_p, split.cu_seqlens_p, split.has_initial_state_p)
        output[:n] = self.out_proj(self.norm(y.flatten(-2), z))
        output[n:] = 0


class Mamba2Block(nn.Module):
    def __init__(self, config: StateXMamba2Config, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(config, vllm_config, layer_idx, f"{prefix}.mixer")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.mixer(self.norm(h.to(self.norm.weight.dtype)))
        # the residual stream stays fp32 with residual_in_fp32 (transformers / mamba_ssm)
        return (h.float() if self.residual_in_fp32 else h) + y


class StateXMamba2Model(StateXBackbone):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        # our config class: validate_statex has already refused rms_norm=False and other activations
        config: StateXMamba2Config = vllm_config.model_config.hf_config
        self.config = config
        self.model_dtype = vllm_config.model_config.dtype
        pp = get_pp_group()
        self.embeddings = (VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                  prefix=f"{prefix}.embeddings")
                           if pp.is_first_rank or config.tie_word_embeddings else PPMissingLayer())
        self.build_layers(vllm_config, prefix, config.num_hidden_layers,
                          lambda i, prefix: Mamba2Block(config, vllm_config, i, prefix), "mixer", mamba2_state_tensors)
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon) if pp.is_last_rank else PPMissingLayer()

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype, device: torch.device):
        # between pipeline stages the residual stream travels in fp32 (residual_in_fp32)
        dt = torch.float32 if self.config.residual_in_fp32 else dtype
        return IntermediateTensors({"hidden_states": torch.zeros(batch_size, self.config.hidden_size, dtype=dt,
                                                                 device=device)})

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        # the oracle feeds lm_head in its weight dtype
        return self.norm_f(h).to(self.model_dtype)


class StateXMamba2ForCausalLM(StateXForCausalLM):
    backbone_cls = StateXMamba2Model
    backbone_name = "backbone"
    state_tensors = staticmethod(mamba2_state_tensors)
