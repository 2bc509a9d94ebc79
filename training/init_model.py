"""A freshly initialised model (random weights + the byte-level tokenizer) in our
checkpoint format: the starting point for pre-training small models from
scratch, e.g. the bundled model (scripts/build_bundled_gla.sh).

    python -m training.init_model --family gla --hidden-size 256 --layers 6 --heads 4 --out DIR
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from model_registry import StateXGLAConfig, StateXGLAForCausalLM, StateXMamba2Config, StateXMamba2ForCausalLM
from model_registry.checkpoint import CheckpointError, save_checkpoint
from model_registry.configs import ConfigError
from model_registry.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, save_byte_tokenizer


def build_config(args: argparse.Namespace):
    common = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  tie_word_embeddings=args.tie_embeddings)
    if args.family == "gla":
        return StateXGLAConfig(num_heads=args.heads, expand_k=args.expand_k, expand_v=1.0,
                               max_position_embeddings=args.max_position_embeddings, **common)
    return StateXMamba2Config(state_size=args.state_size, head_dim=args.head_dim, expand=2, n_groups=1,
                              chunk_size=64, **common)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.init_model",
                                 description="Write a randomly initialised GLA or Mamba2 with the byte-level "
                                             "tokenizer, in statex-serve's checkpoint format.")
    ap.add_argument("--family", choices=("gla", "mamba2"), required=True)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4, help="GLA heads per layer")
    ap.add_argument("--expand-k", type=float, default=0.5, help="GLA key dim = hidden * expand_k")
    ap.add_argument("--state-size", type=int, default=32, help="Mamba2 d_state")
    ap.add_argument("--head-dim", type=int, default=32, help="Mamba2 head dim")
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--max-position-embeddings", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        config = build_config(args)
        torch.manual_seed(args.seed)
        model = (StateXGLAForCausalLM if args.family == "gla" else StateXMamba2ForCausalLM)(config)
        with tempfile.TemporaryDirectory() as tok:
            save_byte_tokenizer(tok)
            save_checkpoint(model, args.out, tokenizer_src=tok, overwrite=args.overwrite,
                            provenance={"kind": "random init", "family": args.family, "seed": args.seed,
                                        "command": " ".join(sys.argv)})
    except (ConfigError, CheckpointError) as e:
        print(f"init_model: error: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__}, {n / 1e6:.2f}M parameters, "
          f"state {model.state_spec().summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
