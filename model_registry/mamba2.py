"""Mamba2 with per-layer state size (StateX: larger d_state in chosen layers).

Module and tensor names follow transformers' ``Mamba2ForCausalLM`` (mamba_ssm
checkpoints are renamed on import). Math: in_proj -> z | xBC | dt, depthwise
causal conv + silu over xBC, SSD with D skip, gated RMSNorm with z, out_proj.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

import kernels.conv as conv_ops
import kernels.mamba2 as ssd_ops
from model_registry.base import StateXPreTrainedModel
from model_registry.configs import StateXMamba2Config
from model_registry.layers import GatedRMSNorm, RMSNorm, cast_rms_norm, deferred_residual_norm, init, project
from model_registry.state import StateSpec


MAMBA_A_INIT_RANGE = (1.0, 16.0)    # mamba_ssm Mamba2's A_init_range
# the raw dt of a padding row: softplus(PAD_DT + dt_bias) is exactly 0 in fp32 (and in bf16 input)
PAD_DT = -1.0e4


def mamba_dt_bias_init(num_heads: int, dt_min: float, dt_max: float, dt_floor: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """mamba_ssm's dt_bias draw: dt log-uniform in [dt_min, dt_max], floored,
    stored as softplus^-1(dt) so that softplus(dt_bias) = dt at the start."""
    u = torch.rand(num_heads, generator=generator)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2Mixer(nn.Module):
    def __init__(self, config: StateXMamba2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.state_size = config.layer_state_size[layer_idx]
        self.intermediate_size = config.intermediate_size
        self.conv_dim = config.conv_dim(layer_idx)
        self.dt_limit = tuple(config.time_step_limit)
        self.activation = config.hidden_act
        self.in_proj = nn.Linear(config.hidden_size, config.in_proj_dim(layer_idx), bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                padding=config.conv_kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.intermediate_size, config.norm_group_size, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.out_proj.residual_out = True      # rescaled by _init_weights (mamba_ssm's prenorm-residual rule)

    @property
    def conv_weight(self):
        return self.conv1d.weight[:, 0, :]                           # [C, W]

    def _split_in(self, x):
        zxbcdt = project(x, self.in_proj.weight, self.in_proj.bias)
        return torch.split(zxbcdt, [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

    def _split_xbc(self, xbc):
        G, N = self.n_groups, self.state_size
        xs, B, C = torch.split(xbc, [self.intermediate_size, G * N, G * N], dim=-1)
        return (xs.unflatten(-1, (self.num_heads, self.head_dim)), B.unflatten(-1, (G, N)),
                C.unflatten(-1, (G, N)))

    def _ssm_args(self):
        return self._A(), self.D, self.dt_bias, self.dt_limit

    def _A(self) -> torch.Tensor:
        """-exp(A_log) in fp32. Serving (inference mode, or weights that take no
        gradient) computes it once per A_log storage and version: two fewer
        kernels per layer and token. Everywhere else it is computed afresh: an
        optimizer step can change A_log without bumping its version (fused AdamW
        does not), and an evaluation between training steps must see the new
        values (a stale cache had the capacity experiment score its base and
        scratch arms with their initial decays)."""
        serving = torch.is_inference_mode_enabled() or not self.A_log.requires_grad
        if torch.is_grad_enabled() or not serving:
            return -torch.exp(self.A_log.float())
        version = None if self.A_log.is_inference() else self.A_log._version
        key = (self.A_log.data_ptr(), version, self.A_log.device)
        if getattr(self, "_A_cache", (None,))[0] != key:
            self._A_cache = (key, -torch.exp(self.A_log.detach().float()))
        return self._A_cache[1]

    def _out(self, y, z):
        return project(self.norm(y.flatten(-2), z), self.out_proj.weight, self.out_proj.bias)

    def forward(self, x, state=None):
        z, xbc, dt = self._split_in(x)
        xbc, conv_final = conv_ops.causal_conv(xbc, self.conv_weight, self.conv1d.bias,
                                               state["conv"] if state is not None else None, self.activation)
        xs, B, C = self._split_xbc(xbc)
        A, D, dt_bias, dt_limit = self._ssm_args()
        y, ssm_final = ssd_ops.ssd_chunk(xs, dt, A, B, C, D, dt_bias, dt_limit,
                                         state["ssm"] if state is not None else None)
        return self._out(y, z), {"conv": conv_final, "ssm": ssm_final}

    def prefill(self, x, pool, slots, cu_seqlens, has_initial_state, valid=None):
        z, xbc, dt = self._split_in(x)
        # padding is a sequence of its own here (slot -1: no state)
        xbc = conv_ops.conv_prefill(xbc, pool["conv"], slots, cu_seqlens, has_initial_state, self.conv_weight,
                                    self.conv1d.bias, self.activation)
        xs, B, C = self._split_xbc(xbc)
        A, D, dt_bias, dt_limit = self._ssm_args()
        lanes = valid is not None
        if lanes:
            # padded prompts in lanes (base.prefill): the scan runs over each whole lane as one
            # sequence; on a padding row softplus(dt + dt_bias) underflows to 0 (no decay, no
            # input) unless dt_limit's floor lifts it (supports_padded_prefill)
            dt = dt.masked_fill(~valid[:, None], PAD_DT)
            slots, cu_seqlens, has_initial_state = (t[::2].contiguous()     # each lane's prompt
                                                    for t in (slots, cu_seqlens, has_initial_state))
        y = ssd_ops.ssd_prefill(xs, dt, A, B, C, D, dt_bias, dt_limit, pool["ssm"], slots, cu_seqlens,
                                has_initial_state, lanes=lanes)
        return self._out(y, z)

    def decode(self, x, pool, slots):
        z, xbc, dt = self._split_in(x)
        xbc = conv_ops.conv_decode(xbc, pool["conv"], slots, self.conv_weight, self.conv1d.bias, self.activation)
        xs, B, C = self._split_xbc(xbc)
        A, D, dt_bias, dt_limit = self._ssm_args()
        y = ssd_ops.ssd_decode(xs, dt, A, B, C, D, dt_bias, dt_limit, pool["ssm"], slots)
        return self._out(y, z)


class Mamba2Block(GradientCheckpointingLayer):
    def __init__(self, config: StateXMamba2Config, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(config, layer_idx)

    def add_residual(self, h, y):
        # transformers/mamba_ssm keep the residual stream in fp32 (residual_in_fp32)
        return (h.float() if self.residual_in_fp32 else h) + y

    def _in(self, h):
        return cast_rms_norm(h, self.norm.weight, self.norm.eps)

    def forward(self, h, state=None):
        y, final = self.mixer(self._in(h), state)
        return self.add_residual(h, y), final

    def prefill(self, h, pool, slots, cu_seqlens, has_initial_state, valid=None):
        return self.add_residual(h, self.mixer.prefill(self._in(h), pool, slots, cu_seqlens, has_initial_state, valid))

    def decode(self, h, y, pool, slots):
        """One token. The residual add is deferred to the next block: this block
        adds the previous block's output ``y`` (None for the first block) inside
        its pre-norm's kernel and returns (residual stream, mixer output) unadded."""
        h, x = deferred_residual_norm(h, y, self.norm, self.residual_in_fp32)
        return h, self.mixer.decode(x, pool, slots)

