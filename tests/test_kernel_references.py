"""The torch references (CPU path and GPU oracle) agree with each other, with
fla's naive GLA recurrence, and with the slot-indexed contract (kernels/README.md)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels.conv as conv_ops
import kernels.gla as gla_ops
import kernels.mamba2 as ssd_ops
from kernels.gla import reference as gla_ref
from kernels.mamba2 import reference as ssd_ref


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gla_inputs(B, T, H, K, V, dtype=torch.float64):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=dtype)) / 16
    return q, k, v, g


@pytest.mark.parametrize("H,K,V", [(4, 16, 32), (1, 64, 128)])
def test_gla_chunk_equals_recurrence(H, K, V):
    q, k, v, g = gla_inputs(2, 75, H, K, V)
    s0 = torch.randn(2, H, K, V, dtype=torch.float64)
    o1, s1 = gla_ref.gla_recurrent(q, k, v, g, K ** -0.5, s0)
    o2, s2 = gla_ref.gla_chunk(q, k, v, g, K ** -0.5, s0)
    assert rel_err(o2, o1) < 1e-10 and rel_err(s2, s1) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gla_chunk_is_finite_and_exact_under_strong_decay(dtype):
    """A trained gate reaches log decays of -7 per token; the chunked form must neither
    overflow (exp of a positive cumulative decay) nor lose accuracy there."""
    H, K, V = 2, 16, 32
    q, k, v, _ = gla_inputs(2, 75, H, K, V, dtype=dtype)
    g = -4 - 4 * torch.rand(2, 75, H, K, dtype=dtype)   # 16 such tokens overflowed the old midpoint form
    g[:, ::7] = 0.0                                 # and some tokens that keep everything
    s0 = torch.randn(2, H, K, V, dtype=dtype)
    o1, s1 = gla_ref.gla_recurrent(q, k, v, g, K ** -0.5, s0)
    o2, s2 = gla_ref.gla_chunk(q, k, v, g, K ** -0.5, s0)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(o2, o1) < tol and rel_err(s2, s1) < tol


def test_gla_overflow_free_scores_equal_the_midpoint_form():
    """The two intra-chunk score forms agree where both are safe, for chunk lengths that
    are and are not multiples of the sub-block."""
    for C in (8, 13, 32):
        q, k = torch.randn(2, 3, C, 16, dtype=torch.float64), torch.randn(2, 3, C, 16, dtype=torch.float64)
        G = (F.logsigmoid(torch.randn(2, 3, C, 16, dtype=torch.float64)) / 4).cumsum(-2)
        mid = G[..., C // 2 - 1: C // 2, :]
        want = ((q * (G - mid).exp()) @ (k * (mid - G).exp()).transpose(-1, -2)).tril()
        assert rel_err(gla_ref.A_intra(q, k, G), want) < 1e-12


def test_gla_recurrence_equals_fla_naive_recurrent_gla():
    from fla.ops.gla.naive import naive_recurrent_gla

    H, K, V = 2, 32, 48
    q, k, v, g = gla_inputs(2, 40, H, K, V, dtype=torch.float32)
    s0 = torch.randn(2, H, K, V)
    o_fla, s_fla = naive_recurrent_gla(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = gla_ref.gla_chunk(q, k, v, g, K ** -0.5, s0)
    assert rel_err(o, o_fla) < 1e-5 and rel_err(s, s_fla) < 1e-5


def test_ssd_chunk_equals_recurrence():
    Bt, T, H, P, G, N = 2, 70, 4, 8, 2, 16
    x = torch.randn(Bt, T, H, P, dtype=torch.float64)
    dt = torch.randn(Bt, T, H, dtype=torch.float64)
    A = -torch.rand(H, dtype=torch.float64) * 4
    B, C = torch.randn(Bt, T, G, N, dtype=torch.float64), torch.randn(Bt, T, G, N, dtype=torch.float64)
    D, dt_bias = torch.randn(H, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    h0 = torch.randn(Bt, H, P, N, dtype=torch.float64)
    for lim in [(0.0, math.inf), (0.01, 0.5)]:
        y1, h1 = ssd_ref.ssd_recurrent(x, dt, A, B, C, D, dt_bias, lim, h0)
        y2, h2 = ssd_ref.ssd_chunk(x, dt, A, B, C, D, dt_bias, lim, h0, chunk_size=16)
        assert rel_err(y2, y1) < 1e-10 and rel_err(h2, h1) < 1e-10


def _poisoned_pool(shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_gla_decode_and_prefill_contract(state_dtype):
    H, K, V, S = 2, 16, 24, 5
    pool = _poisoned_pool((S, H, K, V), state_dtype)
    before = pool.clone()
    # prefill two prompts (one from zero, one continuing slot 3) and a padded row
    lens = [9, 4, 3]
    q, k, v, g = (t[0] for t in gla_inputs(1, sum(lens), H, K, V, dtype=torch.float32))
    cu = torch.tensor([0, 9, 13, 16], dtype=torch.int32)
    slots = torch.tensor([1, 3, -1], dtype=torch.int32)
    has_init = torch.tensor([False, True, True])
    o = gla_ops.gla_prefill(q, k, v, g, pool, slots, cu, has_init, K ** -0.5)
    ref1, s1 = gla_ref.gla_recurrent(q[None, :9], k[None, :9], v[None, :9], g[None, :9], K ** -0.5)
    ref2, s2 = gla_ref.gla_recurrent(q[None, 9:13], k[None, 9:13], v[None, 9:13], g[None, 9:13], K ** -0.5,
                                     before[3][None].float())
    assert rel_err(o[:9], ref1[0]) < 1e-5 and rel_err(o[9:13], ref2[0]) < 1e-5
    tol = 1e-5 if state_dtype == torch.float32 else 1e-2
    assert rel_err(pool[1].float(), s1[0]) < tol and rel_err(pool[3].float(), s2[0]) < tol
    for untouched in (0, 2, 4):
        assert torch.equal(pool[untouched], before[untouched])
    # decode one token for slots 3 and 1 (order swapped) plus a padded row
    after_prefill = pool.clone()
    q, k, v, g = (t[:, 0] for t in gla_inputs(3, 1, H, K, V, dtype=torch.float32))
    o = gla_ops.gla_decode(q, k, v, g, pool, torch.tensor([3, -1, 1], dtype=torch.int32), K ** -0.5)
    for row, slot in ((0, 3), (2, 1)):
        ref, s = gla_ref.gla_recurrent(q[row][None, None], k[row][None, None], v[row][None, None],
                                       g[row][None, None], K ** -0.5, after_prefill[slot][None].float())
        assert rel_err(o[row], ref[0, 0]) < 1e-5
        assert rel_err(pool[slot].float(), s[0]) < tol
    for untouched in (0, 2, 4):
        assert torch.equal(pool[untouched], before[untouched])


def test_mamba2_decode_and_prefill_contract():
    H, P, G, N, C, W, S = 4, 8, 1, 16, 48, 4, 4
    ssm_pool, conv_pool = _poisoned_pool((S, H, P, N)), _poisoned_pool((S, C, W - 1))
    ssm_before, conv_before = ssm_pool.clone(), conv_pool.clone()
    A, D, dt_bias = -torch.rand(H) * 3, torch.randn(H), torch.randn(H)
    weight, bias = torch.randn(C, W), torch.randn(C)
    lim = (0.0, math.inf)
    T = 11
    xc = torch.randn(T, C)
    x, dt = torch.randn(T, H, P), torch.randn(T, H)
    B, Cm = torch.randn(T, G, N), torch.randn(T, G, N)
    cu = torch.tensor([0, 7, 11], dtype=torch.int32)
    slots = torch.tensor([2, 0], dtype=torch.int32)
    has_init = torch.tensor([False, True])
    yc = conv_ops.conv_prefill(xc, conv_pool, slots, cu, has_init, weight, bias)
    y = ssd_ops.ssd_prefill(x, dt, A, B, Cm, D, dt_bias, lim, ssm_pool, slots, cu, has_init)
    # sequence 1 continues slot 0's state: compare with the whole-sequence forms
    ref_c, fin_c = conv_ops.causal_conv(xc[None, 7:], weight, bias, conv_before[0][None])
    ref_y, fin_h = ssd_ref.ssd_recurrent(x[None, 7:], dt[None, 7:], A, B[None, 7:], Cm[None, 7:], D, dt_bias, lim,
                                         ssm_before[0][None])
    assert rel_err(yc[7:], ref_c[0]) < 1e-5 and rel_err(conv_pool[0], fin_c[0]) < 1e-6
    assert rel_err(y[7:], ref_y[0]) < 1e-5 and rel_err(ssm_pool[0], fin_h[0]) < 1e-5
    for s in (1, 3):
        assert torch.equal(ssm_pool[s], ssm_before[s]) and torch.equal(conv_pool[s], conv_before[s])
    # decode: a padded row leaves everything alone
    snap_ssm, snap_conv = ssm_pool.clone(), conv_pool.clone()
    xd = torch.randn(2, C)
    yd = conv_ops.conv_decode(xd, conv_pool, torch.tensor([-1, 2], dtype=torch.int32), weight, bias)
    ref, fin = conv_ops.causal_conv(xd[1][None, None], weight, bias, snap_conv[2][None])
    assert rel_err(yd[1], ref[0, 0]) < 1e-6 and torch.equal(conv_pool[2], fin[0])
    assert torch.equal(conv_pool[0], snap_conv[0])
    xs, dts, Bs, Cs = torch.randn(2, H, P), torch.randn(2, H), torch.randn(2, G, N), torch.randn(2, G, N)
    ys = ssd_ops.ssd_decode(xs, dts, A, Bs, Cs, D, dt_bias, lim, ssm_pool, torch.tensor([2, -1], dtype=torch.int32))
    ref, h = ssd_ref.ssd_recurrent(xs[0][None, None], dts[0][None, None], A, Bs[0][None, None], Cs[0][None, None],
                                   D, dt_bias, lim, snap_ssm[2][None])
    assert rel_err(ys[0], ref[0, 0]) < 1e-5 and rel_err(ssm_pool[2], h[0]) < 1e-6
    for s in (0, 1, 3):
        assert torch.equal(ssm_pool[s], snap_ssm[s])


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    """CPU tensors take the reference; CUDA ones the kernel unless
    STATEX_KERNELS=reference forces the reference. No GPU here, so a stand-in
    plays the CUDA tensor (the rule reads only ``is_cuda``)."""
    from types import SimpleNamespace

    from kernels import use_fast_path

    t, on_cuda = torch.zeros(1), SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("STATEX_KERNELS", raising=False)
    assert not use_fast_path(t)
    assert use_fast_path(on_cuda) and use_fast_path(on_cuda, None) and not use_fast_path(on_cuda, t)
    monkeypatch.setenv("STATEX_KERNELS", "reference")
    assert not use_fast_path(t)
    assert not use_fast_path(on_cuda)


def test_gla_prefill_offsets_converted_once_per_tensor():
    """fla caches chunk indices by the identity of ``cu_seqlens``: every layer of
    one forward must hand it the same int64 tensor, or each layer re-derives them
    with a host sync."""
    pytest.importorskip("triton")
    from kernels.gla.triton import _int64_offsets

    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    first = _int64_offsets(cu)
    assert first.dtype == torch.long and first.tolist() == [0, 5, 9]
    assert _int64_offsets(cu) is first                  # next layer, same forward
    other = _int64_offsets(torch.tensor([0, 5, 9], dtype=torch.int32))
    assert other is not first                           # a new forward's offsets
    already = torch.tensor([0, 3], dtype=torch.long)
    assert _int64_offsets(already) is already


def test_gemv_policy_follows_statex_gemv(monkeypatch):
    """Which projections take kernels.gemv: by default one row into an output at most
    AUTO_MAX_N wide (where it beat cuBLAS); STATEX_GEMV=1 every input of at most
    MAX_ROWS rows; STATEX_GEMV=0 none."""
    from kernels import gemv

    monkeypatch.delenv("STATEX_GEMV", raising=False)
    assert gemv.preferred(1, 2048) and gemv.preferred(1, gemv.AUTO_MAX_N)
    assert not gemv.preferred(1, gemv.AUTO_MAX_N + 1) and not gemv.preferred(2, 2048)
    monkeypatch.setenv("STATEX_GEMV", "1")
    assert gemv.preferred(gemv.MAX_ROWS, 32000) and not gemv.preferred(gemv.MAX_ROWS + 1, 2048)
    monkeypatch.setenv("STATEX_GEMV", "0")
    assert not gemv.preferred(1, 2048)
    monkeypatch.setenv("STATEX_GEMV", "yes")
    with pytest.raises(ValueError, match="STATEX_GEMV='yes'"):
        gemv.preferred(1, 2048)
