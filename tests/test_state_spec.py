"""state_spec(): exact bytes per sequence for the real 1.3B configs (no weights needed)."""
from __future__ import annotations

import torch

from model_registry import StateXGLAConfig, StateXMamba2Config

MiB = 2**20


def gla_1p3b(layer_num_heads=None):
    return StateXGLAConfig(hidden_size=2048, num_hidden_layers=24, num_heads=4, expand_k=0.5, expand_v=1,
                           vocab_size=32000, attn_mode="fused_chunk", layer_num_heads=layer_num_heads)


def mamba2_1p3b(layer_state_size=None):
    return StateXMamba2Config(hidden_size=2048, num_hidden_layers=48, expand=2, head_dim=64, state_size=128,
                              n_groups=1, conv_kernel=4, vocab_size=50288, layer_state_size=layer_state_size)


def test_gla_1p3b_state_bytes():
    assert gla_1p3b().state_spec().bytes_per_sequence == 48 * MiB
    heads = [1 if i in (0, 6, 12, 18) else 4 for i in range(24)]
    spec = gla_1p3b(heads).state_spec()
    assert spec.bytes_per_sequence == 72 * MiB
    assert spec.layers[0].tensors[0].shape == (1, 1024, 2048)
    assert spec.layers[1].tensors[0].shape == (4, 256, 512)
    assert gla_1p3b(heads).state_spec(torch.bfloat16).bytes_per_sequence == 36 * MiB


def test_gla_short_conv_adds_one_conv_window_per_layer():
    """use_short_conv: a q|k|v window [2*key_dim + value_dim, conv_size-1] per layer
    in the conv dtype (the model's), the same in merged-head layers."""
    heads = [1 if i in (0, 6, 12, 18) else 4 for i in range(24)]
    plain = gla_1p3b(heads).state_spec()
    cfg = gla_1p3b(heads)
    cfg.use_short_conv = True
    spec = cfg.state_spec(conv_dtype=torch.bfloat16)
    assert spec.bytes_per_sequence == plain.bytes_per_sequence + 24 * (2 * 1024 + 2048) * 3 * 2
    for layer in (0, 1):
        conv, recurrent = spec.layers[layer].tensors
        assert (conv.name, conv.shape, conv.dtype) == ("conv", (4096, 3), torch.bfloat16)
        assert recurrent == plain.layers[layer].tensors[0]


def test_mamba2_1p3b_state_bytes():
    spec = mamba2_1p3b().state_spec(conv_dtype=torch.bfloat16)
    ssm = sum(t.nbytes for layer in spec.layers for t in layer.tensors if t.name == "ssm")
    conv = sum(t.nbytes for layer in spec.layers for t in layer.tensors if t.name == "conv")
    assert ssm == 96 * MiB
    assert conv == 48 * 4352 * 3 * 2
    assert spec.bytes_per_sequence == ssm + conv
    # N = 512 in layers 0, 12, 24, 36: ssm 4x there, conv channels 4352 -> 5120
    sizes = [512 if i % 12 == 0 else 128 for i in range(48)]
    spec = mamba2_1p3b(sizes).state_spec(conv_dtype=torch.bfloat16)
    assert spec.bytes_per_sequence == (44 * 64 * 64 * 128 + 4 * 64 * 64 * 512) * 4 + (44 * 4352 + 4 * 5120) * 3 * 2
    assert spec.layers[0].tensors[0].shape == (5120, 3) and spec.layers[0].tensors[1].shape == (64, 64, 512)


def test_capacity_is_budget_floor_divided_by_bytes():
    spec = gla_1p3b().state_spec()
    assert spec.capacity(10 * 48 * MiB + 5) == 10
