"""GLA (fla-hub layout, per-layer head counts) as a vLLM model.

Same math and tensor names as ``model_registry.gla`` (the oracle), on vLLM's
parallel layers. Serves our ``statex_gla`` checkpoints and unexpanded fla-hub
``gla`` checkpoints (``GLAForCausalLM``).

Tensor parallelism per layer with H heads on T ranks:
- T divides H: each rank holds H/T whole heads (state [H/T, K, V]);
- H divides T (a merged StateX head, H = 1): each head is split along V over
  T/H ranks (state [1, K, V*H/T]); q/k/gate projections of the head are
  replicated on those ranks and the per-head output norm all-reduces its sum of
  squares (``reduce_norm_sq``).

With ``use_short_conv`` (fla's depthwise q/k/v convs) each rank convolves exactly
the q, k and v channels its projections produce (the conv is per channel), as
one ``kernels.conv`` call over its q|k|v; its window is the state ``conv``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels.conv as conv_ops
import kernels.gla as gla_ops
from model_registry.configs import StateXGLAConfig
from model_registry.layers import RMSNorm, head_rms_norm_swish_gate, swiglu
from model_registry.vllm_models.common import (StateMixer, StateXBackbone, StateXForCausalLM, reduce_norm_sq,
                                               rows_loader, set_loader, state_dtypes)
from model_registry.vllm_plugin import FlaGLAConfig
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.utils import PPMissingLayer, WeightsMapper, make_empty_intermediate_tensors_factory

# --- the config -------------------------------------------------------------------------------


def gla_config(hf_config) -> StateXGLAConfig:
    """vLLM's ``hf_config`` as our config class: itself for ``statex_gla`` and for
    fla-hub's ``gla`` read by ``FlaGLAConfig``; fla's own ``GLAConfig`` (when fla
    registered ``gla`` after the plugin) is read again with ``FlaGLAConfig``."""
    config = hf_config if isinstance(hf_config, StateXGLAConfig) else FlaGLAConfig.from_dict(hf_config.to_dict())
    # what our config allows (checked in validate_statex) but this model does not run
    bad = {
        "attn (hybrid softmax-attention layers)": getattr(config, "attn", None),   # fla's field, not ours
        "use_gk=False": not config.use_gk,
        "use_gv=True": config.use_gv,
        "elementwise_affine=False": config.elementwise_affine is False,
    }
    bad = [k for k, v in bad.items() if v]
    if bad:
        raise ValueError(f"GLA options not supported by the StateX vLLM model: {', '.join(bad)}")
    return config


@dataclass(frozen=True)
class GLAShard:
    """How one layer's heads sit on one TP rank."""

    heads: int          # H of the layer
    head_k: int         # K per head
    head_v: int         # V per head
    local_heads: int
    local_v: int        # V per local head on this rank
    head_rank: int      # which block of heads (key projections shard by head blocks)
    head_ranks: int     # number of head blocks
    v_offset: int       # offset of this rank's V slice inside its head (split heads)
    split: int          # ranks sharing one head (1: whole heads)
    v_row0: int         # this rank's first row of v_proj (v is sharded over all ranks)

    @property
    def qk_row0(self) -> int:
        """This rank's first row of q_proj / k_proj (sharded by head blocks)."""
        return self.head_rank * self.local_heads * self.head_k

    @property
    def conv_dim(self) -> int:
        """This rank's short-conv channels: its q | k | v."""
        return self.local_heads * (2 * self.head_k + self.local_v)


