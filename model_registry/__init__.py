"""Model definitions for statex-serve: configs, torch modules, checkpoint
import/export, and the vLLM plugin.

Importing this package registers our configs and models with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads our
checkpoints.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from model_registry.configs import ConfigError, StateXGLAConfig, StateXMamba2Config
from model_registry.gla import StateXGLAForCausalLM
from model_registry.mamba2 import StateXMamba2ForCausalLM
from model_registry.state import StatePools, StateSpec

MODEL_TYPES = {
    StateXGLAConfig.model_type: (StateXGLAConfig, StateXGLAForCausalLM),
    StateXMamba2Config.model_type: (StateXMamba2Config, StateXMamba2ForCausalLM),
}
ARCHITECTURES = {cls.__name__: cls for _, cls in MODEL_TYPES.values()}


def register_with_transformers() -> None:
    """Idempotent: AutoConfig / AutoModelForCausalLM learn our model types."""
    for model_type, (config_cls, model_cls) in MODEL_TYPES.items():
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register_with_transformers()

__all__ = [
    "ARCHITECTURES", "MODEL_TYPES", "ConfigError", "StatePools", "StateSpec", "StateXGLAConfig",
    "StateXGLAForCausalLM", "StateXMamba2Config", "StateXMamba2ForCausalLM", "register_with_transformers",
]
