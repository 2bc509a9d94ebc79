"""Import upstream checkpoints into our format.

Supported sources (detected from config.json):
- fla GLA (``model_type: gla``; fla tensor names; ``attn_mode: fused_chunk`` tolerated),
- transformers Mamba2 (``model_type: mamba2``; safetensors),
- mamba_ssm Mamba2 (``d_model`` / ``n_layer`` / ``ssm_cfg``; ``pytorch_model.bin``).

Tensor names stay the upstream ones (fla GLA; HF Mamba2), so import is a rename
at most. The result is loaded into our model with strict shape checks before
anything is written.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from model_registry.checkpoint import (CheckpointError, check_and_load, load_state_dict, read_config_dict,
                                       save_checkpoint)
from model_registry.configs import ConfigError, StateXGLAConfig, StateXMamba2Config

SUPPORTED_SOURCES = ("gla (fla)", "mamba2 (transformers)", "mamba_ssm Mamba2 (d_model/n_layer/ssm_cfg)",
                     "statex_gla", "statex_mamba2")

# transformers' bookkeeping keys that must not leak into our config
_HF_META = {"architectures", "auto_map", "transformers_version", "model_type", "_name_or_path", "torch_dtype",
            "dtype", "attn", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy",
            "use_l2warp", "attnres_block_size", "use_cache", "output_attentions", "output_hidden_states"}


def detect_format(cfg: dict) -> str:
    mt = cfg.get("model_type")
    if mt in ("gla", "mamba2", "statex_gla", "statex_mamba2"):
        return mt
    if "d_model" in cfg and "n_layer" in cfg:
        layer = (cfg.get("ssm_cfg") or {}).get("layer", "Mamba1")
        if layer != "Mamba2":
            raise ConfigError(f"mamba_ssm checkpoint with ssm_cfg.layer={layer!r}: only Mamba2 is supported")
        return "mamba_ssm"
    raise ConfigError(f"unknown model_type {mt!r}; supported sources: {', '.join(SUPPORTED_SOURCES)}")


def gla_config_from_fla(cfg: dict) -> StateXGLAConfig:
    if cfg.get("attn"):
        raise ConfigError("fla GLA with hybrid softmax-attention layers (`attn`) is not supported")
    kw = {k: v for k, v in cfg.items() if k not in _HF_META}
    return StateXGLAConfig(**kw)


def mamba2_config_from_hf(cfg: dict) -> StateXMamba2Config:
    kw = {k: v for k, v in cfg.items() if k not in _HF_META}
    kw.setdefault("num_heads", kw.get("expand", 2) * kw["hidden_size"] // kw.get("head_dim", 64))
    # transformers' gated norm runs over all of d_inner, whatever n_groups is
    kw["norm_group_size"] = kw.get("expand", 2) * kw["hidden_size"]
    return StateXMamba2Config(**kw)


def mamba2_config_from_mamba_ssm(cfg: dict) -> StateXMamba2Config:
    ssm = dict(cfg.get("ssm_cfg") or {})
    if cfg.get("d_intermediate", 0):
        raise ConfigError("mamba_ssm checkpoint with an MLP per block (d_intermediate > 0) is not supported")
    if cfg.get("attn_layer_idx"):
        raise ConfigError("mamba_ssm checkpoint with attention layers (attn_layer_idx) is not supported")
    if ssm.get("D_has_hdim") or ssm.get("norm_before_gate") or ssm.get("rmsnorm") is False:
        raise ConfigError("mamba_ssm Mamba2 options D_has_hdim / norm_before_gate / rmsnorm=False are not supported")
    vocab = cfg["vocab_size"]
    mult = cfg.get("pad_vocab_size_multiple", 8)
    if vocab % mult:
        vocab += mult - vocab % mult
    d_model, expand, headdim = cfg["d_model"], ssm.get("expand", 2), ssm.get("headdim", 64)
    ngroups = ssm.get("ngroups", 1)
    return StateXMamba2Config(
        vocab_size=vocab, hidden_size=d_model, num_hidden_layers=cfg["n_layer"],
        state_size=ssm.get("d_state", 128), head_dim=headdim, expand=expand, n_groups=ngroups,
        conv_kernel=ssm.get("d_conv", 4), use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True),
        time_step_limit=tuple(ssm.get("dt_limit", (0.0, math.inf))), time_step_min=ssm.get("dt_min", 0.001),
        time_step_max=ssm.get("dt_max", 0.1), time_step_floor=ssm.get("dt_init_floor", 1e-4),
        chunk_size=ssm.get("chunk_size", 256), layer_norm_epsilon=cfg.get("norm_epsilon", 1e-5),
        norm_group_size=expand * d_model // ngroups, residual_in_fp32=cfg.get("residual_in_fp32", True),
        tie_word_embeddings=cfg.get("tie_embeddings", True), eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )


def rename_fla_gla(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # fla's unfused variant names the output norm `g_norm`; the math is the same
    return {k.replace(".attn.g_norm.", ".attn.g_norm_swish_gate."): v for k, v in sd.items()}


def rename_mamba_ssm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}


def build_from_upstream(src: str | Path):
    """Read an upstream (or our own) checkpoint dir into one of our models (CPU, fp32 as stored)."""
    from model_registry import StateXGLAForCausalLM, StateXMamba2ForCausalLM

    cfg = read_config_dict(src)
    fmt = detect_format(cfg)
    if fmt in ("gla", "statex_gla"):
        config = gla_config_from_fla(cfg) if fmt == "gla" else StateXGLAConfig.from_dict(cfg)
        model_cls, rename = StateXGLAForCausalLM, rename_fla_gla
    elif fmt in ("mamba2", "statex_mamba2"):
        config = mamba2_config_from_hf(cfg) if fmt == "mamba2" else StateXMamba2Config.from_dict(cfg)
        model_cls, rename = StateXMamba2ForCausalLM, (lambda sd: sd)
    else:
        config = mamba2_config_from_mamba_ssm(cfg)
        model_cls, rename = StateXMamba2ForCausalLM, rename_mamba_ssm
    sd = rename(load_state_dict(src))
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu")
    check_and_load(model, sd, src, allow_missing=("lm_head.weight",) if config.tie_word_embeddings else ())
    return model.eval(), fmt


def import_checkpoint(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert ``src`` (any supported format) to our format at ``out`` (atomic)."""
    model, fmt = build_from_upstream(src)
    provenance = {"imported_from": str(Path(src).resolve()), "source_format": fmt,
                  "state_bytes_per_sequence": model.state_spec().bytes_per_sequence,
                  "parameters": sum(p.numel() for p in model.parameters())}
    return save_checkpoint(model, out, tokenizer_src=src, provenance=provenance, overwrite=overwrite)


__all__ = ["CheckpointError", "SUPPORTED_SOURCES", "build_from_upstream", "detect_format", "import_checkpoint"]
