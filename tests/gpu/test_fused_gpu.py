"""GPU: the fused decode path against the unfused eager one.

On CUDA inference the elementwise chains of ``model_registry.layers`` run
``torch.compile``d (one kernel each) and the projections that share an input
run as one GEMM. Each compiled op is compared with its own eager function on
fresh random inputs, and a whole bf16 model's prefill + decode (decode from the
runner's CUDA graphs, as served) with the same model unfused and eager.
``pytest -m gpu``."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from model_registry import layers
from model_registry.gla import gla_log_decay
from model_registry.testing import build_tiny_model
from statex_serve.engine.runner import ModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"


def _close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
@torch.inference_mode()
def test_compiled_ops_equal_their_eager_functions(dtype, rows):
    g = torch.Generator(device=DEV).manual_seed(rows)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=DEV).to(dt)

    D, H, V = 256, 4, 64
    w = rnd(D) + 1
    cases = [
        (layers.rms_norm, (rnd(rows, D), w, 1e-6)),
        (layers.cast_rms_norm, (rnd(rows, D, dt=torch.float32), w, 1e-5)),
        (layers.add_rms_norm, (rnd(rows, D), rnd(rows, D), w, 1e-6)),
        (layers.add_rms_norm, (rnd(rows, D, dt=torch.float32), rnd(rows, D), w, 1e-5, True)),
        (layers.gated_rms_norm, (rnd(rows, D), rnd(rows, D), w, 64, 1e-5)),
        (layers.head_rms_norm_swish_gate, (rnd(rows, H, V, dt=torch.float32), rnd(rows, H, V), rnd(V), 1e-6)),
        (layers.swiglu, (rnd(rows, D), rnd(rows, D))),
        (gla_log_decay, (rnd(rows, D), 16.0, None)),
        (gla_log_decay, (rnd(rows, D), 16.0, -5.0)),
    ]
    for fn, args in cases:
        got, want = fn(*args), fn.eager(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.dtype == b.dtype and a.shape == b.shape, fn.__name__
            _close(a, b, dtype)


@pytest.mark.parametrize("gemv", ["0", "auto", "1"], ids=["cublas", "gemv-auto", "gemv-all"])
@pytest.mark.parametrize("family", ["gla", "gla_conv", "mamba2"])
def test_fused_model_matches_unfused_eager(family, gemv, monkeypatch):
    """The fused, compiled, graph-captured decode (STATEX_GEMV: every projection through cuBLAS,
    the default policy, or every decode-sized one through kernels.gemv) against the unfused eager
    model, teacher-forced over prefill and 12 steps."""
    torch.manual_seed(0)
    kw = {"use_short_conv": True} if family == "gla_conv" else {}
    ref = build_tiny_model(family.removesuffix("_conv"), expanded=True, seed=11, **kw).to(DEV, torch.bfloat16).eval()
    fused = copy.deepcopy(ref)
    fused.fuse_projections_()
    V = ref.config.vocab_size
    lens = [37, 5, 64]
    ids = torch.randint(0, V, (sum(lens),), device=DEV)
    cu = torch.tensor([0, 37, 42, 106], dtype=torch.int32, device=DEV)
    fresh = torch.zeros(3, dtype=torch.bool, device=DEV)

    tokens = torch.randint(0, V, (12, 3), device=DEV)     # the same inputs for both: teacher forcing

    def run(model, runner):
        slots = torch.arange(3, dtype=torch.int32, device=DEV)
        with torch.inference_mode():
            logits = [model.prefill(ids, cu, slots, fresh, runner.pools)]
            for tok in tokens:    # the graph's output buffer is reused: keep a copy
                logits.append(runner.decode(tok.tolist(), slots.tolist()).clone())
        return torch.stack(logits)

    monkeypatch.setenv("STATEX_GEMV", gemv)
    runner = ModelRunner(fused, 4, torch.device(DEV), None)
    assert runner.graphs is not None
    got = run(fused, runner)
    monkeypatch.setenv("STATEX_GEMV", "0")
    monkeypatch.setenv("STATEX_COMPILE", "0")
    want = run(ref, ModelRunner(ref, 4, torch.device(DEV), None, cuda_graphs=False))
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 2e-2, rel
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    assert os.environ["STATEX_COMPILE"] == "0"


@pytest.mark.parametrize("family", ["gla", "gla_conv", "mamba2"])
def test_prefill_graphs_equal_the_eager_prefill(family):
    """The runner's captured one-segment prefills (a prompt padded up to its token
    bucket) against the eager unpadded prefill of the same fp32 model: the last
    logits, the prompt's slot state and every other slot, for prompts below, at and
    between buckets, fresh and carried on from a state."""
    torch.manual_seed(0)
    kw = {"use_short_conv": True} if family == "gla_conv" else {}
    model = build_tiny_model(family.removesuffix("_conv"), expanded=True, seed=5, **kw).to(DEV).eval()
    model.fuse_projections_()
    runner = ModelRunner(model, 4, torch.device(DEV), None, prefill_graph_tokens=200)
    assert runner.prefill_graphs is not None and runner.prefill_graphs.buckets == [64, 96, 128, 192, 200]
    eager = model.allocate_state_pools(4)
    V = model.config.vocab_size
    for layer, ref_layer in zip(runner.pools.pools, eager.pools):
        for k, t in layer.items():
            t.normal_()
            ref_layer[k].copy_(t)
    with torch.inference_mode():
        for T, slot, carried in [(1, 0, False), (3, 1, False), (64, 2, False), (65, 0, True), (150, 1, True),
                                 (200, 2, True), (7, 3, True)]:
            ids = torch.randint(0, V, (T,), device=DEV)
            got = runner.prefill(ids.tolist(), [T], [slot], [carried])
            want = model.prefill(ids, torch.tensor([0, T], dtype=torch.int32, device=DEV),
                                 torch.tensor([slot], dtype=torch.int32, device=DEV),
                                 torch.tensor([carried], device=DEV), eager)
            # tf32 dots inside the library kernels: not bitwise, but far below a masking error (O(1))
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
            for layer, ref_layer in zip(runner.pools.pools, eager.pools):
                for k, t in layer.items():
                    torch.testing.assert_close(t, ref_layer[k], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("family", ["gla", "gla_conv", "mamba2"])
def test_graphed_burst_equals_one_varlen_prefill(family):
    """Bursts of prompt segments through the captured lanes graphs (S lanes of L
    tokens, a lane left unused), against one eager variable-length prefill of the
    same segments: every segment's last logits and every slot's state."""
    torch.manual_seed(1)
    kw = {"use_short_conv": True} if family == "gla_conv" else {}
    model = build_tiny_model(family.removesuffix("_conv"), expanded=True, seed=6, **kw).to(DEV).eval()
    model.fuse_projections_()
    runner = ModelRunner(model, 5, torch.device(DEV), None, prefill_graph_tokens=512)
    eager = model.allocate_state_pools(5)
    for layer, ref_layer in zip(runner.pools.pools, eager.pools):
        for k, t in layer.items():
            t.normal_()
            ref_layer[k].copy_(t)
    for lens, slots, carried, key in [([5, 130], [0, 1], [False, True], (2, 256)),
                                      ([5, 100, 64], [2, 4, 3], [True, True, False], (4, 128)),
                                      ([128, 1, 64, 77], [1, 0, 3, 4], [True, False, True, True], (4, 128))]:
        assert runner.prefill_graphs.key_for(lens) == key
        ids = torch.randint(0, model.config.vocab_size, (sum(lens),), device=DEV)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        with torch.inference_mode():
            got = runner.prefill(ids.tolist(), lens, slots, carried)
            want = model.prefill(ids, cu, torch.tensor(slots, dtype=torch.int32, device=DEV),
                                 torch.tensor(carried, device=DEV), eager)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        for layer, ref_layer in zip(runner.pools.pools, eager.pools):
            for k, t in layer.items():
                torch.testing.assert_close(t, ref_layer[k], rtol=2e-3, atol=2e-3)
