"""Our Triton kernels on the CPU, through Triton's interpreter, against the torch
references: so CI (no GPU) checks the kernel code itself, not just the
references, with every launch configuration ``decode_config`` picks for the
benchmark shapes, slot -1 rows, fresh and carried states, and slots that are
not named left bit-identical.

The interpreter must be on before ``triton.jit`` decorates anything, so the
cases run in a child pytest with ``TRITON_INTERPRET=1`` (the one test CI sees
here starts it). Run them directly with
``TRITON_INTERPRET=1 pytest tests/test_kernels_interpreted.py``.

The library kernels our prefill wraps (fla ``chunk_gla``, mamba-ssm's chunk
scan) are replaced by torch stand-ins built from our references: what is
checked is our part, the slot handling around them and the initial-state
correction kernel of varlen Mamba2 prefill. Speed is meaningless here; the
GPU tests (tests/gpu) run the real thing.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# fresh inputs every run; a failure names the seed (STATEX_TEST_SEED=... repeats it)
SEED = int(os.environ.get("STATEX_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs in the child pytest with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "not test_triton_kernels_under_the_interpreter"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


# --------------------------------------------------------------------------- helpers

# the benchmark shapes (docs/perf.md) and the test models' tiny ones; Mamba2 with
# 4 heads instead of 64 (a tile's correctness does not depend on the head count)
GLA_SHAPES = [(4, 256, 512), (1, 1024, 2048), (4, 8, 16), (1, 32, 64)]
SSD_SHAPES = [(4, 64, 128), (4, 64, 512), (8, 16, 16), (8, 16, 64)]
BENCH_BATCHES = (1, 2, 8, 64, 256)
DTYPES = [torch.float32, torch.bfloat16]


def _gen(*tag) -> torch.Generator:
    return torch.Generator().manual_seed(SEED ^ zlib.crc32(repr(tag).encode()))


def _slots(B, num_slots, gen):
    s = torch.randperm(num_slots, generator=gen)[:B].to(torch.int32)
    if B >= 3:
        s[1] = -1
    return s


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _assert_others_untouched(pool, before, slots):
    named = {int(s) for s in slots.tolist() if s >= 0}
    others = torch.tensor([i for i in range(pool.shape[0]) if i not in named], dtype=torch.long)
    assert torch.equal(_bits(pool[others]), _bits(before[others])), f"a slot that was not named changed (STATEX_TEST_SEED={SEED})"


def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:g} (STATEX_TEST_SEED={SEED})"


def _state_tol(pool_dtype):
    return 1e-2 if pool_dtype == torch.bfloat16 else 1e-5


def _prefill_batch(lengths, state_shape, pool_dtype, gen, num_slots=9):
    """A pool, the slots of ``lengths`` sequences (one -1 from 3 up), which of
    them carry a state in (every other one), and their offsets."""
    n = len(lengths)
    pool = torch.randn(num_slots, *state_shape, generator=gen).to(pool_dtype)
    slots = _slots(n, num_slots, gen)
    has_init = torch.tensor([i % 2 == 0 for i in range(n)])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return pool, slots, has_init, cu


def _check_prefill(out, out_ref, pool, ref_pool, before, slots, lengths, out_tol=1e-5, exact_state=False):
    tok = torch.cat([torch.full((L,), bool(s >= 0)) for L, s in zip(lengths, slots.tolist())])
    named = slots[slots >= 0].long()
    _close(out[tok], out_ref[tok], out_tol, "output")
    if exact_state:
        assert torch.equal(_bits(pool[named]), _bits(ref_pool[named].to(pool.dtype))), "states"
    else:
        _close(pool[named], ref_pool[named], _state_tol(pool.dtype), "state")
    _assert_others_untouched(pool, before, slots)


def _configs(decode_config, shape, state_bytes):
    """Every distinct launch configuration decode_config picks at the bench batches."""
    return sorted({decode_config(B, *shape, state_bytes) for B in BENCH_BATCHES})


# ------------------------------------------------------------------------------ GLA

@interpreted
@pytest.mark.parametrize("pool_dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", GLA_SHAPES, ids=lambda s: "H{}K{}V{}".format(*s))
def test_gla_decode_every_config(shape, pool_dtype):
    from kernels.gla import reference
    from kernels.gla import triton as fast

    H, K, V = shape
    gen = _gen("gla_decode", shape, str(pool_dtype))
    for cfg in _configs(fast.decode_config, shape, torch.finfo(pool_dtype).bits // 8):
        B, ns = 3, 7
        pool = torch.randn(ns, H, K, V, generator=gen).to(pool_dtype)
        before = pool.clone()
        slots = _slots(B, ns, gen)
        q, k = torch.randn(B, H, K, generator=gen), torch.randn(B, H, K, generator=gen)
        v = torch.randn(B, H, V, generator=gen)
        g = F.logsigmoid(torch.randn(B, H, K, generator=gen)) / 16
        ref = pool.double()
        o_ref = reference.gla_decode(q.double(), k.double(), v.double(), g.double(), ref, slots, K ** -0.5)
        o = fast.gla_decode_launch(q, k, v, g, pool, slots, K ** -0.5, *cfg)
        m = slots >= 0
        named = slots[m].long()
        _close(o[m], o_ref[m], 1e-5, f"output {cfg}")
        _close(pool[named], ref[named], _state_tol(pool_dtype), f"state {cfg}")
        _assert_others_untouched(pool, before, slots)


def _fake_chunk_gla(q, k, v, g, scale, initial_state=None, output_final_state=True, cu_seqlens=None):
    """fla ``chunk_gla``'s contract (packed batch of one with cu_seqlens, fp32
    states), computed by our reference."""
    from kernels.gla import reference

    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    outs, finals = [], []
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        h0 = None if initial_state is None else initial_state[i:i + 1]
        o, S = reference.gla_chunk(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], scale, h0)
        outs.append(o)
        finals.append(S.float())
    return torch.cat(outs, 1), torch.cat(finals, 0)


@interpreted
@pytest.mark.parametrize("pool_dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("lengths", [[37], [9, 1, 30, 17]], ids=["one", "varlen"])
def test_gla_prefill_slot_handling(lengths, pool_dtype, monkeypatch):
    import fla.ops.gla

    from kernels.gla import reference
    from kernels.gla import triton as fast

    monkeypatch.setattr(fla.ops.gla, "chunk_gla", _fake_chunk_gla)
    H, K, V = 2, 16, 32
    gen = _gen("gla_prefill", lengths, str(pool_dtype))
    pool, slots, has_init, cu = _prefill_batch(lengths, (H, K, V), pool_dtype, gen)
    before, T = pool.clone(), int(cu[-1])
    q, k = torch.randn(T, H, K, generator=gen), torch.randn(T, H, K, generator=gen)
    v = torch.randn(T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(T, H, K, generator=gen)) / 16
    ref = pool.double()
    o_ref = reference.gla_prefill(q.double(), k.double(), v.double(), g.double(), ref, slots, cu, has_init,
                                  K ** -0.5)
    o = fast.gla_prefill(q, k, v, g, pool, slots, cu, has_init, K ** -0.5)
    _check_prefill(o, o_ref, pool, ref, before, slots, lengths)


# --------------------------------------------------------------------------- Mamba2

def _ssd_params(H, gen):
    A = -torch.exp(torch.rand(H, generator=gen) * math.log(16.0))
    D = torch.randn(H, generator=gen)
    dt0 = torch.exp(torch.rand(H, generator=gen) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
    return A, D, dt0 + torch.log(-torch.expm1(-dt0))


@interpreted
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (1e-3, 0.05)], ids=["nolimit", "limit"])
@pytest.mark.parametrize("pool_dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=lambda s: "H{}P{}N{}".format(*s))
def test_ssd_decode_every_config(shape, pool_dtype, dt_limit):
    from kernels.mamba2 import reference
    from kernels.mamba2 import triton as fast

    H, P, N = shape
    gen = _gen("ssd_decode", shape, str(pool_dtype), dt_limit)
    configs = _configs(fast.decode_config, (64, P, N), torch.finfo(pool_dtype).bits // 8)   # as at 64 heads
    for G, cfg in [(1, c) for c in configs] + [(2, configs[0])]:
        B, ns = 3, 7
        pool = torch.randn(ns, H, P, N, generator=gen).to(pool_dtype)
        before = pool.clone()
        slots = _slots(B, ns, gen)
        A, D, dt_bias = _ssd_params(H, gen)
        x, dt = torch.randn(B, H, P, generator=gen), torch.randn(B, H, generator=gen) * 0.5
        Bm, Cm = torch.randn(B, G, N, generator=gen), torch.randn(B, G, N, generator=gen)
        ref = pool.double()
        y_ref = reference.ssd_decode(*(t.double() for t in (x, dt, A, Bm, Cm, D, dt_bias)), dt_limit, ref, slots)
        y = fast.ssd_decode_launch(x, dt, A, Bm, Cm, D, dt_bias, dt_limit, pool, slots, *cfg)
        m = slots >= 0
        named = slots[m].long()
        _close(y[m], y_ref[m], 1e-5, f"output G={G} {cfg}")
        _close(pool[named], ref[named], _state_tol(pool_dtype), f"state G={G} {cfg}")
        _assert_others_untouched(pool, before, slots)


def _fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                                    dt_softplus=True, dt_limit=(0.0, math.inf), return_final_states=False,
                                    seq_idx=None, cu_seqlens=None, return_varlen_states=False):
    """mamba-ssm's contract as ``kernels.mamba2.triton.ssd_prefill`` uses it
    (one sequence with an initial state, or varlen from zero states), computed by
    our reference."""
    from kernels.mamba2 import reference

    assert dt_softplus
    if cu_seqlens is None:
        y, fin = reference.ssd_chunk(x, dt, A, B, C, D, dt_bias, dt_limit, initial_states)
        return y, fin.float()
    assert initial_states is None and return_varlen_states
    bounds = cu_seqlens.tolist()
    ys, fins = [], []
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        y, fin = reference.ssd_chunk(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, dt_bias, dt_limit)
        ys.append(y)
        fins.append(fin.float())
    return torch.cat(ys, 1), torch.cat(fins, 0)


@interpreted
@pytest.mark.parametrize("pool_dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("lengths", [[70], [40, 1, 75, 3], [300, 2]], ids=["one", "varlen", "varlen-long"])
def test_ssd_prefill_slot_handling_and_initial_state_kernel(lengths, pool_dtype, monkeypatch):
    from kernels.mamba2 import reference
    from kernels.mamba2 import triton as fast

    monkeypatch.setitem(sys.modules, "kernels.mamba2.mamba_ssm_ops",
                        types.SimpleNamespace(mamba_chunk_scan_combined=_fake_mamba_chunk_scan_combined))
    H, P, G, N = 4, 16, 2, 32
    gen = _gen("ssd_prefill", lengths, str(pool_dtype))
    pool, slots, has_init, cu = _prefill_batch(lengths, (H, P, N), pool_dtype, gen)
    before, T = pool.clone(), int(cu[-1])
    A, D, dt_bias = _ssd_params(H, gen)
    x, dt = torch.randn(T, H, P, generator=gen), torch.randn(T, H, generator=gen) * 0.5
    Bm, Cm = torch.randn(T, G, N, generator=gen), torch.randn(T, G, N, generator=gen)
    dt_limit = (0.0, math.inf)
    ref = pool.double()
    y_ref = reference.ssd_prefill(*(t.double() for t in (x, dt, A, Bm, Cm, D, dt_bias)), dt_limit, ref, slots, cu,
                                  has_init)
    y = fast.ssd_prefill(x, dt, A, Bm, Cm, D, dt_bias, dt_limit, pool, slots, cu, has_init)
    _check_prefill(y, y_ref, pool, ref, before, slots, lengths)


# ----------------------------------------------------------------------------- conv

@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("C", [160, 300], ids=["C160", "C300"])
def test_conv_decode_and_prefill(C, dtype):
    from kernels.conv import reference
    from kernels.conv import triton as fast

    W, ns = 4, 9
    gen = _gen("conv", C, str(dtype))
    w = (torch.randn(C, W, generator=gen) * 0.5).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype)
    # decode
    slots = _slots(3, ns, gen)
    pool = torch.randn(ns, C, W - 1, generator=gen).to(dtype)
    before, ref = pool.clone(), pool.double()
    x = torch.randn(3, C, generator=gen).to(dtype)
    y_ref = reference.conv_decode(x.double(), ref, slots, w.double(), b.double(), "silu")
    y = fast.conv_decode(x, pool, slots, w, b, "silu")
    m = slots >= 0
    _close(y[m], y_ref[m], 1e-5 if dtype == torch.float32 else 1e-2, "decode output")
    assert torch.equal(_bits(pool[slots[m].long()]), _bits(ref[slots[m].long()].to(dtype))), "window shift"
    _assert_others_untouched(pool, before, slots)
    # prefill: sequences shorter than the window reach back into their state
    lengths = [1, 5, 2, 40]         # every other one carries a state in; 1 and 2 reach back into it
    pool, slots, has_init, cu = _prefill_batch(lengths, (C, W - 1), dtype, gen, ns)
    before, ref = pool.clone(), pool.double()
    x = torch.randn(int(cu[-1]), C, generator=gen).to(dtype)
    y_ref = reference.conv_prefill(x.double(), ref, slots, cu, has_init, w.double(), b.double(), "silu")
    y = fast.conv_prefill(x, pool, slots, cu, has_init, w, b, "silu")
    # the new windows are copies of inputs and old windows: exact
    _check_prefill(y, y_ref, pool, ref, before, slots, lengths, 1e-5 if dtype == torch.float32 else 1e-2,
                   exact_state=True)


# ----------------------------------------------------------------------------- gemv

# (N, K) of the 1.3B shapes' decode projections: GLA's fused q|k|v|g|gk-low-rank, o_proj, MLP gate|up and
# down, the LM head; Mamba2's in_proj and out_proj. Every launch configuration gemv_config picks for them
# at 1-8 rows runs, on N cut to a few column blocks (N only sets how many blocks there are).
GEMV_SHAPES = [(6160, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048), (8512, 2048),
               (2048, 4096), (72, 40)]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_gemv_every_config(dtype):
    from kernels.gemv import reference
    from kernels.gemv import triton as fast

    gen = _gen("gemv", str(dtype))
    seen = set()
    for N, K in GEMV_SHAPES:
        for M in (1, 2, 3, 8):
            cfg = fast.gemv_config(M, N, K)
            if (cfg, K) in seen:
                continue
            seen.add((cfg, K))
            n = min(N, 32 * cfg[0] + 1)    # a ragged last block; enough outputs that bf16 rounding averages
            x = torch.randn(M, K + 3, generator=gen)[:, 3:].to(dtype)    # rows not contiguous with each other
            w = (torch.randn(n, K, generator=gen) / K ** 0.5).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            want = reference.gemv(x.double(), w.double(), b.double())
            got = fast.gemv_launch(x, w, b, *cfg)
            assert got.dtype == dtype and got.shape == (M, n)
            _close(got, want, 1e-5 if dtype == torch.float32 else 4e-3, f"gemv M{M} N{N} K{K} {cfg}")
    assert len({c for c, _ in seen}) >= 3, seen        # several block widths and depths
