"""The distribution installs what design.md promises."""
from __future__ import annotations

from importlib.metadata import distribution, entry_points

import pytest


def test_transformers_does_not_mistake_us_for_the_kernels_package():
    # transformers probes the PyPI package `kernels` by distribution version
    from transformers.utils import import_utils

    assert distribution("statex-serve").version.split(".")[:2] != ["0", "17"]
    assert import_utils.is_kernels_available() is False


def test_console_scripts_and_vllm_plugin_entry_point():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["statex-serve"] == "statex_serve.cli:main"
    assert scripts["statex-train"] == "training.cli:main"
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins["statex"] == "model_registry.vllm_plugin:register"


def test_auto_classes_load_our_checkpoints(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import model_registry  # noqa: F401  (registers the Auto classes)
    from model_registry.testing import make_tiny_checkpoint

    for family in ("gla", "mamba2"):
        ckpt = make_tiny_checkpoint(tmp_path / family, family)
        assert AutoConfig.from_pretrained(ckpt).model_type == f"statex_{family}"
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        assert type(model).__name__ in ("StateXGLAForCausalLM", "StateXMamba2ForCausalLM")
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


@pytest.mark.parametrize("family", ["gla", "mamba2"])
def test_bad_expansion_configs_are_rejected(family):
    from model_registry import ConfigError, StateXGLAConfig, StateXMamba2Config

    with pytest.raises(ConfigError):
        if family == "gla":
            StateXGLAConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, layer_num_heads=[3, 4])
        else:
            StateXMamba2Config(hidden_size=64, num_hidden_layers=2, head_dim=16, layer_state_size=[16])
