"""``statex-train``: start from a fresh or an upstream checkpoint, expand state,
post-train, evaluate.

Every subcommand answers bad input with a one-line ``error: ...`` on stderr and
exit code 2, and never leaves a partial output directory behind. Arguments are
checked before torch is imported, so mistakes are answered at once.
"""
from __future__ import annotations

import argparse
import logging
import sys

from statex_serve.cli import DefaultsHelpFormatter   # one "(default: X)" rule for both CLIs
from training.config import EvalConfig, TrainConfig, check_eval_config, check_train_config, resolve_model_dir
from training.errors import UsageError  # re-exported: callers catch cli.UsageError

log = logging.getLogger("statex.train")


def _check_out(out: str, overwrite: bool) -> None:
    from pathlib import Path

    if Path(out).exists() and not overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")


def cmd_init(args: argparse.Namespace) -> int:
    from training.init_model import run

    print(run(args))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not Path(args.src).is_dir():
        raise UsageError(f"--src {args.src}: no such directory")
    _check_out(args.out, args.overwrite)
    from model_registry.convert import import_checkpoint
    from model_registry.checkpoint import load_model

    out = import_checkpoint(args.src, args.out, overwrite=args.overwrite)
    model = load_model(out)
    spec = model.state_spec()
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.src} -> {out}: {type(model).__name__}, {n / 1e6:.2f}M parameters, "
          f"state {spec.bytes_per_sequence / 2**20:.2f} MiB per sequence")
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    resolve_model_dir(args.base, "--base")
    _check_out(args.out, args.overwrite)
    from training.expand import expand_checkpoint, summary_lines

    record = expand_checkpoint(args.base, args.out, every=args.every, layers=args.layers, heads=args.heads,
                               state_size=args.state_size, init=args.init, seed=args.seed,
                               overwrite=args.overwrite, dt_init=args.dt_init, head_k_dim=args.head_k_dim)
    for line in summary_lines(record):
        print(line)
    print(f"wrote {args.out} (statex.json records the expansion)")
    return 0


def _checked_config(cls, check, args: argparse.Namespace):
    """``cls`` (TrainConfig, EvalConfig) from the options named after its fields,
    checked by ``check``, with a model directory that exists."""
    cfg = cls(**{k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__})
    check(cfg)
    resolve_model_dir(cfg.model)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _checked_config(TrainConfig, check_train_config, args)
    from pathlib import Path

    if Path(cfg.out).exists() and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"{cfg.out} already exists (pass --resume to continue it or --overwrite to start over)")
    from training.train import run

    summary = run(cfg)
    if summary.get("model"):
        print(f"trained {summary['steps']} steps ({summary['tokens']:,} tokens) -> {summary['model']}")
    else:
        print(f"stopped at step {summary['steps']} of {summary['max_steps']}; continue with --resume")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _checked_config(EvalConfig, check_eval_config, args)
    _check_out(cfg.out, cfg.overwrite)
    from training.eval import run

    run(cfg)
    print(f"wrote {args.out}/eval.json, eval.md, eval.png")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x.strip()]


