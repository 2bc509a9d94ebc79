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
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels.gla as gla_ops
from model_registry.layers import RMSNorm
from model_registry.vllm_models.common import (StateMixer, build_state_pages, config_state_shapes, default_loader,
                                               mamba_state_copy_funcs, reduce_norm_sq, set_loader, state_dtypes)
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import (HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching,
                                                   SupportsPP)
from vllm.model_executor.models.utils import (PPMissingLayer, extract_layer_index, is_pp_missing_parameter,
                                              make_empty_intermediate_tensors_factory, make_layers, maybe_prefix)
from vllm.sequence import IntermediateTensors

# --- config access that works for our StateXGLAConfig and fla's GLAConfig ------------------


def check_gla_config(config) -> None:
    bad = {
        "attn (hybrid softmax-attention layers)": getattr(config, "attn", None),
        "use_short_conv": getattr(config, "use_short_conv", False),
        "feature_map": getattr(config, "feature_map", None),
        "use_output_gate=False": not getattr(config, "use_output_gate", True),
        "num_kv_heads != num_heads": getattr(config, "num_kv_heads", None) not in (None, config.num_heads),
        "hidden_act": getattr(config, "hidden_act", "swish") not in ("swish", "silu"),
        "use_gk=False": not getattr(config, "use_gk", True),
        "use_gv=True": getattr(config, "use_gv", False),
        "elementwise_affine=False": getattr(config, "elementwise_affine", True) is False,
    }
    bad = [k for k, v in bad.items() if v]
    if bad:
        raise ValueError(f"GLA options not supported by the StateX vLLM model: {', '.join(bad)}")


def layer_heads(config) -> list[int]:
    heads = getattr(config, "layer_num_heads", None)
    return list(heads) if heads else [config.num_heads] * config.num_hidden_layers


def key_value_dims(config) -> tuple[int, int]:
    return int(round(config.hidden_size * config.expand_k)), int(round(config.hidden_size * config.expand_v))


