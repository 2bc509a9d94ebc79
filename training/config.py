"""The settings of ``train`` and ``eval`` and the checks that need no torch, so
``statex-train`` answers bad arguments before loading anything heavy."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.errors import UsageError


@dataclass
class TrainConfig:
    model: str
    out: str
    data: list[str] = field(default_factory=list)
    seq_len: int = 2048
    batch_size: int = 8                  # sequences per micro-batch per GPU
    grad_accum: int = 1
    max_steps: int = 1000                # optimizer steps
    lr: float = 3e-4
    min_lr_ratio: float = 0.1            # cosine floor, as a fraction of lr
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    grad_checkpointing: bool = False
    precision: str = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    halt_after_step: int | None = None   # stop early without exporting (job time limits, tests)
    time_budget_s: float | None = None   # shrink max_steps to fit (decided during warm-up)
    progress: bool = True


@dataclass
class EvalConfig:
    model: str
    out: str
    tasks: list[str] = field(default_factory=lambda: ["passkey", "niah", "mqar"])
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    samples: int = 32
    batch_size: int = 8
    seed: int = 1234
    heldout: str | None = None
    ppl_seq_len: int = 1024
    ppl_tokens: int = 262144
    check_generate: int = 1             # samples per (task, length) also run through prefill/decode
    device: str = "auto"
    precision: str = "auto"
    label: str | None = None
    overwrite: bool = False
    progress: bool = True


def resolve_model_dir(path: str | Path, flag: str = "--model") -> Path:
    """A checkpoint directory, or a training run directory whose exported model is
    in ``model/``. Anything else is a UsageError that says what is there: a
    missing directory, or a run that has not exported yet (and its newest
    resumable checkpoint, itself a loadable checkpoint directory)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such directory")
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: not a directory (expected a checkpoint directory with config.json)")
    steps = sorted(s for s in (p / "checkpoints").glob("step_*") if (s / "config.json").is_file())
    if steps:
        raise UsageError(f"{flag} {path}: a training run that has not exported a model yet (no model/); "
                         f"its newest checkpoint is {steps[-1]}")
    raise UsageError(f"{flag} {path}: not a checkpoint directory (no config.json) nor a training run (no "
                     "model/config.json)")


def check_train_config(cfg: TrainConfig) -> None:
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "save_every"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.warmup_steps < 0 or not 0 <= cfg.min_lr_ratio <= 1 or cfg.lr <= 0:
        raise UsageError("need --lr > 0, --warmup-steps >= 0 and 0 <= --min-lr-ratio <= 1")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    from training.data import parse_source_spec

    if not cfg.data:
        raise UsageError("no --data given")
    for spec in cfg.data:
        parse_source_spec(spec)


def parse_task_spec(task_spec: str):
    """``passkey`` or ``niah?needles=8`` -> (kind, numeric options); errors name --tasks."""
    from training.data import parse_source_spec
    from training.tasks import TASKS

    kind = task_spec.split("?", 1)[0].split("@", 1)[0]
    if kind not in TASKS:
        raise UsageError(f"--tasks: {kind!r} is not a recall task (one of {', '.join(TASKS)})")
    spec = parse_source_spec(task_spec, "--tasks")
    try:
        return spec.kind, {k: (float(v) if "." in v else int(v)) for k, v in spec.options.items()}
    except ValueError:
        raise UsageError(f"--tasks {task_spec}: task options must be numbers") from None


def check_eval_config(cfg: EvalConfig) -> None:
    if not cfg.tasks or not cfg.lengths or cfg.samples < 1 or cfg.batch_size < 1:
        raise UsageError("need at least one task, one length, --samples >= 1 and --batch-size >= 1")
    if any(n < 16 for n in cfg.lengths):
        raise UsageError(f"context lengths must be at least 16 tokens: {cfg.lengths}")
    for t in cfg.tasks:
        parse_task_spec(t)
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.heldout:
        from training.data import parse_source_spec
        from training.tasks import TASKS

        if parse_source_spec(cfg.heldout, "--heldout").kind in TASKS:
            raise UsageError(f"--heldout {cfg.heldout}: perplexity needs text, not a synthetic task")