def gla_shard(config: StateXGLAConfig, layer: int, rank: int, tp: int) -> GLAShard:
    H, K, V = config.head_dims(layer)
    if H % tp == 0:
        return GLAShard(H, K, V, H // tp, V, rank, tp, 0, 1, rank * (H // tp) * V)
    if tp % H == 0:
        b = tp // H
        if V % b:
            raise ValueError(f"layer {layer}: head value dim {V} does not split over {b} ranks")
        return GLAShard(H, K, V, 1, V // b, rank // b, H, (rank % b) * (V // b), b, rank * (V // b))
    raise ValueError(f"layer {layer}: {H} heads cannot be split over tensor_parallel_size={tp} "
                     "(one must divide the other)")


def gla_state_tensors(vllm_config: VllmConfig, layers: Iterable[int], rank: int, tp: int):
    config = gla_config(vllm_config.model_config.hf_config)
    sdt, cdt = state_dtypes(vllm_config)
    out = {}
    for i in layers:
        s = gla_shard(config, i, rank, tp)
        conv = [("conv", (s.conv_dim, config.conv_size - 1), cdt)] if config.use_short_conv else []
        out[i] = [*conv, ("recurrent", (s.local_heads, s.head_k, s.local_v), sdt)]
    return out


# --- layers ---------------------------------------------------------------------------------


class GLAOutputNorm(nn.Module):
    """fla's FusedRMSNormGated per head: rmsnorm(o) * weight * swish(g). With a
    head split over ranks (V sliced), the sum of squares is all-reduced."""

    def __init__(self, shard: GLAShard, eps: float):
        super().__init__()
        self.shard = shard
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shard.local_v), requires_grad=False)
        set_loader(self.weight, rows_loader([(shard.v_offset, shard.local_v)]))

    def forward(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.shard.split == 1:
            # whole heads: the oracle's function (HeadRMSNormSwishGate), eager as
            # everything inside the state op
            return head_rms_norm_swish_gate.eager(o, g, self.weight, self.eps)
        dtype = g.dtype
        o = o.float()
        sq = reduce_norm_sq(o.pow(2).sum(-1), self.shard.head_rank, self.shard.head_ranks)
        o = o * torch.rsqrt(sq / self.shard.head_v + self.eps)[..., None] * self.weight.float()
        return (o * F.silu(g.float())).to(dtype)


class GLAMixer(StateMixer):
    def __init__(self, config: StateXGLAConfig, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__(layer_idx, prefix)
        s = self.shard = gla_shard(config, layer_idx, get_tensor_model_parallel_rank(),
                                   get_tensor_model_parallel_world_size())
        D, Kd, Vd = config.hidden_size, config.layer_key_dim[layer_idx], config.value_dim
        quant = vllm_config.quant_config
        self.scale = config.attn_scale(layer_idx)
        self.gate_logit_normalizer = config.gate_logit_normalizer
        low_rank = config.gate_low_rank_dim
        self.clamp_min = config.clamp_min
        kw = dict(bias=False, quant_config=quant, return_bias=False)
        # key-dim projections shard by head blocks (replicated across a split head's ranks)
        self.q_proj = ColumnParallelLinear(D, Kd, tp_rank=s.head_rank, tp_size=s.head_ranks,
                                           prefix=f"{prefix}.q_proj", **kw)
        self.k_proj = ColumnParallelLinear(D, Kd, tp_rank=s.head_rank, tp_size=s.head_ranks,
                                           prefix=f"{prefix}.k_proj", **kw)
        self.v_proj = ColumnParallelLinear(D, Vd, prefix=f"{prefix}.v_proj", **kw)
        self.g_proj = ColumnParallelLinear(D, Vd, prefix=f"{prefix}.g_proj", **kw)
        self.gk_proj = nn.ModuleList([
            ReplicatedLinear(D, low_rank, bias=False, quant_config=None, return_bias=False,
                             prefix=f"{prefix}.gk_proj.0"),
            ColumnParallelLinear(low_rank, Kd, bias=True, quant_config=None, return_bias=False,
                                 tp_rank=s.head_rank, tp_size=s.head_ranks, prefix=f"{prefix}.gk_proj.1"),
        ])
        self.o_proj = RowParallelLinear(Vd, D, bias=False, input_is_parallel=True, quant_config=quant,
                                        return_bias=False, prefix=f"{prefix}.o_proj")
        self.g_norm_swish_gate = GLAOutputNorm(s, config.norm_eps)
        self.use_short_conv = config.use_short_conv
        if self.use_short_conv:   # fla's q_conv1d / k_conv1d / v_conv1d.weight [C, 1, W], this rank's rows
            # one [q | k | v, W] tensor, what the conv kernels read; the three weights load into row views of it
            self.conv_weight = torch.empty(s.conv_dim, config.conv_size)
            qk_rows = [(s.qk_row0, s.local_heads * s.head_k)]
            row = 0
            for name, rows in (("q_conv1d", qk_rows), ("k_conv1d", qk_rows),
                               ("v_conv1d", [(s.v_row0, s.local_heads * s.local_v)])):
                conv = nn.Module()
                conv.weight = nn.Parameter(self.conv_weight[row:row + rows[0][1]], requires_grad=False)
                set_loader(conv.weight, rows_loader(rows, transform=lambda w: w.reshape(w.shape[0], -1)))
                setattr(self, name, conv)
                row += rows[0][1]

    def _short_conv(self, q, k, v, split):
        """silu(causal depthwise conv) over this rank's q | k | v, windows in the page."""
        qkv = torch.cat([q, k, v], dim=-1)
        w = self.conv_weight
        out = torch.zeros_like(qkv)
        if split is not None:
            pool = self.state_page.pool(self.layer_idx, "conv")
            nd = split.num_decodes
            if nd:
                out[:nd] = conv_ops.conv_decode(qkv[:nd], pool, split.slots_d, w, None, "silu")
            if split.num_prefills:
                out[nd:] = conv_ops.conv_prefill(qkv[nd:], pool, split.slots_p, split.cu_seqlens_p,
                                                 split.has_initial_state_p, w, None, "silu")
        return out.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)

    def forward_impl(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        split = self.step()
        n = hidden_states.shape[0] if split is None else split.num_actual_tokens
        x = hidden_states[:n]
        s = self.shard
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = self._short_conv(q, k, v, split)
        q = q.reshape(n, s.local_heads, s.head_k)
        k = k.reshape(n, s.local_heads, s.head_k)
        v = v.reshape(n, s.local_heads, s.local_v)
        g = F.logsigmoid(self.gk_proj[1](self.gk_proj[0](x)).float()) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = g.clamp_min(self.clamp_min)
        g = g.view(n, s.local_heads, s.head_k)
        o = torch.zeros_like(v)
        if split is not None:
            pool = self.state_page.pool(self.layer_idx, "recurrent")
            nd = split.num_decodes
            if nd:
                o[:nd] = gla_ops.gla_decode(q[:nd], k[:nd], v[:nd], g[:nd], pool, split.slots_d, self.scale)
            if split.num_prefills:
                o[nd:] = gla_ops.gla_prefill(q[nd:], k[nd:], v[nd:], g[nd:], pool, split.slots_p,
                                             split.cu_seqlens_p, split.has_initial_state_p, self.scale)
        gate = self.g_proj(x).view(n, s.local_heads, s.local_v)
        output[:n] = self.o_proj(self.g_norm_swish_gate(o, gate).flatten(-2))
        output[n:] = 0


class GLAMLP(nn.Module):
    """fla's GatedMLP: down(swish(gate(x)) * up(x)); gate and up in one GEMM. The
    oracle's functions run eager here, so vLLM's own compile (or none) decides."""

    def __init__(self, config: StateXGLAConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        D, inter = config.hidden_size, config.intermediate_size
        quant = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(D, [inter, inter], bias=False, quant_config=quant,
                                                       return_bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, D, bias=False, quant_config=quant, return_bias=False,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(swiglu.eager(gate, up))


class GLABlock(nn.Module):
    def __init__(self, config: StateXGLAConfig, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GLAMixer(config, vllm_config, layer_idx, f"{prefix}.attn")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GLAMLP(config, vllm_config, f"{prefix}.mlp")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))


class StateXGLAModel(StateXBackbone):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = gla_config(vllm_config.model_config.hf_config)
        self.config = config
        pp = get_pp_group()
        if pp.is_first_rank:
            self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                     prefix=f"{prefix}.embeddings")
        else:
            self.embeddings = PPMissingLayer()
        self.build_layers(vllm_config, prefix, config.num_hidden_layers,
                          lambda i, prefix: GLABlock(config, vllm_config, i, prefix), "attn", gla_state_tensors)
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(["hidden_states"],
                                                                                       config.hidden_size)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class StateXGLAForCausalLM(StateXForCausalLM):
    backbone_cls = StateXGLAModel
    backbone_name = "model"
    state_tensors = staticmethod(gla_state_tensors)
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={".attn.g_norm.": ".attn.g_norm_swish_gate."},   # fla's unfused variant's name
        orig_to_new_stacked={".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)},
    )


class GLAForCausalLM(StateXGLAForCausalLM):
    """fla-hub's architecture name: an unexpanded GLA checkpoint, same weights."""
