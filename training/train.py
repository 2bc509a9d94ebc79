"""Long-context post-training (LPT), the same loop for a plain and an expanded
checkpoint so the two are comparable. nanoGPT-style: the loop below is the
whole algorithm; data, checkpoints and the schedule live in their own modules.

AdamW (0.9, 0.95), weight decay only on >=2-D parameters, linear warm-up then
cosine to a floor, gradient clipping, bf16 autocast on GPU (fp32 master
weights), optional gradient checkpointing, gradient accumulation, DDP under
torchrun, checkpoints every N steps with exact resume.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model_registry.checkpoint import CheckpointError
from training.checkpointing import (checkpoints, load_train_checkpoint, remove_stale_temporaries, rng_state,
                                    save_train_checkpoint, set_rng_state)
from training.config import TrainConfig, check_train_config, resolve_model_dir
from training.data import TextCodec, build_stream
from training.errors import UsageError
from training.expand import count_parameters, read_provenance

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` updates, then cosine to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never norms, biases or Mamba2's per-head vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    d = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    return d


def _device(cfg: TrainConfig, d: _Dist) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: no CUDA device here")
    return torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{d.local_rank}")


def _gather(obj, d: _Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _newest_loadable(out: Path, model, opt) -> tuple[Path | None, dict | None]:
    """The newest step directory that loads (into ``model`` and ``opt``) and its
    trainer state: a damaged newest one (a truncated file, a broken
    trainer_state.json) falls back to the one before, with a warning."""
    found = checkpoints(out)
    first_error = None
    for path in reversed(found):
        try:
            return path, load_train_checkpoint(path, model, opt)
        except CheckpointError as e:
            logger.warning("cannot resume from %s: %s; trying the checkpoint before it", path.name, e)
            first_error = first_error or e
    if found:
        raise UsageError(f"--resume: none of the {len(found)} checkpoints under {out / 'checkpoints'} loads "
                         f"(the newest: {first_error})")
    return None, None


def _truncate_log(log_path: Path, step: int) -> None:
    """After a resume, drop log lines the interrupted run wrote past the checkpoint."""
    if not log_path.is_file():
        return
    keep = [line for line in log_path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    log_path.write_text("".join(line + "\n" for line in keep))


@dataclass
class _Run:
    """What the loop works on: built by ``_prepare``, advanced by ``run``, saved by ``_export``."""
    cfg: TrainConfig
    d: _Dist
    device: torch.device
    out: Path
    model_dir: Path
    stream: object                  # training.data's packed-sequence stream
    model: torch.nn.Module
    net: torch.nn.Module            # ``model``, or its DDP wrapper under torchrun
    opt: torch.optim.Optimizer
    bf16: bool
    autocast: object
    provenance: dict
    step: int
    tokens: int
    max_steps: int

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.d.world

    def training_record(self, at_step: int) -> dict:
        """What statex.json says about this post-training at ``at_step``."""
        cfg = self.cfg
        return {"steps": at_step, "max_steps": self.max_steps, "tokens": self.tokens, "seq_len": cfg.seq_len,
                "batch_tokens": self.tokens_per_step, "data": cfg.data, "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps, "min_lr_ratio": cfg.min_lr_ratio,
                "weight_decay": cfg.weight_decay, "clip": cfg.clip, "precision": "bf16" if self.bf16 else "fp32",
                "world_size": self.d.world, "seed": cfg.seed, "parameters": count_parameters(self.model)}

    def checkpoint(self, at_step: int) -> None:
        d = self.d
        states = _gather({"data": self.stream.state_dict(), "rng": rng_state()}, d)
        if d.main:
            save_train_checkpoint(self.out, at_step, self.model, self.opt,
                                  {"step": at_step, "tokens": self.tokens, "max_steps": self.max_steps,
                                   "world": d.world, "data": [s["data"] for s in states],
                                   "rng": [s["rng"] for s in states], "config": asdict(self.cfg)},
                                  self.model_dir, self.provenance | {"post_training": self.training_record(at_step)},
                                  self.cfg.keep_checkpoints)
        if d.world > 1:
            dist.barrier()


def run(cfg: TrainConfig, on_step=None) -> dict:
    """Train; returns a summary. ``on_step(step, record)`` is called after every
    optimizer step (tests use it to interrupt a run like a kill would)."""
    # 1. prepare: check the input, load model, data and optimizer, resume from the newest checkpoint
    r = _prepare(cfg)
    d, opt = r.d, r.opt
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=r.max_steps, initial=r.step, unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_first = None
    start_step = r.step
    log_f = r.log_path.open("a") if d.main else None
    # 2. the loop: one optimizer step of grad_accum micro-batches, logged, checkpointed every save_every
    try:
        while r.step < r.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(r.step, cfg, r.max_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = r.stream.next_batch(cfg.batch_size)
                x, y = x.to(r.device, non_blocking=True), y.to(r.device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or d.world == 1
                with (nullcontext() if sync else r.net.no_sync()), r.autocast:
                    loss = r.net(x, labels=y).loss / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            r.step += 1
            r.tokens += r.tokens_per_step
            loss_v = _mean_loss(loss_sum, r)     # also synchronises, so the timing below is honest
            now = time.perf_counter()
            if t_first is None:
                t_first = now                    # the first step pays for compilation; time the rest
            if cfg.time_budget_s is not None and r.step == start_step + 6:
                # the budget starts after the first step: kernel compilation is not training time
                r.max_steps = _fit_budget(cfg, r.step, r.max_steps, (now - t_first) / 5, now - t_first, d)
                if bar is not None:
                    bar.total = r.max_steps
            rec = {"step": r.step, "loss": loss_v, "lr": lr, "grad_norm": float(grad_norm), "tokens": r.tokens,
                   "tok_per_s": r.tokens_per_step / (now - t0), "elapsed_s": now - t_start}
            _log_step(rec, log_f, bar)
            if r.step % cfg.save_every == 0 or r.step == r.max_steps:
                r.checkpoint(r.step)
            if on_step is not None:
                on_step(r.step, rec)
            if cfg.halt_after_step is not None and r.step >= cfg.halt_after_step:
                break
    finally:
        if bar is not None:
            bar.close()
        if log_f is not None:
            log_f.close()
    # 3. export: the servable checkpoint OUT/model, once max_steps is reached
    return _export(r, time.perf_counter() - t_start)


def _prepare(cfg: TrainConfig) -> _Run:
    """Everything before the first step. All that can be wrong with the input is
    checked before ``cfg.out`` is touched; then ``out`` is cleared (--overwrite)
    or resumed (--resume) and args.json written."""
    from model_registry.checkpoint import load_model

    check_train_config(cfg)
    d = _init_distributed(cfg.device)
    device = _device(cfg, d)
    out = Path(cfg.out)
    model_dir = resolve_model_dir(cfg.model)
    if out.exists() and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"{out} already exists (pass --resume to continue it or --overwrite to start over)")
    codec = TextCodec.from_model_dir(model_dir)
    stream = build_stream(cfg.data, codec, cfg.seq_len, cfg.seed, d.rank, d.world)
    model = load_model(model_dir).to(device=device, dtype=torch.float32)
    model.train()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    base_provenance = read_provenance(model_dir)

    torch.manual_seed(cfg.seed + d.rank)
    step, tokens, max_steps = 0, 0, cfg.max_steps
    if cfg.overwrite and not cfg.resume and d.main and out.exists():
        shutil.rmtree(out)
    if d.main:
        for p in remove_stale_temporaries(out):
            logger.info("removed %s (left by a save that was interrupted)", p)
    ckpt, st = _newest_loadable(out, model, opt) if cfg.resume else (None, None)
    if ckpt is not None:
        step, tokens, max_steps = st["step"], st["tokens"], st["max_steps"]
        if st["world"] != d.world:
            raise UsageError(f"{ckpt} was written by {st['world']} processes; resume with the same number")
        stream.load_state_dict(st["data"][d.rank])
        set_rng_state(st["rng"][d.rank])
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(asdict(cfg), indent=2))
        _truncate_log(out / "log.jsonl", step)
    if d.world > 1:
        dist.barrier()

    net = model
    if d.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    provenance = {"kind": "statex post-trained checkpoint", "base": str(model_dir.resolve()),
                  "base_provenance": base_provenance}
    return _Run(cfg, d, device, out, model_dir, stream, model, net, opt, bf16, autocast, provenance,
                step, tokens, max_steps)


def _mean_loss(loss_sum, r: _Run) -> float:
    """This step's loss, averaged over the processes."""
    loss_t = torch.as_tensor(loss_sum, device=r.device, dtype=torch.float32)
    if r.d.world > 1:
        dist.all_reduce(loss_t, op=dist.ReduceOp.AVG)
    return float(loss_t)


