"""Gated linear attention (fla-hub GLA) with per-layer head counts (StateX: merged heads).

Module and tensor names follow fla's ``GLAForCausalLM`` so fla checkpoints load
by name. The math is fla's ``GatedLinearAttention`` without the options the
fla-hub models do not use (feature maps, grouped kv heads). fla's optional short
conv (``use_short_conv``: q, k and v each through a depthwise causal conv + SiLU
right after their projections) runs as one conv over q|k|v (``kernels.conv``,
Mamba2's), its window kept per sequence as the state ``conv``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

import kernels.conv as conv_ops
import kernels.gla as gla_ops
from model_registry.base import StateXPreTrainedModel
from model_registry.configs import StateXGLAConfig
from model_registry.compile import inference_compiled
from model_registry.layers import (
    HeadRMSNormSwishGate, RMSNorm, SwiGLUMLP, add_rms_norm, deferred_residual_norm, fuse_linear_weights_, init,
    project,
)
from model_registry.state import StateSpec

MIXER_XAVIER_GAIN = 2 ** -2.5     # fla GatedLinearAttention._initialize_weights


def _fused_gate_max_rows() -> int:
    value = os.environ.get("STATEX_GLA_FUSED_GATE_ROWS", "8")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"STATEX_GLA_FUSED_GATE_ROWS must be a whole number of rows, not {value!r}") from None


# Decode batches of at most this many rows compute the low-rank gate's second
# projection inside the log decay's kernel (gla_log_decay_low_rank); larger ones
# through a GEMM (faster at 64 and 256 rows on the H200, docs/perf.md item 11).
# STATEX_GLA_FUSED_GATE_ROWS overrides it (for measuring).
FUSED_GATE_MAX_ROWS = _fused_gate_max_rows()


class GLAMixer(nn.Module):
    """One GLA token mixer. ``num_heads`` may differ per layer (StateX's head merge: every
    projection keeps its shape, only the head split and the output-norm width change), and
    so may the key width (the `preserve` expansion: q, k, the decay gate and their convs grow)."""

    def __init__(self, config: StateXGLAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_k_dim, self.head_v_dim = config.head_dims(layer_idx)
        D, Kd, Vd = config.hidden_size, config.layer_key_dim[layer_idx], config.value_dim
        self.scale = config.attn_scale(layer_idx)
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
        self.use_short_conv = config.use_short_conv
        if self.use_short_conv:   # fla's ShortConvolution: an nn.Conv1d, no bias (fla's GLA never sets conv_bias)
            W = config.conv_size
            self.q_conv1d = nn.Conv1d(Kd, Kd, W, groups=Kd, padding=W - 1, bias=False)
            self.k_conv1d = nn.Conv1d(Kd, Kd, W, groups=Kd, padding=W - 1, bias=False)
            self.v_conv1d = nn.Conv1d(Vd, Vd, W, groups=Vd, padding=W - 1, bias=False)
        self._in_weight: torch.Tensor | None = None      # see fuse_projections_
        self._conv_weight: torch.Tensor | None = None
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj, *self.gk_proj):
            lin.xavier_gain = MIXER_XAVIER_GAIN    # read by _init_weights: fla inits mixers apart

    def fuse_projections_(self) -> None:
        """For inference: q, k, v, g and the gate's first low-rank factor become one GEMM
        (and the three short convs' weights one [C, 1, W] tensor, read by one conv)."""
        self._in_weight = fuse_linear_weights_([self.q_proj, self.k_proj, self.v_proj, self.g_proj,
                                                self.gk_proj[0]])
        if self.use_short_conv:
            self._conv_weight = fuse_linear_weights_([self.q_conv1d, self.k_conv1d, self.v_conv1d])[:, 0]

    @property
    def conv_weight(self) -> torch.Tensor:
        """The q | k | v short convs as one depthwise weight [2*Kd + Vd, W]."""
        if self._conv_weight is not None and not torch.is_grad_enabled():
            return self._conv_weight
        return torch.cat([self.q_conv1d.weight[:, 0], self.k_conv1d.weight[:, 0], self.v_conv1d.weight[:, 0]])

    def _project(self, x, decode: bool = False):
        """x [..., D] -> q, k, v [..., Kd | Kd | Vd] (flat, before any short conv),
        log-decay g [..., H, K], output gate [..., H, V]."""
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        if self._in_weight is not None and not torch.is_grad_enabled():
            q, k, v, gate, gk = project(x, self._in_weight).split(
                [H * K, H * K, H * V, H * V, self.gk_proj[0].out_features], dim=-1)
            up = self.gk_proj[1]
            if decode and x.shape[0] <= FUSED_GATE_MAX_ROWS:   # the gate's second projection in the kernel
                g = gla_log_decay_low_rank(gk, up.weight, up.bias, self.gate_logit_normalizer, self.clamp_min)
            else:
                g = gla_log_decay(up(gk), self.gate_logit_normalizer, self.clamp_min)
        else:
            q, k, v, gate, gk = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.g_proj(x), self.gk_proj(x)
            g = gla_log_decay(gk, self.gate_logit_normalizer, self.clamp_min)
        return q, k, v, g.unflatten(-1, (H, K)), gate.unflatten(-1, (H, V))

    def _heads(self, q, k, v):
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        return q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V))

    def _split_qkv(self, qkv):
        return qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)

    def _out(self, o, gate):
        return project(self.g_norm_swish_gate(o, gate).flatten(-2), self.o_proj.weight)

    def forward(self, x, state=None):
        q, k, v, g, gate = self._project(x)
        final = {}
        if self.use_short_conv:
            qkv, final["conv"] = conv_ops.causal_conv(torch.cat([q, k, v], -1), self.conv_weight, None,
                                                      state["conv"] if state is not None else None, "silu")
            q, k, v = self._split_qkv(qkv)
        o, final["recurrent"] = gla_ops.gla_chunk(*self._heads(q, k, v), g, self.scale,
                                                  state["recurrent"] if state is not None else None)
        return self._out(o, gate), final

    def prefill(self, x, pool, slots, cu_seqlens, has_initial_state, valid=None):
        q, k, v, g, gate = self._project(x)
        if self.use_short_conv:      # padding is a sequence of its own here (slot -1: no state)
            q, k, v = self._split_qkv(conv_ops.conv_prefill(torch.cat([q, k, v], -1), pool["conv"], slots,
                                                            cu_seqlens, has_initial_state, self.conv_weight,
                                                            None, "silu"))
        lanes = valid is not None
        if lanes:
            # padded prompts in lanes (base.prefill): the recurrence runs over each whole lane
            # as one sequence; a padding row with k = 0 and log decay 0 leaves the state as it is
            k = k * valid[:, None].to(k.dtype)
            g = g.masked_fill(~valid[:, None, None], 0.0)
            slots, cu_seqlens, has_initial_state = (t[::2].contiguous()     # each lane's prompt
                                                    for t in (slots, cu_seqlens, has_initial_state))
        o = gla_ops.gla_prefill(*self._heads(q, k, v), g, pool["recurrent"], slots, cu_seqlens, has_initial_state,
                                self.scale, lanes=lanes)
        return self._out(o, gate)

    def decode(self, x, pool, slots):
        q, k, v, g, gate = self._project(x, decode=True)
        if self.use_short_conv:
            q, k, v = self._split_qkv(conv_ops.conv_decode(torch.cat([q, k, v], -1), pool["conv"], slots,
                                                           self.conv_weight, None, "silu"))
        o = gla_ops.gla_decode(*self._heads(q, k, v), g, pool["recurrent"], slots, self.scale)
        return self._out(o, gate)


