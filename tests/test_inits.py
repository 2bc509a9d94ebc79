"""From-scratch inits against the upstream formulas: mamba_ssm's Mamba2 (PyTorch
default Linear init, out_proj / sqrt(n_layer), embedding N(0, 0.02), dt
log-uniform in [dt_min, dt_max], A in U(1, 16)) and fla's GLA (mixer
projections Xavier-uniform with gain 2^-2.5, the rest N(0, 0.02))."""
import math

import pytest
import torch
import torch.nn.functional as F

from model_registry import StateXGLAConfig, StateXGLAForCausalLM, StateXMamba2Config, StateXMamba2ForCausalLM


def _uniform_matches(w: torch.Tensor, bound: float) -> None:
    """Drawn from U(-bound, bound): std bound/sqrt(3) (within 3%) and nothing outside."""
    assert w.abs().max().item() <= bound * (1 + 1e-6)
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


@pytest.fixture(scope="module")
def mamba2():
    torch.manual_seed(0)
    cfg = StateXMamba2Config(vocab_size=2048, hidden_size=256, num_hidden_layers=4, state_size=16, head_dim=32)
    return StateXMamba2ForCausalLM(cfg)


def test_mamba2_linears_embedding_and_conv_follow_mamba_ssm(mamba2):
    cfg = mamba2.config
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    emb = mamba2.backbone.embeddings.weight
    assert emb.std().item() == pytest.approx(0.02, rel=0.03)
    assert mamba2.lm_head.weight.data_ptr() == emb.data_ptr()        # tied: the embedding's init wins
    for block in mamba2.backbone.layers:
        mx = block.mixer
        _uniform_matches(mx.in_proj.weight, 1 / math.sqrt(D))        # nn.Linear default, kept by mamba_ssm
        _uniform_matches(mx.out_proj.weight, 1 / math.sqrt(I) / math.sqrt(L))   # n_residuals_per_layer = 1
        W = cfg.conv_kernel
        _uniform_matches(mx.conv1d.weight, 1 / math.sqrt(W))         # nn.Conv1d default (depthwise: fan_in = W)
        assert mx.conv1d.bias.abs().max().item() <= 1 / math.sqrt(W) and mx.conv1d.bias.abs().min() > 0
        assert torch.equal(mx.D, torch.ones_like(mx.D))
        assert torch.equal(mx.norm.weight, torch.ones_like(mx.norm.weight))


def test_mamba2_dt_and_a_follow_mamba_ssm(mamba2):
    cfg = mamba2.config
    dts = torch.cat([F.softplus(b.mixer.dt_bias.detach()) for b in mamba2.backbone.layers])
    As = torch.cat([torch.exp(b.mixer.A_log.detach()) for b in mamba2.backbone.layers])
    assert dts.min() >= cfg.time_step_min * (1 - 1e-4) and dts.max() <= cfg.time_step_max * (1 + 1e-4)
    # log-uniform: log dt is spread over the whole range, not a constant
    logs = (dts.log() - math.log(cfg.time_step_min)) / (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
    assert logs.min() < 0.15 and logs.max() > 0.85 and 0.35 < logs.mean() < 0.65
    assert As.min() >= 1.0 and As.max() <= 16.0 and As.std() > 2.5     # U(1, 16), std 4.3; not log(1..H)
    assert not torch.allclose(As[:cfg.num_heads], torch.arange(1, cfg.num_heads + 1, dtype=torch.float32))


def test_mamba2_rescale_follows_the_config_flag():
    torch.manual_seed(0)
    cfg = StateXMamba2Config(vocab_size=512, hidden_size=256, num_hidden_layers=4, state_size=16, head_dim=32,
                             rescale_prenorm_residual=False)
    m = StateXMamba2ForCausalLM(cfg)
    _uniform_matches(m.backbone.layers[0].mixer.out_proj.weight, 1 / math.sqrt(cfg.intermediate_size))


def test_gla_mixers_are_xavier_and_the_rest_normal():
    torch.manual_seed(0)
    cfg = StateXGLAConfig(vocab_size=2048, hidden_size=512, num_hidden_layers=2, num_heads=4)
    m = StateXGLAForCausalLM(cfg)
    gain = 2 ** -2.5
    for block in m.model.layers:
        a = block.attn
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.g_proj, a.o_proj, *a.gk_proj):
            fan_out, fan_in = lin.weight.shape
            _uniform_matches(lin.weight, gain * math.sqrt(6 / (fan_in + fan_out)))
        assert torch.equal(a.gk_proj[1].bias, torch.zeros_like(a.gk_proj[1].bias))
        for lin in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
            assert lin.weight.std().item() == pytest.approx(cfg.initializer_range, rel=0.03)
            assert lin.weight.abs().max().item() > 3 * cfg.initializer_range       # normal, not uniform
    assert m.model.embeddings.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.03)


def test_gla_short_convs_are_pytorch_default_conv1d():
    """use_short_conv: q/k/v convs U(+-1/sqrt(conv_size)) (nn.Conv1d's default, depthwise
    fan_in = conv_size, as Mamba2's conv); the projections keep their own init."""
    torch.manual_seed(0)
    cfg = StateXGLAConfig(vocab_size=2048, hidden_size=512, num_hidden_layers=2, num_heads=4, use_short_conv=True)
    m = StateXGLAForCausalLM(cfg)
    for block in m.model.layers:
        a = block.attn
        for conv in (a.q_conv1d, a.k_conv1d, a.v_conv1d):
            assert conv.bias is None and conv.weight.shape[1:] == (1, cfg.conv_size)
            _uniform_matches(conv.weight, 1 / math.sqrt(cfg.conv_size))
        fan_out, fan_in = a.q_proj.weight.shape
        _uniform_matches(a.q_proj.weight, 2 ** -2.5 * math.sqrt(6 / (fan_in + fan_out)))