class StateXMamba2Model(nn.Module):
    def __init__(self, config: StateXMamba2Config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Mamba2Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class StateXMamba2ForCausalLM(StateXPreTrainedModel):
    config_class = StateXMamba2Config
    base_model_prefix = "backbone"
    _no_split_modules = ["Mamba2Block"]
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: StateXMamba2Config):
        super().__init__(config)
        self.backbone = StateXMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def blocks(self):
        return self.backbone.layers

    @property
    def embeddings(self):
        return self.backbone.embeddings

    @property
    def final_norm(self):
        return self.backbone.norm_f

    @property
    def supports_padded_prefill(self) -> bool:
        # a dt floor above 0 would give padding rows a decay and an input
        return float(self.config.time_step_limit[0]) <= 0.0

    def _init_weights(self, module):
        """mamba_ssm's from-scratch init (modules/mamba2.py and MixerModel's
        _init_weights): PyTorch's default Linear / Conv1d init (U(+-1/sqrt(fan_in)))
        with Linear biases 0; out_proj then divided by sqrt(n_layer) (one residual
        per layer) when rescale_prenorm_residual; embedding N(0, initializer_range);
        dt_bias = softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max];
        A_log = log(U(1, 16)); D and norm weights 1."""
        cfg = self.config
        if isinstance(module, Mamba2Mixer):
            A = torch.empty(module.num_heads).uniform_(*MAMBA_A_INIT_RANGE)
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)
            init.copy_(module.dt_bias, mamba_dt_bias_init(module.num_heads, cfg.time_step_min, cfg.time_step_max,
                                                          cfg.time_step_floor))
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                bound = 1.0 / math.sqrt(module.conv1d.weight[0].numel())
                init.uniform_(module.conv1d.bias, -bound, bound)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if getattr(module, "residual_out", False) and cfg.rescale_prenorm_residual:
                with torch.no_grad():
                    module.weight /= math.sqrt(cfg.num_hidden_layers)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=cfg.initializer_range)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)

    def state_spec(self, state_dtype: torch.dtype | None = None) -> StateSpec:
        return self.config.state_spec(state_dtype, conv_dtype=self.dtype)