def mlp_dim(config) -> int:
    if getattr(config, "intermediate_size", None):
        return config.intermediate_size
    inter = int(config.hidden_size * (getattr(config, "hidden_ratio", None) or 4) * 2 / 3)
    return 256 * ((inter + 255) // 256)


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


def gla_shard(config, layer: int, rank: int, tp: int) -> GLAShard:
    H = layer_heads(config)[layer]
    Kd, Vd = key_value_dims(config)
    K, V = Kd // H, Vd // H
    if H % tp == 0:
        return GLAShard(H, K, V, H // tp, V, rank, tp, 0, 1)
    if tp % H == 0:
        b = tp // H
        if V % b:
            raise ValueError(f"layer {layer}: head value dim {V} does not split over {b} ranks")
        return GLAShard(H, K, V, 1, V // b, rank // b, H, (rank % b) * (V // b), b)
    raise ValueError(f"layer {layer}: {H} heads cannot be split over tensor_parallel_size={tp} "
                     "(one must divide the other)")


def gla_state_tensors(config, vllm_config: VllmConfig, layers: Iterable[int], rank: int, tp: int):
    sdt, _ = state_dtypes(vllm_config)
    out = {}
    for i in layers:
        s = gla_shard(config, i, rank, tp)
        out[i] = [("recurrent", (s.local_heads, s.head_k, s.local_v), sdt)]
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
        set_loader(self.weight, lambda p, w: default_loader(p, w.narrow(0, shard.v_offset, shard.local_v)))

    def forward(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.shard.split == 1:      # whole heads: exactly the oracle's ops (HeadRMSNormSwishGate)
            dtype = g.dtype
            o = o.float()
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
            return (o * F.silu(g.float())).to(dtype)
        dtype = g.dtype
        o = o.float()
        sq = reduce_norm_sq(o.pow(2).sum(-1), self.shard.head_rank, self.shard.head_ranks)
        o = o * torch.rsqrt(sq / self.shard.head_v + self.eps)[..., None] * self.weight.float()
        return (o * F.silu(g.float())).to(dtype)


class GLAMixer(StateMixer):
    def __init__(self, config, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__(layer_idx, prefix)
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        s = self.shard = gla_shard(config, layer_idx, rank, tp)
        D = config.hidden_size
        Kd, Vd = key_value_dims(config)
        quant = vllm_config.quant_config
        self.scale = s.head_k ** -0.5
        # fla's GLAConfig has neither field; fla's layer defaults both to 16 (so does ours)
        self.gate_logit_normalizer = getattr(config, "gate_logit_normalizer", 16)
        low_rank = getattr(config, "gate_low_rank_dim", 16)
        self.clamp_min = getattr(config, "clamp_min", None)
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

    def forward_impl(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        split = self.step()
        n = hidden_states.shape[0] if split is None else split.num_actual_tokens
        x = hidden_states[:n]
        s = self.shard
        q = self.q_proj(x).view(n, s.local_heads, s.head_k)
        k = self.k_proj(x).view(n, s.local_heads, s.head_k)
        v = self.v_proj(x).view(n, s.local_heads, s.local_v)
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
    """fla's GatedMLP: down(swish(gate(x)) * up(x)); gate and up in one GEMM."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        D, inter = config.hidden_size, mlp_dim(config)
        quant = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(D, [inter, inter], bias=False, quant_config=quant,
                                                       return_bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, D, bias=False, quant_config=quant, return_bias=False,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class GLABlock(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GLAMixer(config, vllm_config, layer_idx, f"{prefix}.attn")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GLAMLP(config, vllm_config, f"{prefix}.mlp")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))


class StateXGLAModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_gla_config(config)
        self.config = config
        pp = get_pp_group()
        if pp.is_first_rank:
            self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                     prefix=f"{prefix}.embeddings")
        else:
            self.embeddings = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: GLABlock(config, vllm_config, extract_layer_index(prefix), prefix),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps) if pp.is_last_rank else PPMissingLayer()
        local = range(self.start_layer, self.end_layer)
        tensors = gla_state_tensors(config, vllm_config, local, get_tensor_model_parallel_rank(),
                                    get_tensor_model_parallel_world_size())
        self.state_pages = build_state_pages(self, {i: self.layers[i].attn for i in local}, tensors,
                                             f"{prefix}.layers")
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(["hidden_states"],
                                                                                       config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            h = intermediate_tensors["hidden_states"]
        for i in range(self.start_layer, self.end_layer):
            h = self.layers[i](h)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": h})
        return self.norm(h)


class StateXGLAForCausalLM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching, SupportsPP):
    # -- state description (must agree with what the layers allocate) --
    @classmethod
    def _state_tensors(cls, vllm_config: VllmConfig):
        config = vllm_config.model_config.hf_config
        tp = vllm_config.parallel_config.tensor_parallel_size
        return gla_state_tensors(config, vllm_config, range(config.num_hidden_layers), 0, tp)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return config_state_shapes(cls._state_tensors(vllm_config))[0]

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return config_state_shapes(cls._state_tensors(vllm_config))[1]

    @classmethod
    def get_mamba_state_copy_func(cls):
        return mamba_state_copy_funcs()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = StateXGLAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embeddings)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        stacked = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            # fla's unfused variant names the output norm `g_norm`
            name = name.replace(".attn.g_norm.", ".attn.g_norm_swish_gate.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for param_name, shard_name, shard_id in stacked:
                if f".{shard_name}." not in name:
                    continue
                name = name.replace(shard_name, param_name)
                if is_pp_missing_parameter(name, self):
                    break
                param = params[name]
                param.weight_loader(param, w, shard_id)
                loaded.add(name)
                break
            else:
                if is_pp_missing_parameter(name, self):
                    continue
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name} has no parameter in {type(self).__name__}")
                param = params[name]
                getattr(param, "weight_loader", default_loader)(param, w)
                loaded.add(name)
        return loaded


class GLAForCausalLM(StateXGLAForCausalLM):
    """fla-hub's architecture name: an unexpanded GLA checkpoint, same weights."""
