"""GPU tests: the Triton kernels (through the public dispatch) against the torch
references in float64, on fresh random inputs every run.

Checks, for every case: outputs are fully written (the allocator is poisoned
with NaN first), named slots match the reference within the dtype's tolerance,
padded rows (slot -1) touch nothing, and every slot not named stays
bit-identical. Run on the device: ``pytest -m gpu tests/gpu``.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
SEED = int.from_bytes(os.urandom(4), "little")
ERRS: dict[str, float] = {}          # worst relative errors seen, dumped for the notes

# The 1.3B StateX shapes, and the tiny ones the engine and training tests' models
# use (tiny_gla_config / tiny_mamba2_config): fla and mamba-ssm must handle both.
GLA_SHAPES = {"gla_h4k256v512": (4, 256, 512), "gla_merged_h1k1024v2048": (1, 1024, 2048),
              "tiny_gla_h4k8v16": (4, 8, 16), "tiny_gla_merged_h1k32v64": (1, 32, 64)}
SSD_SHAPES = {"mamba2_h64p64n128": (64, 64, 128), "mamba2_h64p64n512": (64, 64, 512),
              "tiny_mamba2_h8p16n16": (8, 16, 16), "tiny_mamba2_h8p16n64": (8, 16, 64)}
# (input dtype, state-pool dtype): fp32 everywhere; bf16 activations with the
# default fp32 pool (what serving runs); bf16 everywhere.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
DT_IDS = ["f32-f32", "bf16-f32", "bf16-bf16"]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("STATEX_TEST_ERRS")
    if path:
        with open(path, "w") as f:
            json.dump({"seed": SEED, "worst_rel_err": ERRS}, f, indent=1, sort_keys=True)


def _gen(tag: str) -> torch.Generator:
    g = torch.Generator(device=DEV)
    g.manual_seed(SEED ^ (hash(tag) & 0x7FFFFFFF))
    return g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(name, got, ref, tol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?) seed={SEED}"
    err = _rel(got, ref)
    ERRS[name] = err
    assert err <= tol, f"{name}: rel err {err:.3e} > {tol:g} (seed={SEED})"


def _tol_state(pool_dtype, in_dtype):
    if pool_dtype == torch.bfloat16:
        return 1e-2
    return 1e-5 if in_dtype == torch.float32 else 1e-5


def _tol_out(in_dtype):
    return 1e-5 if in_dtype == torch.float32 else 1e-2


def _tol_prefill_out(in_dtype):
    return 1e-4 if in_dtype == torch.float32 else 1e-2


def _tol_prefill_state(pool_dtype, in_dtype):
    return 1e-5 if (in_dtype == torch.float32 and pool_dtype == torch.float32) else 1e-2


def _poison_allocator(*tensors_like):
    """Fill soon-to-be-reused allocator blocks with NaN so unwritten outputs show."""
    for t in tensors_like:
        p = torch.empty_like(t)
        p.fill_(float("nan"))
        del p


def _slots(B: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    s = torch.randperm(num_slots, generator=gen, device=DEV)[:B]
    if B >= 3:
        s[1] = -1                      # a padded row
    if B >= 64:
        s[B // 2] = -1
    return s.to(torch.int32 if B % 2 else torch.int64)


def _pool(num_slots, shape, dtype, gen):
    p = torch.randn(num_slots, *shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)
    return p


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _check_untouched(pool, before, slots):
    named = set(int(s) for s in slots.tolist() if s >= 0)
    others = [i for i in range(pool.shape[0]) if i not in named]
    idx = torch.tensor(others, device=DEV, dtype=torch.long)
    assert torch.equal(_bits(pool.index_select(0, idx)), _bits(before.index_select(0, idx))), \
        f"slots not named were modified (seed={SEED})"


def _named(slots):
    return slots.to(torch.long)[slots >= 0]


def _lengths(B: int, gen: torch.Generator):
    if B == 1:
        return [int(torch.randint(600, 1100, (1,), generator=gen, device=DEV))]
    if B == 3:
        return [int(torch.randint(257, 700, (1,), generator=gen, device=DEV)), 1, 129]
    return [int(v) for v in torch.randint(1, 90, (B,), generator=gen, device=DEV).tolist()]


def _has_init(B: int, gen: torch.Generator) -> torch.Tensor:
    h = torch.rand(B, generator=gen, device=DEV) < 0.6
    h[0] = True
    if B > 1:
        h[-1] = False
    return h


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEV)


def _tok_mask(lengths, slots):
    return torch.cat([torch.full((n,), bool(s >= 0), device=DEV) for n, s in zip(lengths, slots.tolist())])


def _pool_and_slots(tag, B, slot_shape, dtype):
    """A case's generator, a random pool of 2B+3 slots, its copy, and the B slots named (some padded)."""
    gen = _gen(tag)
    ns = 2 * B + 3
    pool = _pool(ns, slot_shape, dtype, gen)
    before = pool.clone()
    return gen, pool, before, _slots(B, ns, gen)


