"""Gated linear attention (fla-hub GLA) with per-layer head counts (StateX: merged heads).

Module and tensor names follow fla's ``GLAForCausalLM`` so fla checkpoints load
by name. The math is fla's ``GatedLinearAttention`` without the options the
fla-hub models do not use (short conv, feature maps, grouped kv heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

import kernels.gla as gla_ops
from model_registry.base import StateXPreTrainedModel
from model_registry.configs import StateXGLAConfig
from model_registry.compile import inference_compiled
from model_registry.layers import (
    HeadRMSNormSwishGate, RMSNorm, SwiGLUMLP, add_rms_norm, fuse_linear_weights_, init,
)
from model_registry.state import StateSpec

MIXER_XAVIER_GAIN = 2 ** -2.5     # fla GatedLinearAttention._initialize_weights


class GLAMixer(nn.Module):
    """One GLA token mixer. ``num_heads`` may differ per layer: every projection
    keeps its shape, only the head split (and the output-norm width) changes."""

    def __init__(self, config: StateXGLAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_k_dim, self.head_v_dim = config.head_dims(layer_idx)
        D, Kd, Vd = config.hidden_size, config.key_dim, config.value_dim
        self.scale = self.head_k_dim ** -0.5
        self.gate_logit_normalizer = config.gate_logit_normalizer
        self.clamp_min = config.clamp_min
        self.q_proj = nn.Linear(D, Kd, bias=False)
        self.k_proj = nn.Linear(D, Kd, bias=False)
        self.v_proj = nn.Linear(D, Vd, bias=False)
        self.g_proj = nn.Linear(D, Vd, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(D, config.gate_low_rank_dim, bias=False),
                                     nn.Linear(config.gate_low_rank_dim, Kd, bias=True))
        self.o_proj = nn.Linear(Vd, D, bias=False)
        self.g_norm_swish_gate = HeadRMSNormSwishGate(self.head_v_dim, eps=config.norm_eps)
        self._in_weight: torch.Tensor | None = None      # see fuse_projections_
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj, *self.gk_proj):
            lin.xavier_gain = MIXER_XAVIER_GAIN    # read by _init_weights: fla inits mixers apart

    def fuse_projections_(self) -> None:
        """For inference: q, k, v, g and the gate's first low-rank factor become one GEMM."""
        self._in_weight = fuse_linear_weights_([self.q_proj, self.k_proj, self.v_proj, self.g_proj,
                                                self.gk_proj[0]])

    def _project(self, x):
        """x [..., D] -> q, k, log-decay g [..., H, K]; v, output gate [..., H, V]."""
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        if self._in_weight is not None and not torch.is_grad_enabled():
            q, k, v, gate, gk = F.linear(x, self._in_weight).split(
                [H * K, H * K, H * V, H * V, self.gk_proj[0].out_features], dim=-1)
            gk = self.gk_proj[1](gk)
        else:
            q, k, v, gate, gk = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.g_proj(x), self.gk_proj(x)
        g = gla_log_decay(gk, self.gate_logit_normalizer, self.clamp_min)
        return (q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V)), g.unflatten(-1, (H, K)),
                gate.unflatten(-1, (H, V)))

    def _out(self, o, gate):
        return self.o_proj(self.g_norm_swish_gate(o, gate).flatten(-2))

    def forward(self, x, state=None):
        q, k, v, g, gate = self._project(x)
        o, final = gla_ops.gla_chunk(q, k, v, g, self.scale, state["recurrent"] if state is not None else None)
        return self._out(o, gate), {"recurrent": final}

    def prefill(self, x, pool, slots, cu_seqlens, has_initial_state):
        q, k, v, g, gate = self._project(x)
        o = gla_ops.gla_prefill(q, k, v, g, pool["recurrent"], slots, cu_seqlens, has_initial_state, self.scale)
        return self._out(o, gate)

    def decode(self, x, pool, slots):
        q, k, v, g, gate = self._project(x)
        o = gla_ops.gla_decode(q, k, v, g, pool["recurrent"], slots, self.scale)
        return self._out(o, gate)


@inference_compiled
def gla_log_decay(gk: torch.Tensor, normalizer: float, clamp_min: float | None) -> torch.Tensor:
    """The per-key log decay from the gate logits, in fp32 (fla: logsigmoid / 16)."""
    g = F.logsigmoid(gk.float()) / normalizer
    return g if clamp_min is None else g.clamp_min(clamp_min)


class GLABlock(GradientCheckpointingLayer):
    def __init__(self, config: StateXGLAConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GLAMixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def _mlp(self, h, y):
        """h + y, then the MLP sub-block (its pre-norm fused with the residual add)."""
        h, x = add_rms_norm(h, y, self.mlp_norm.weight, self.mlp_norm.eps)
        return h + self.mlp(x)

    def forward(self, h, state=None):
        y, final = self.attn(self.attn_norm(h), state)
        return self._mlp(h, y), final

    def prefill(self, h, pool, slots, cu_seqlens, has_initial_state):
        return self._mlp(h, self.attn.prefill(self.attn_norm(h), pool, slots, cu_seqlens, has_initial_state))

    def decode(self, h, pool, slots):
        return self._mlp(h, self.attn.decode(self.attn_norm(h), pool, slots))


class StateXGLAModel(nn.Module):
    def __init__(self, config: StateXGLAConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([GLABlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)


class StateXGLAForCausalLM(StateXPreTrainedModel):
    config_class = StateXGLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["GLABlock"]

    def __init__(self, config: StateXGLAConfig):
        super().__init__(config)
        self.model = StateXGLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def blocks(self):
        return self.model.layers

    @property
    def embeddings(self):
        return self.model.embeddings

    @property
    def final_norm(self):
        return self.model.norm

    def _init_weights(self, module):
        """fla's from-scratch init: mixer projections Xavier-uniform with gain 2^-2.5
        (GatedLinearAttention._initialize_weights), every other Linear and the
        embedding N(0, initializer_range); biases 0, norm weights 1."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            gain = getattr(module, "xavier_gain", None)
            if gain is not None:
                init.xavier_uniform_(module.weight, gain=gain)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, HeadRMSNormSwishGate)):
            init.ones_(module.weight)

    def state_spec(self, state_dtype: torch.dtype | None = None) -> StateSpec:
        return self.config.state_spec(state_dtype)