def _subcommand(sub, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand's parser: its one-line help, its description, "(default: X)" on
    its options, and ``func`` to run it."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=DefaultsHelpFormatter)
    p.set_defaults(func=func)
    return p


def _config_command(sub, name: str, cls, func, help: str, description: str, model_help: str):
    """A subcommand whose options fill the run config ``cls`` (TrainConfig,
    EvalConfig): its parser, with the --model every run needs first, and
    ``cls``'s defaults for the options that follow."""
    p = _subcommand(sub, name, func, help, description)
    p.add_argument("--model", required=True, help=model_help)
    return p, cls(model="", out="")


def add_expand(sub) -> None:
    p = _subcommand(sub, "expand", cmd_expand, "StateX: expand the recurrent state of chosen layers",
                    "Merge GLA heads (--heads, default 1), widen GLA keys (--init preserve --head-k-dim, default "
                    "4x), or grow Mamba2 d_state (--state-size, default 4x) in "
                    "layers 0, P, 2P, ... (--every P) or --layers I,J,...; writes an expanded checkpoint with "
                    "statex.json.")
    p.add_argument("--base", required=True, help="our checkpoint directory (see `statex-train import`)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--every", type=int, help="expand layers 0, P, 2P, ...")
    which.add_argument("--layers", help="comma-separated layer indices, e.g. 0,6,12,18")
    p.add_argument("--heads", type=int, help="GLA: merge each chosen layer's heads into this many (default 1)")
    p.add_argument("--head-k-dim", type=int,
                   help="GLA with --init preserve: new key dim per head, a multiple of the old (default 4x)")
    p.add_argument("--state-size", type=int, help="Mamba2: new d_state, a multiple of the old (default 4x)")
    p.add_argument("--init", default="reinit",
                   help="GLA: reinit | inherit (merge heads) | preserve (widen each head's keys, "
                        "function-preserving); Mamba2: reinit | merge_copy | merge_zero | preserve "
                        "(function-preserving with --dt-init inherit) (default reinit)")
    p.add_argument("--dt-init",
                   help="Mamba2: the expanded layers' dt_bias / A_log: official (the reference code: dt_bias 1, "
                        "A_log log(1..H); the default), inherit (the base layer's), init (mamba_ssm's draw)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh weights (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_train(sub) -> None:
    """The ``train`` subcommand: data, output and every field of the run config as an option."""
    p, d = _config_command(sub, "train", TrainConfig, cmd_train,
                           "long-context post-training (the same loop for LPT and StateX)",
                           "Train a checkpoint on packed sequences; writes OUT/model (final checkpoint), "
                           "OUT/checkpoints/step_N (resumable), OUT/log.jsonl. Under torchrun it runs DDP.",
                           model_help="checkpoint directory to start from")
    p.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="KIND[:PATH][?k=v&...][@WEIGHT], repeatable: text:DIR, jsonl:FILE, hf:NAME, "
                        "passkey, niah, mqar (see docs/training.md)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence (window)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up of the learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on >=2-D parameters only")
    p.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip")
    p.add_argument("--seed", type=int, default=d.seed, help="data order and initialisation")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest step checkpoints kept")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--precision", default=d.precision, help="auto (bf16 autocast on GPU) | bf16 | fp32")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint (if any)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT and start over")
    p.add_argument("--halt-after-step", type=int, help="stop after this step without exporting")
    p.add_argument("--time-budget-s", type=float, help="lower --max-steps to fit this many seconds")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_eval(sub) -> None:
    p, d = _config_command(sub, "eval", EvalConfig, cmd_eval,
                           "recall accuracy vs context length, held-out perplexity",
                           "Passkey, multi-key NIAH and MQAR exact-match accuracy at each context length, and "
                           "perplexity on held-out text; writes OUT/eval.json, eval.md, eval.png.",
                           model_help="checkpoint directory (or a training run directory)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--tasks", type=_str_list, default=",".join(d.tasks), help="comma-separated: passkey,niah,mqar "
                   "(options like niah?needles=8)")
    p.add_argument("--lengths", type=_int_list, default=",".join(map(str, d.lengths)),
                   help="context lengths in tokens")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per task and length")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic samples")
    p.add_argument("--heldout", help="text source for perplexity, e.g. text:DIR?split=heldout")
    p.add_argument("--ppl-seq-len", type=int, default=d.ppl_seq_len, help="window of the perplexity")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens, help="at most this many held-out tokens")
    p.add_argument("--check-generate", type=int, default=d.check_generate,
                   help="samples per cell also generated through prefill/decode (0: none)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--precision", default=d.precision, help="auto (bf16 autocast on GPU) | bf16 | fp32")
    p.add_argument("--label", help="name of the model in the table and plot")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``statex-train`` parser: --log-level and the five subcommands."""
    p = argparse.ArgumentParser(
        prog="statex-train",
        description="StateX for GLA and Mamba2: start from a fresh (init) or an upstream (import) checkpoint, "
                    "expand the state of chosen layers, post-train (train writes the servable model to "
                    "OUT/model), evaluate recall. Serve the result with `statex-serve --model OUT`.")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from training.init_model import add_arguments as add_init_arguments

    add_init_arguments(_subcommand(
        sub, "init", cmd_init, "a fresh randomly initialised model of a named size or from a config",
        "Write a randomly initialised GLA or Mamba2 (a named --size with --family, or --config FILE) as a "
        "checkpoint that train, expand, eval and statex-serve take; named sizes use the byte-level tokenizer."))
    imp = _subcommand(sub, "import", cmd_import,
                      "convert an fla GLA, transformers Mamba2 or mamba_ssm checkpoint to ours",
                      "Convert an upstream checkpoint directory (fla GLA `model_type: gla`, transformers "
                      "`model_type: mamba2`, or mamba_ssm config.json + pytorch_model.bin) into statex-serve's "
                      "format: config.json, model.safetensors, tokenizer files, statex.json.")
    imp.add_argument("--src", required=True, help="upstream checkpoint directory")
    imp.add_argument("--out", required=True, help="output directory (written atomically)")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_expand(sub)
    add_train(sub)
    add_eval(sub)
    return p


def _input_error_types() -> tuple[type, ...]:
    """UsageError, plus the checkpoint and config errors when model_registry has
    been imported (imported here it would load torch before the arguments are
    checked)."""
    types: list[type] = [UsageError, FileNotFoundError]
    if "model_registry.checkpoint" in sys.modules:
        types.append(sys.modules["model_registry.checkpoint"].CheckpointError)
    if "model_registry.configs" in sys.modules:
        types.append(sys.modules["model_registry.configs"].ConfigError)
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, _input_error_types()):
            raise
        print(f"statex-train {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