def _check_call(name, out, out_ref, rows, out_tol, pool, ref_pool, before, slots, state_tol):
    """The kernel's output rows and named slots against the reference; every other slot untouched."""
    torch.cuda.synchronize()
    _check(name, out[rows], out_ref[rows], out_tol)
    _check(name.replace("_out", "_state"), pool[_named(slots)], ref_pool[_named(slots)], state_tol)
    _check_untouched(pool, before, slots)


# ----------------------------------------------------------------------------- GLA

def _gla_inputs(n, H, K, V, dtype, gen):
    q = torch.randn(n, H, K, generator=gen, device=DEV).to(dtype)
    k = torch.randn(n, H, K, generator=gen, device=DEV).to(dtype)
    v = torch.randn(n, H, V, generator=gen, device=DEV).to(dtype)
    g = (F.logsigmoid(torch.randn(n, H, K, generator=gen, device=DEV)) / 16).to(dtype)
    return q, k, v, g


@pytest.mark.parametrize("dtypes", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("shape", list(GLA_SHAPES), ids=list(GLA_SHAPES))
def test_gla_decode(shape, B, dtypes):
    from kernels.gla import gla_decode, reference

    H, K, V = GLA_SHAPES[shape]
    in_dt, pool_dt = dtypes
    gen, pool, before, slots = _pool_and_slots(f"gla_decode{shape}{B}{dtypes}", B, (H, K, V), pool_dt)
    q, k, v, g = _gla_inputs(B, H, K, V, in_dt, gen)
    scale = K ** -0.5
    ref_pool = pool.double()
    o_ref = reference.gla_decode(q.double(), k.double(), v.double(), g.double(), ref_pool, slots, scale)
    _poison_allocator(v)
    o = gla_decode(q, k, v, g, pool, slots, scale)
    _check_call(f"gla_decode_out[{shape}-{B}-{in_dt}-{pool_dt}]", o, o_ref, slots >= 0, _tol_out(in_dt),
                pool, ref_pool, before, slots, _tol_state(pool_dt, in_dt))


@pytest.mark.parametrize("dtypes", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("shape", list(GLA_SHAPES), ids=list(GLA_SHAPES))
def test_gla_prefill(shape, B, dtypes):
    from kernels.gla import gla_prefill, reference

    H, K, V = GLA_SHAPES[shape]
    in_dt, pool_dt = dtypes
    gen, pool, before, slots = _pool_and_slots(f"gla_prefill{shape}{B}{dtypes}", B, (H, K, V), pool_dt)
    lengths = _lengths(B, gen)
    cu = _cu(lengths)
    hinit = _has_init(B, gen)
    q, k, v, g = _gla_inputs(int(cu[-1]), H, K, V, in_dt, gen)
    scale = K ** -0.5
    ref_pool = pool.double()
    o_ref = reference.gla_prefill(q.double(), k.double(), v.double(), g.double(), ref_pool, slots, cu, hinit, scale)
    _poison_allocator(v)
    o = gla_prefill(q, k, v, g, pool, slots, cu, hinit, scale)
    _check_call(f"gla_prefill_out[{shape}-{B}-{in_dt}-{pool_dt}]", o, o_ref, _tok_mask(lengths, slots),
                _tol_prefill_out(in_dt), pool, ref_pool, before, slots, _tol_prefill_state(pool_dt, in_dt))


# -------------------------------------------------------------------------- Mamba2

def _ssd_params(H, gen, dt_limit):
    A = -torch.exp(torch.empty(H, device=DEV).uniform_(0.0, math.log(16.0), generator=gen))
    D = torch.randn(H, generator=gen, device=DEV)
    dt0 = torch.exp(torch.empty(H, device=DEV).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))            # inverse softplus
    return A, D, dt_bias


def _ssd_inputs(n, H, P, G, N, dtype, gen):
    x = torch.randn(n, H, P, generator=gen, device=DEV).to(dtype)
    dt = (torch.randn(n, H, generator=gen, device=DEV) * 0.5).to(dtype)
    Bm = torch.randn(n, G, N, generator=gen, device=DEV).to(dtype)
    Cm = torch.randn(n, G, N, generator=gen, device=DEV).to(dtype)
    return x, dt, Bm, Cm


def _d(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (1e-3, 0.05)], ids=["nolimit", "limit"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("shape", list(SSD_SHAPES), ids=list(SSD_SHAPES))
def test_ssd_decode(shape, B, dtypes, dt_limit):
    from kernels.mamba2 import reference, ssd_decode

    H, P, N = SSD_SHAPES[shape]
    G = 1 if B != 3 else 4               # also exercise several groups
    in_dt, pool_dt = dtypes
    gen, pool, before, slots = _pool_and_slots(f"ssd_decode{shape}{B}{dtypes}{dt_limit}", B, (H, P, N), pool_dt)
    A, D, dt_bias = _ssd_params(H, gen, dt_limit)
    x, dt, Bm, Cm = _ssd_inputs(B, H, P, G, N, in_dt, gen)
    ref_pool = pool.double()
    y_ref = reference.ssd_decode(*_d(x, dt, A, Bm, Cm, D, dt_bias), dt_limit, ref_pool, slots)
    _poison_allocator(x)
    y = ssd_decode(x, dt, A, Bm, Cm, D, dt_bias, dt_limit, pool, slots)
    _check_call(f"ssd_decode_out[{shape}-{B}-{in_dt}-{pool_dt}]", y, y_ref, slots >= 0, _tol_out(in_dt),
                pool, ref_pool, before, slots, _tol_state(pool_dt, in_dt))


@pytest.mark.parametrize("dtypes", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("shape", list(SSD_SHAPES), ids=list(SSD_SHAPES))
def test_ssd_prefill(shape, B, dtypes):
    from kernels.mamba2 import reference, ssd_prefill

    H, P, N = SSD_SHAPES[shape]
    G = 1 if B != 3 else 4
    in_dt, pool_dt = dtypes
    dt_limit = (0.0, math.inf) if B != 3 else (1e-3, 0.05)
    gen, pool, before, slots = _pool_and_slots(f"ssd_prefill{shape}{B}{dtypes}", B, (H, P, N), pool_dt)
    lengths = _lengths(B, gen)
    cu = _cu(lengths)
    hinit = _has_init(B, gen)
    A, D, dt_bias = _ssd_params(H, gen, dt_limit)
    x, dt, Bm, Cm = _ssd_inputs(int(cu[-1]), H, P, G, N, in_dt, gen)
    ref_pool = pool.double()
    y_ref = reference.ssd_prefill(*_d(x, dt, A, Bm, Cm, D, dt_bias), dt_limit, ref_pool, slots, cu, hinit)
    _poison_allocator(x)
    y = ssd_prefill(x, dt, A, Bm, Cm, D, dt_bias, dt_limit, pool, slots, cu, hinit)
    _check_call(f"ssd_prefill_out[{shape}-{B}-{in_dt}-{pool_dt}]", y, y_ref, _tok_mask(lengths, slots),
                _tol_prefill_out(in_dt), pool, ref_pool, before, slots, _tol_prefill_state(pool_dt, in_dt))


# ------------------------------------------------------------------------ conv

CONV_DIMS = {"mamba2_n128": 4096 + 2 * 128, "mamba2_n512": 4096 + 2 * 512,
             "tiny_mamba2_n16": 128 + 2 * 16, "tiny_mamba2_n64": 128 + 2 * 64,
             "gla_1p3b_qkv": 2 * 1024 + 2048, "tiny_gla_qkv": 2 * 32 + 64}     # GLA's use_short_conv


@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("shape", list(CONV_DIMS), ids=list(CONV_DIMS))
def test_conv_decode(shape, B, dtype, act):
    from kernels.conv import conv_decode, reference

    C, W = CONV_DIMS[shape], 4
    gen, pool, before, slots = _pool_and_slots(f"conv_decode{shape}{B}{dtype}{act}", B, (C, W - 1), dtype)
    x = torch.randn(B, C, generator=gen, device=DEV).to(dtype)
    w = (torch.randn(C, W, generator=gen, device=DEV) * 0.5).to(dtype)
    b = torch.randn(C, generator=gen, device=DEV).to(dtype)
    ref_pool = pool.double()
    y_ref = reference.conv_decode(x.double(), ref_pool, slots, w.double(), b.double(), act)
    _poison_allocator(x)
    y = conv_decode(x, pool, slots, w, b, act)
    torch.cuda.synchronize()
    m = slots >= 0
    name = f"conv_decode_out[{shape}-{B}-{dtype}]"
    _check(name, y[m], y_ref[m], _tol_out(dtype))
    # the window only shifts: exact
    assert torch.equal(_bits(pool[_named(slots)]), _bits(ref_pool[_named(slots)].to(dtype)))
    _check_untouched(pool, before, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("shape", list(CONV_DIMS), ids=list(CONV_DIMS))
def test_conv_prefill(shape, B, dtype):
    from kernels.conv import conv_prefill, reference

    C, W = CONV_DIMS[shape], 4
    gen, pool, before, slots = _pool_and_slots(f"conv_prefill{shape}{B}{dtype}", B, (C, W - 1), dtype)
    lengths = _lengths(B, gen)
    if B == 64:
        lengths[2], lengths[3] = 1, 2        # shorter than the window: state reaches back
    cu = _cu(lengths)
    hinit = _has_init(B, gen)
    x = torch.randn(int(cu[-1]), C, generator=gen, device=DEV).to(dtype)
    w = (torch.randn(C, W, generator=gen, device=DEV) * 0.5).to(dtype)
    b = torch.randn(C, generator=gen, device=DEV).to(dtype)
    ref_pool = pool.double()
    y_ref = reference.conv_prefill(x.double(), ref_pool, slots, cu, hinit, w.double(), b.double(), "silu")
    _poison_allocator(x)
    y = conv_prefill(x, pool, slots, cu, hinit, w, b, "silu")
    torch.cuda.synchronize()
    tm = _tok_mask(lengths, slots)
    name = f"conv_prefill_out[{shape}-{B}-{dtype}]"
    _check(name, y[tm], y_ref[tm], _tol_out(dtype))
    assert torch.equal(_bits(pool[_named(slots)]), _bits(ref_pool[_named(slots)].to(dtype)))
    _check_untouched(pool, before, slots)


# ----------------------------------------------------------------------------- gemv

@pytest.mark.parametrize("M", [1, 2, 3, 8])
@pytest.mark.parametrize("N,K", [(6160, 2048), (2048, 2048), (2048, 5632), (32000, 2048), (8512, 2048), (72, 40)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_gemv(N, K, M, dtype):
    """The decode projection kernel (through the dispatch) against float64, bias on and off."""
    from kernels.gemv import gemv, reference

    gen = _gen(f"gemv{N}{K}{M}{dtype}")
    x = torch.randn(M, K, generator=gen, device=DEV).to(dtype)
    w = (torch.randn(N, K, generator=gen, device=DEV) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=gen, device=DEV).to(dtype)
    for bias in (None, b):
        want = reference.gemv(x.double(), w.double(), None if bias is None else bias.double())
        _poison_allocator(torch.empty(M * N, device=DEV))      # the output's size: every element is written
        got = gemv(x, w, bias)
        assert got.dtype == dtype and got.shape == (M, N) and torch.isfinite(got).all()
        err = ((got.double() - want).norm() / want.norm()).item()
        ERRS[f"gemv N{N} K{K} M{M} {dtype}"] = max(err, ERRS.get(f"gemv N{N} K{K} M{M} {dtype}", 0.0))
        assert err <= 4e-3, f"relative error {err:.2e} (seed {SEED})"
