"""``torch.compile`` for the small elementwise chains of inference, on CUDA only.

A decode step of a 1.3B model is a few hundred tiny kernels: each RMSNorm is
~6 eager kernels (cast, square, mean, rsqrt, two multiplies, cast back), each
gate ~4. Inside a CUDA graph a kernel still costs a few microseconds however
little it does, so those chains, not the weight reads, set the time per token
(docs/perf.md). Compiling each chain makes it one fused Triton kernel.

Only pure tensor functions are compiled (no modules, no state kernels): the
compiler sees nothing it could break, and CPU runs, autograd (training) and
``STATEX_COMPILE=0`` take the eager function itself, so the math has one
definition. Compiled kernels persist in the inductor / Triton caches
(``statex_serve.engine.compile_cache``).
"""
from __future__ import annotations

import functools
import os

import torch


def compile_enabled() -> bool:
    return os.environ.get("STATEX_COMPILE", "1") != "0"


@functools.cache
def _configure_dynamo() -> None:
    import torch._dynamo.config as dynamo_config

    # one compiled graph per shape class (batch 1 vs many, one head vs several,
    # fp32 vs bf16 inputs): a few dozen in all, more than the default limit of 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)


def inference_compiled(fn):
    """``fn`` itself, or on CUDA without autograd its ``torch.compile``d twin
    (automatic dynamic shapes: after a second batch size or prompt length one
    graph serves them all, the feature dims stay static)."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if not (args[0].is_cuda and not torch.is_grad_enabled() and compile_enabled()) \
                or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            _configure_dynamo()
            compiled = torch.compile(fn, fullgraph=True)
        return compiled(*args, **kwargs)

    run.eager = fn
    return run
