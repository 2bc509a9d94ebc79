"""Configs for the two families. Each carries every upstream field (fla's
GLAConfig, transformers' Mamba2Config) plus a per-layer list that describes the
StateX expansion; an unexpanded model is the case where every entry equals the
base value, so one class serves base and expanded checkpoints.
"""
from __future__ import annotations

import math

import torch

from model_registry.state import LayerStateSpec, StateSpec, StateTensorSpec

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


def _config_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dt) if isinstance(dt, str) else dt


def _as_float(x) -> float:
    # transformers 5 writes inf in JSON as {"__float__": "Infinity"}
    if isinstance(x, dict) and "__float__" in x:
        return float(x["__float__"])
    return float(x)


class ConfigError(ValueError):
    """A config that our models cannot run; the message says which field and why."""


class StateXGLAConfig(_BaseConfig):
    model_type = "statex_gla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        layer_num_heads: list[int] | None = None,
        layer_key_dim: list[int] | None = None,
        layer_attn_scale: list[float | None] | None = None,
        feature_map: str | None = None,
        attn_mode: str = "chunk",
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        clamp_min: float | None = None,
        hidden_act: str = "swish",
        max_position_embeddings: int = 2048,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-6,
        gate_logit_normalizer: float = 16,
        gate_low_rank_dim: int = 16,
        use_gk: bool = True,
        use_gv: bool = False,
        initializer_range: float = 0.02,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.hidden_ratio = hidden_ratio
        if intermediate_size is None:  # fla's GatedMLP rule: 2/3 * ratio * hidden, rounded up to 256
            intermediate_size = int(hidden_size * (hidden_ratio or 4) * 2 / 3)
            intermediate_size = 256 * ((intermediate_size + 255) // 256)
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.layer_num_heads = list(layer_num_heads) if layer_num_heads is not None else [num_heads] * num_hidden_layers
        # a layer's total key width (heads x key dim per head): the default key_dim, or wider where
        # StateX's `preserve` expansion widened each head's keys (training/expand.py)
        self.layer_key_dim = (list(layer_key_dim) if layer_key_dim is not None
                              else [int(round(hidden_size * expand_k))] * num_hidden_layers)
        # the score scale per layer where it is not 1/sqrt(key dim per head): a widened layer keeps
        # its base's, so that it computes the base's function (None: the default everywhere)
        self.layer_attn_scale = list(layer_attn_scale) if layer_attn_scale is not None else None
        self.feature_map = feature_map
        # fla 0.6 dropped `fused_chunk`; the math is identical, so old configs load.
        self.attn_mode = "chunk" if attn_mode == "fused_chunk" else attn_mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_output_gate = use_output_gate
        self.clamp_min = clamp_min
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gate_low_rank_dim = gate_low_rank_dim
        self.use_gk = use_gk
        self.use_gv = use_gv
        self.initializer_range = initializer_range
        kwargs.pop("state_family", None)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_statex()

    @property
    def key_dim(self) -> int:
        return int(round(self.hidden_size * self.expand_k))

    @property
    def value_dim(self) -> int:
        return int(round(self.hidden_size * self.expand_v))

    def head_dims(self, layer: int) -> tuple[int, int, int]:
        """(H, K, V) of one layer: heads, key dim per head, value dim per head."""
        H = self.layer_num_heads[layer]
        return H, self.layer_key_dim[layer] // H, self.value_dim // H

    def to_dict(self) -> dict:
        """Per-layer key widths only where some layer's differs from ``key_dim`` (so a config
        whose ``hidden_size`` or ``expand_k`` is edited by hand keeps no stale widths), and
        score scales only when set."""
        d = super().to_dict()
        if d.get("layer_key_dim") == [self.key_dim] * self.num_hidden_layers:
            d.pop("layer_key_dim")
        if d.get("layer_attn_scale", 0) is None:
            d.pop("layer_attn_scale")
        return d

    def attn_scale(self, layer: int) -> float:
        """The score scale of one layer: 1/sqrt(key dim per head) unless ``layer_attn_scale`` sets it."""
        s = self.layer_attn_scale[layer] if self.layer_attn_scale is not None else None
        return s if s is not None else self.head_dims(layer)[1] ** -0.5

    @property
    def expanded_layers(self) -> list[int]:
        return [i for i, (h, k) in enumerate(zip(self.layer_num_heads, self.layer_key_dim))
                if h != self.num_heads or k != self.key_dim]

    def conv_dim(self, layer: int) -> int:
        """Channels of one layer's short conv (``use_short_conv``): q | k | v, in that order."""
        return 2 * self.layer_key_dim[layer] + self.value_dim

    def state_spec(self, state_dtype: torch.dtype | None = None, conv_dtype: torch.dtype | None = None
                   ) -> StateSpec:
        """Per layer: with ``use_short_conv`` the conv window [2*key_dim + value_dim,
        conv_size-1] (model dtype, as Mamba2's), then the recurrent state S
        [H_l, K_l, V_l] (fp32 unless told). Merging heads leaves the conv window as is;
        widening keys grows its q and k channels."""
        dt = state_dtype or torch.float32
        cdt = conv_dtype or _config_dtype(self)

        def conv(i):
            return ((StateTensorSpec("conv", (self.conv_dim(i), self.conv_size - 1), cdt),) if self.use_short_conv
                    else ())
        return StateSpec(tuple(LayerStateSpec(i, (*conv(i), StateTensorSpec("recurrent", self.head_dims(i), dt)))
                               for i in range(self.num_hidden_layers)))

    def validate_statex(self) -> None:
        if len(self.layer_num_heads) != self.num_hidden_layers:
            raise ConfigError(f"layer_num_heads has {len(self.layer_num_heads)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        if len(self.layer_key_dim) != self.num_hidden_layers:
            raise ConfigError(f"layer_key_dim has {len(self.layer_key_dim)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        if self.layer_attn_scale is not None and (
                len(self.layer_attn_scale) != self.num_hidden_layers
                or any(s is not None and not (isinstance(s, (int, float)) and s > 0) for s in self.layer_attn_scale)):
            raise ConfigError(f"layer_attn_scale must hold {self.num_hidden_layers} positive numbers or nulls, "
                              f"got {self.layer_attn_scale}")
        for i, (h, kd) in enumerate(zip(self.layer_num_heads, self.layer_key_dim)):
            if h < 1 or kd < 1 or kd % h or self.value_dim % h:
                raise ConfigError(f"layer {i}: {h} heads do not divide key dim {kd} "
                                  f"and value_dim {self.value_dim}")
        if self.use_short_conv and self.conv_size < 2:
            raise ConfigError(f"conv_size {self.conv_size} with use_short_conv: a short conv needs at least 2 taps")
        unsupported = {
            "num_kv_heads": self.num_kv_heads not in (None, self.num_heads),
            "feature_map": self.feature_map is not None,
            "use_output_gate": not self.use_output_gate,
            "hidden_act": self.hidden_act not in ("swish", "silu"),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError("GLA options not supported by statex-serve: "
                              + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                              + " (supported: the fla-hub GLA layout, with or without fla's short conv: "
                                "output gate, swish, num_kv_heads == num_heads, no feature map)")


class StateXMamba2Config(_BaseConfig):
    model_type = "statex_mamba2"

    def __init__(
        self,
        vocab_size: int = 50288,
        hidden_size: int = 2048,
        state_size: int = 128,
        layer_state_size: list[int] | None = None,
        num_hidden_layers: int = 48,
        num_heads: int | None = None,
        head_dim: int = 64,
        expand: int = 2,
        n_groups: int = 1,
        conv_kernel: int = 4,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        hidden_act: str = "silu",
        layer_norm_epsilon: float = 1e-5,
        norm_group_size: int | None = None,
        residual_in_fp32: bool = True,
        rms_norm: bool = True,
        time_step_rank: int | str = "auto",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_limit: tuple[float, float] | list[float] = (0.0, math.inf),
        rescale_prenorm_residual: bool = True,     # mamba_ssm's default (HF's is False)
        chunk_size: int = 256,
        initializer_range: float = 0.02,           # mamba_ssm's embedding std (HF's is 0.1)
        max_position_embeddings: int = 1 << 20,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.layer_state_size = (list(layer_state_size) if layer_state_size is not None
                                 else [state_size] * num_hidden_layers)
        self.num_hidden_layers = num_hidden_layers
        self.expand = expand
        self.head_dim = head_dim
        self.num_heads = num_heads if num_heads is not None else expand * hidden_size // head_dim
        self.n_groups = n_groups
        self.conv_kernel = conv_kernel
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.hidden_act = hidden_act
        self.layer_norm_epsilon = layer_norm_epsilon
        # Width of the gated RMSNorm's groups. mamba_ssm normalises per group
        # (d_inner / ngroups); transformers' Mamba2 over all of d_inner. Import
        # records whichever the source used, so logits match the source.
        self.norm_group_size = norm_group_size or self.intermediate_size // n_groups
        self.residual_in_fp32 = residual_in_fp32
        self.rms_norm = rms_norm
        self.time_step_rank = math.ceil(hidden_size / 16) if time_step_rank == "auto" else time_step_rank
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.time_step_limit = tuple(_as_float(x) for x in time_step_limit)
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.chunk_size = chunk_size
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_statex()

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    def conv_dim(self, layer: int) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.layer_state_size[layer]

    def in_proj_dim(self, layer: int) -> int:
        return self.intermediate_size + self.conv_dim(layer) + self.num_heads

    @property
    def expanded_layers(self) -> list[int]:
        return [i for i, n in enumerate(self.layer_state_size) if n != self.state_size]

    def state_spec(self, state_dtype: torch.dtype | None = None, conv_dtype: torch.dtype | None = None
                   ) -> StateSpec:
        """Per layer: conv window [conv_dim_l, d_conv-1] (model dtype) and ssm
        state [H, P, N_l] (fp32 unless told)."""
        sdt = state_dtype or torch.float32
        cdt = conv_dtype or _config_dtype(self)
        return StateSpec(tuple(
            LayerStateSpec(i, (StateTensorSpec("conv", (self.conv_dim(i), self.conv_kernel - 1), cdt),
                               StateTensorSpec("ssm", (self.num_heads, self.head_dim, self.layer_state_size[i]), sdt)))
            for i in range(self.num_hidden_layers)))

    def validate_statex(self) -> None:
        if len(self.layer_state_size) != self.num_hidden_layers:
            raise ConfigError(f"layer_state_size has {len(self.layer_state_size)} entries, "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ConfigError(f"num_heads * head_dim ({self.num_heads} * {self.head_dim}) must equal "
                              f"expand * hidden_size ({self.intermediate_size})")
        if self.num_heads % self.n_groups:
            raise ConfigError(f"n_groups {self.n_groups} must divide num_heads {self.num_heads}")
        if self.intermediate_size % self.norm_group_size:
            raise ConfigError(f"norm_group_size {self.norm_group_size} must divide {self.intermediate_size}")
        if any(n < 1 for n in self.layer_state_size):
            raise ConfigError(f"layer_state_size entries must be positive: {self.layer_state_size}")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} not supported (Mamba2 uses silu)")
        if not self.rms_norm:
            raise ConfigError("rms_norm=False (LayerNorm blocks) is not supported")


# The paper's StateX setting for GLA-1.3B and Mamba2-1.3B (the config defaults):
# every p-th layer from 0 expanded (docs/training.md), GLA's heads merged to one
# in 4 of 24 layers, Mamba2's d_state 128 -> 512 in 4 of 48.
STATEX_1P3B_LAYERS = {"gla": (0, 6, 12, 18), "mamba2": (0, 12, 24, 36)}


def statex_1p3b_config(family: str, expanded: bool = True, **overrides) -> StateXGLAConfig | StateXMamba2Config:
    """GLA-1.3B / Mamba2-1.3B, with the StateX expansion of STATEX_1P3B_LAYERS when
    ``expanded``; ``overrides`` (e.g. vocab_size, token ids, dtype) pass through."""
    layers = STATEX_1P3B_LAYERS[family] if expanded else ()
    if family == "gla":
        base = StateXGLAConfig()
        heads = [1 if i in layers else base.num_heads for i in range(base.num_hidden_layers)]
        return StateXGLAConfig(layer_num_heads=heads, **overrides)
    base = StateXMamba2Config()
    sizes = [4 * base.state_size if i in layers else base.state_size for i in range(base.num_hidden_layers)]
    return StateXMamba2Config(layer_state_size=sizes, **overrides)