def _log_step(rec: dict, log_f, bar) -> None:
    """One line of log.jsonl (rank 0) and the progress bar's numbers."""
    if log_f is not None:
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
    if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:,.0f}",
                        refresh=False)
        bar.update(1)


def _export(r: _Run, elapsed: float) -> dict:
    """The run's summary; a finished run also writes the servable checkpoint OUT/model."""
    from model_registry.checkpoint import save_checkpoint

    finished = r.step >= r.max_steps
    summary = {"steps": r.step, "max_steps": r.max_steps, "tokens": r.tokens, "finished": finished,
               "seconds_this_run": elapsed, "out": str(r.out)}
    if finished and r.d.main:
        r.provenance["post_training"] = r.training_record(r.step)
        save_checkpoint(r.model, r.out / "model", tokenizer_src=r.model_dir, provenance=r.provenance,
                        overwrite=True)
        summary["model"] = str(r.out / "model")
    if r.d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _fit_budget(cfg: TrainConfig, step: int, max_steps: int, sec_per_step: float, used: float, d: _Dist) -> int:
    """Steps that fit in what is left of the time budget (rank 0 decides for all).
    Decided while still warming up when warmup_steps >= 6, so the cosine that
    depends on max_steps has not started yet."""
    fit = step + int(max(0.0, cfg.time_budget_s - used) / max(sec_per_step, 1e-9))
    new = torch.tensor([max(step, min(max_steps, fit))], dtype=torch.long)
    if d.world > 1:
        new = new.to(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
        dist.broadcast(new, 0)
    return int(new.item())
