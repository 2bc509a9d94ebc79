"""The distribution installs what docs/install.md and pyproject.toml promise."""
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


def test_cpu_serving_needs_neither_vllm_nor_fla(tmp_path):
    """`make serve` installs no vLLM, and fla is imported only on CUDA: the
    native engine loads and generates on CPU with both shadowed by modules that
    fail on import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from model_registry.testing import make_tiny_checkpoint

    blockers = tmp_path / "blockers"
    for name in ("vllm", "fla", "triton"):
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} is not needed on CPU')\n")
    ckpt = make_tiny_checkpoint(tmp_path / "gla", "gla")
    code = (
        "import asyncio\n"
        "from statex_serve.engine import EngineArgs, GenerationRequest, SamplingParams, create_engine\n"
        f"engine = create_engine(EngineArgs(model={str(ckpt)!r}, max_num_seqs=2), 'native')\n"
        "async def main():\n"
        "    await engine.start()\n"
        "    req = GenerationRequest('r', [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))\n"
        "    n = sum(len(d.token_ids) for out in [o async for o in engine.generate(req)] for d in out.outputs)\n"
        "    await engine.shutdown()\n"
        "    print('tokens', n)\n"
        "asyncio.run(main())\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blockers), str(root)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0 and "tokens 4" in proc.stdout, proc.stderr[-2000:]
    deps = distribution("statex-serve").requires or []
    assert not [d for d in deps if d.startswith(("vllm", "triton")) and "extra ==" not in d]
