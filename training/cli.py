"""``statex-train``: import upstream checkpoints, expand state, post-train, evaluate.

Every subcommand answers bad input with a one-line ``error: ...`` on stderr and
exit code 2, and never leaves a partial output directory behind.
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("statex.train")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def cmd_import(args: argparse.Namespace) -> int:
    from model_registry.convert import import_checkpoint
    from model_registry.checkpoint import load_model

    out = import_checkpoint(args.src, args.out, overwrite=args.overwrite)
    model = load_model(out)
    spec = model.state_spec()
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.src} -> {out}: {type(model).__name__}, {n / 1e6:.2f}M parameters, "
          f"state {spec.bytes_per_sequence / 2**20:.2f} MiB per sequence")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="statex-train",
        description="StateX for GLA and Mamba2: import a checkpoint, expand the state of chosen layers, "
                    "post-train, evaluate recall, export.")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", help="convert an fla GLA, transformers Mamba2 or mamba_ssm checkpoint to ours",
                         description="Convert an upstream checkpoint directory (fla GLA `model_type: gla`, "
                                     "transformers `model_type: mamba2`, or mamba_ssm config.json + "
                                     "pytorch_model.bin) into statex-serve's format: config.json, "
                                     "model.safetensors, tokenizer files, statex.json.")
    imp.add_argument("--src", required=True, help="upstream checkpoint directory")
    imp.add_argument("--out", required=True, help="output directory (written atomically)")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    imp.set_defaults(func=cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model_registry.checkpoint import CheckpointError
    from model_registry.configs import ConfigError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"statex-train {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
