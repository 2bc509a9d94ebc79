"""A checkpoint with random weights in a benchmark shape, for latency and
memory runs (recall needs a trained model)::

    python -m statex_serve.bench.make_checkpoint gla-1.3b-statex /data/gla-1.3b-statex
    python -m statex_serve.bench latency memory --target spawn:/data/gla-1.3b-statex

Shapes: GLA-1.3B / Mamba2-1.3B (``gla-1.3b``, ``mamba2-1.3b``) and their StateX
versions (``-statex``: GLA heads merged in layers 0, 6, 12, 18; Mamba2 d_state
x4 in layers 0, 12, 24, 36), with the upstream vocabulary size; and the tiny
test models (``tiny-gla``, ``tiny-gla-statex``, ``tiny-mamba2``,
``tiny-mamba2-statex``). The tokenizer is the byte-level one (ids 0..258), so
bench prompts use the first 256 rows of a bigger embedding: the cost per token
is the same.
"""
from __future__ import annotations

import argparse
import sys

import torch

TINY = {"tiny-gla": ("gla", False), "tiny-gla-statex": ("gla", True),
        "tiny-mamba2": ("mamba2", False), "tiny-mamba2-statex": ("mamba2", True)}


def make_checkpoint(name: str, out_dir: str, dtype: str = "bfloat16", seed: int = 0, overwrite: bool = False,
                    **overrides):
    import tempfile

    from model_registry import MODEL_TYPES
    from model_registry.checkpoint import save_checkpoint
    from model_registry.testing import make_tiny_checkpoint
    from model_registry.tokenizer import BOS_ID, EOS_ID, PAD_ID, save_byte_tokenizer
    from statex_serve.bench.modelinfo import PRESETS, preset_config

    if name in TINY:
        family, expanded = TINY[name]
        return make_tiny_checkpoint(out_dir, family, expanded, seed, overwrite=overwrite, **overrides)
    if name not in PRESETS:
        raise ValueError(f"unknown shape {name!r} (one of {', '.join([*PRESETS, *TINY])})")
    config = preset_config(name, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **overrides)
    torch.manual_seed(seed)
    model = MODEL_TYPES[config.model_type][1](config).to(getattr(torch, dtype)).eval()
    with tempfile.TemporaryDirectory() as tok:
        save_byte_tokenizer(tok)
        return save_checkpoint(model, out_dir, tokenizer_src=tok, overwrite=overwrite,
                               provenance={"kind": "random weights for benchmarks", "shape": name, "seed": seed,
                                           "dtype": dtype})


def main(argv: list[str] | None = None) -> int:
    from statex_serve.bench.modelinfo import PRESETS

    ap = argparse.ArgumentParser(prog="python -m statex_serve.bench.make_checkpoint",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", help=f"one of {', '.join([*PRESETS, *TINY])}")
    ap.add_argument("out", help="output checkpoint directory")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="weights dtype (ignored for tiny shapes: float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.shape not in PRESETS and args.shape not in TINY:
        ap.exit(2, f"{ap.prog}: error: unknown shape {args.shape!r} (one of {', '.join([*PRESETS, *TINY])})\n")
    try:
        path = make_checkpoint(args.shape, args.out, args.dtype, args.seed, args.overwrite)
    except (ValueError, OSError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
