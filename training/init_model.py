"""A freshly initialised model (random weights) in our checkpoint format: the
start of the training route without an upstream checkpoint (``statex-train
init``), and of the bundled model (scripts/build_bundled_gla.sh).

    statex-train init --family gla --size small --out DIR
    statex-train init --config path/to/config.json --out DIR

A named size uses the byte-level tokenizer (259 tokens); ``--config`` takes a
config.json of ours or of an upstream format that ``statex-train import``
reads, with the tokenizer files beside it (or the byte-level tokenizer when its
vocab_size is 259). ``python -m training.init_model`` is the same command.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from training.errors import UsageError

BYTE_VOCAB_SIZE = 259        # model_registry.tokenizer.BYTE_VOCAB_SIZE, without importing it (torch-free)

# Shapes, not parameter counts: with the 259-token byte vocabulary the embeddings
# are tiny, so "medium" has the layer shapes of fla-hub's GLA-340M / mamba2-130m.
SIZES = {
    "gla": {
        "tiny": dict(hidden_size=192, layers=4, heads=4),           # the bundled model's shape
        "small": dict(hidden_size=512, layers=8, heads=4),
        "medium": dict(hidden_size=1024, layers=24, heads=4),
        "large": dict(hidden_size=2048, layers=24, heads=4),
    },
    "mamba2": {
        "tiny": dict(hidden_size=128, layers=2, state_size=32, head_dim=32),
        "small": dict(hidden_size=512, layers=8, state_size=64, head_dim=64),
        "medium": dict(hidden_size=768, layers=24, state_size=128, head_dim=64),
        "large": dict(hidden_size=1024, layers=48, state_size=128, head_dim=64),
    },
}
SHAPE_ARGS = ("hidden_size", "layers", "heads", "state_size", "head_dim")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", choices=sorted(SIZES["gla"]),
                     help="a named shape (with --family); see docs/training.md for the table (default: tiny)")
    src.add_argument("--config", metavar="FILE",
                     help="a config.json (ours, fla GLA, transformers or mamba_ssm Mamba2) to instantiate; "
                          "tokenizer files are taken from its directory")
    p.add_argument("--family", choices=("gla", "mamba2"), help="architecture of a named size")
    p.add_argument("--hidden-size", type=int, help="override the size's hidden size")
    p.add_argument("--layers", type=int, help="override the size's layer count")
    p.add_argument("--heads", type=int, help="GLA: heads per layer")
    p.add_argument("--expand-k", type=float, default=0.5, help="GLA: key dim = hidden * expand_k")
    p.add_argument("--state-size", type=int, help="Mamba2: d_state")
    p.add_argument("--head-dim", type=int, help="Mamba2: head dim")
    p.add_argument("--tie-embeddings", action="store_true", help="share the input and output embeddings")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="context the model is meant for: what the server offers by default "
                        "(default: the config's; named sizes: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the arguments, before torch is imported."""
    if args.config is not None:
        if args.family is not None or any(getattr(args, k) is not None for k in SHAPE_ARGS):
            raise UsageError("--config describes the model: leave out --family and the shape options")
        path = Path(args.config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UsageError(f"--config {args.config}: no such file")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {args.config}: not valid JSON ({e})") from None
        args.config = str(path)
    elif args.family is None:
        raise UsageError("give --family gla|mamba2 (with --size) or --config FILE")
    for k in SHAPE_ARGS + ("max_position_embeddings",):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1, got {v}")
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"{args.out} already exists (pass --overwrite to replace it)")


def build_config(args: argparse.Namespace):
    from model_registry import StateXGLAConfig, StateXMamba2Config
    from model_registry.tokenizer import BOS_ID, EOS_ID, PAD_ID

    shape = dict(SIZES[args.family][args.size or "tiny"])
    shape.update({k: getattr(args, k) for k in SHAPE_ARGS if getattr(args, k, None) is not None})
    common = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=shape["hidden_size"], num_hidden_layers=shape["layers"],
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  tie_word_embeddings=args.tie_embeddings,
                  max_position_embeddings=args.max_position_embeddings or 2048)
    if args.family == "gla":
        return StateXGLAConfig(num_heads=shape.get("heads", 4), expand_k=args.expand_k, expand_v=1.0, **common)
    return StateXMamba2Config(state_size=shape.get("state_size", 32), head_dim=shape.get("head_dim", 32), expand=2,
                              n_groups=1, chunk_size=64, **common)


def config_from_file(args: argparse.Namespace):
    from model_registry.configs import StateXGLAConfig, StateXMamba2Config
    from model_registry.convert import (detect_format, gla_config_from_fla, mamba2_config_from_hf,
                                        mamba2_config_from_mamba_ssm)

    cfg = json.loads(Path(args.config).read_text())
    fmt = detect_format(cfg)
    config = {"gla": gla_config_from_fla, "mamba2": mamba2_config_from_hf, "mamba_ssm": mamba2_config_from_mamba_ssm,
              "statex_gla": StateXGLAConfig.from_dict, "statex_mamba2": StateXMamba2Config.from_dict}[fmt](cfg)
    if args.max_position_embeddings is not None:
        config.max_position_embeddings = args.max_position_embeddings
    if args.tie_embeddings:
        config.tie_word_embeddings = True
    return config, fmt


def run(args: argparse.Namespace) -> str:
    """Write the checkpoint; returns a one-line summary. UsageError /
    ConfigError / CheckpointError on bad input."""
    check_arguments(args)
    import torch

    from model_registry import StateXGLAConfig, StateXGLAForCausalLM, StateXMamba2ForCausalLM
    from model_registry.checkpoint import TOKENIZER_FILES, save_checkpoint
    from model_registry.tokenizer import save_byte_tokenizer

    if args.config is not None:
        config, fmt = config_from_file(args)
        provenance = {"kind": "random init", "config": str(Path(args.config).resolve()), "config_format": fmt}
        tok_src = Path(args.config).parent
        if not any((tok_src / name).is_file() for name in TOKENIZER_FILES):
            if config.vocab_size != BYTE_VOCAB_SIZE:
                raise UsageError(f"--config {args.config}: no tokenizer files beside it, and vocab_size "
                                 f"{config.vocab_size} is not the byte-level tokenizer's {BYTE_VOCAB_SIZE}")
            tok_src = None
    else:
        config = build_config(args)
        provenance = {"kind": "random init", "family": args.family, "size": args.size or "tiny"}
        tok_src = None
    provenance |= {"seed": args.seed, "command": " ".join(sys.argv)}
    torch.manual_seed(args.seed)
    model = (StateXGLAForCausalLM if isinstance(config, StateXGLAConfig) else StateXMamba2ForCausalLM)(config)
    with tempfile.TemporaryDirectory() as tok:
        if tok_src is None:
            save_byte_tokenizer(tok)
            tok_src = tok
        save_checkpoint(model, args.out, tokenizer_src=tok_src, overwrite=args.overwrite, provenance=provenance)
    n = sum(p.numel() for p in model.parameters())
    return (f"wrote {args.out}: {type(model).__name__}, {n / 1e6:.2f}M parameters, "
            f"state {model.state_spec().summary()}, context {config.max_position_embeddings}")


def main(argv: list[str] | None = None) -> int:
    from training.cli import main as cli_main

    return cli_main(["init", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
