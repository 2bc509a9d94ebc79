"""Tiny models and checkpoints for tests, examples and CI (no hub needed)."""
from __future__ import annotations

from pathlib import Path

import torch

from model_registry.checkpoint import save_checkpoint
from model_registry.configs import StateXGLAConfig, StateXMamba2Config
from model_registry.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, save_byte_tokenizer


def tiny_gla_config(expanded: bool = True, num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4,
                    vocab_size: int = BYTE_VOCAB_SIZE, widen: bool = False, **kw) -> StateXGLAConfig:
    """Layers 0 and 2 expanded when ``expanded`` (mixed expanded/unexpanded): merged to one
    head, or with ``widen`` keeping their heads with 4x the key dim per head and the base's
    score scale (what ``--init preserve`` makes)."""
    key_dim = hidden_size // 2
    grown = [expanded and i % 2 == 0 for i in range(num_layers)]
    heads = [1 if g and not widen else num_heads for g in grown]
    if widen:
        kw.setdefault("layer_key_dim", [4 * key_dim if g else key_dim for g in grown])
        kw.setdefault("layer_attn_scale", [(key_dim // num_heads) ** -0.5 if g else None for g in grown])
    return StateXGLAConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_heads=num_heads, layer_num_heads=heads, expand_k=0.5, expand_v=1.0,
                           intermediate_size=2 * hidden_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                           pad_token_id=PAD_ID, **kw)


def tiny_mamba2_config(expanded: bool = True, num_layers: int = 4, hidden_size: int = 64, state_size: int = 16,
                       vocab_size: int = BYTE_VOCAB_SIZE, **kw) -> StateXMamba2Config:
    """Layers 0 and 2 with 4x d_state when ``expanded``."""
    sizes = [4 * state_size if (expanded and i % 2 == 0) else state_size for i in range(num_layers)]
    kw.setdefault("head_dim", 16)
    kw.setdefault("chunk_size", 32)
    kw.setdefault("n_groups", 1)
    return StateXMamba2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                              state_size=state_size, layer_state_size=sizes, expand=2,
                              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kw)


def build_tiny_model(family: str = "gla", expanded: bool = True, seed: int = 0, **kw):
    from model_registry import StateXGLAForCausalLM, StateXMamba2ForCausalLM

    torch.manual_seed(seed)
    if family == "gla":
        return StateXGLAForCausalLM(tiny_gla_config(expanded, **kw)).eval()
    if family == "mamba2":
        return StateXMamba2ForCausalLM(tiny_mamba2_config(expanded, **kw)).eval()
    raise ValueError(f"unknown family {family!r} (gla, mamba2)")


def make_tiny_checkpoint(out_dir: str | Path, family: str = "gla", expanded: bool = True, seed: int = 0,
                         overwrite: bool = True, **kw) -> Path:
    """A random tiny model with the byte-level tokenizer, in our checkpoint format."""
    model = build_tiny_model(family, expanded, seed, **kw)
    tok_dir = Path(out_dir).parent / f".{Path(out_dir).name}-tokenizer"
    save_byte_tokenizer(tok_dir)
    try:
        save_checkpoint(model, out_dir, tokenizer_src=tok_dir, overwrite=overwrite,
                        provenance={"kind": "random tiny test model", "family": family, "seed": seed})
    finally:
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
    return Path(out_dir)