@inference_compiled
def gla_log_decay(gk: torch.Tensor, normalizer: float, clamp_min: float | None) -> torch.Tensor:
    """The per-key log decay from the gate logits, in fp32 (fla: logsigmoid / 16)."""
    g = F.logsigmoid(gk.float()) / normalizer
    return g if clamp_min is None else g.clamp_min(clamp_min)


@inference_compiled
def gla_log_decay_low_rank(gk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, normalizer: float,
                           clamp_min: float | None) -> torch.Tensor:
    """``gla_log_decay`` of the low-rank gate's second projection ``gk @ weight.T + bias``
    (rank 16), summed as a broadcast product so that, compiled, it is one kernel
    with the logsigmoid: for decode's few rows a GEMM launch of its own (3 us on
    the H200, 24 a step) costs more than its arithmetic. Materialises
    [rows, rank, out] when eager, so decode only."""
    logits = (gk.float().unsqueeze(-1) * weight.float().t()).sum(-2)
    if bias is not None:
        logits = logits + bias.float()
    return gla_log_decay.eager(logits, normalizer, clamp_min)


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

    def prefill(self, h, pool, slots, cu_seqlens, has_initial_state, valid=None):
        return self._mlp(h, self.attn.prefill(self.attn_norm(h), pool, slots, cu_seqlens, has_initial_state, valid))

    def decode(self, h, y, pool, slots):
        """One token. The residual add is deferred to the next block: this block
        adds the previous block's output ``y`` (None for the first block) inside
        its pre-norm's kernel and returns (residual stream, MLP output) unadded."""
        h, x = deferred_residual_norm(h, y, self.attn_norm)
        h, x = add_rms_norm(h, self.attn.decode(x, pool, slots), self.mlp_norm.weight, self.mlp_norm.eps)
        return h, self.mlp(x)

    @staticmethod
    def add_residual(h, y):
        return h + y


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
    # honoured only when config.tie_word_embeddings (fla's GLA default: untied)
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

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
        embedding N(0, initializer_range); biases 0, norm weights 1. The short
        convs keep PyTorch's Conv1d default, U(+-1/sqrt(conv_size)) (Mamba's and
        Zoology's; fla 0.6's _init_weights would draw N(0, initializer_range))."""
        std = self.config.initializer_range
        if isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.Linear):
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
        return self.config.state_spec(state_dtype, conv_dtype=self.dtype)
