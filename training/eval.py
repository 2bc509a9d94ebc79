"""Recall accuracy vs context length (passkey, multi-key NIAH, MQAR; exact
match) and held-out perplexity.

Scoring is teacher-forced over path (a): for a causal model, "every answer
token is the argmax given the true prefix" is exactly "greedy generation
reproduces the answer", so whole batches score in one forward pass. A few
samples per cell are also generated through the serving paths (prefill (c)
then decode (b), ``greedy_generate``) and the two verdicts compared; the
agreement rate is reported next to the accuracy.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from training.config import EvalConfig, check_eval_config, parse_task_spec, resolve_model_dir
from training.data import TextCodec, build_source, heldout_windows, parse_source_spec
from training.errors import UsageError
from training.tasks import TASKS, Sample, TaskLengthError

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def make_samples(task_spec: str, codec: TextCodec, length: int, n: int, seed: int) -> list[Sample]:
    """``n`` samples of one task at one context length; depths cycle through DEPTHS."""
    kind, opts = parse_task_spec(task_spec)
    out = []
    for i in range(n):
        rng = random.Random(f"eval/{seed}/{kind}/{length}/{i}")
        kw = dict(opts)
        if kind in ("passkey", "niah") and "depth" not in kw:
            kw["depth"] = DEPTHS[i % len(DEPTHS)]
        try:
            out.append(TASKS[kind](rng, codec, length, **kw))
        except TaskLengthError as e:
            raise UsageError(f"--tasks {task_spec} at --lengths {length}: {e}") from None
        except (TypeError, ValueError) as e:
            raise UsageError(f"--tasks {task_spec}: {e}") from None
    return out


@torch.no_grad()
def score_samples(model, samples: list[Sample], batch_size: int, pad_id: int, autocast=None, bar=None
                  ) -> list[list[bool]]:
    """Per sample, per answer span: is every answer token the argmax? Right padding
    is safe: a causal model's logits at a position never see later tokens."""
    device = next(model.parameters()).device
    autocast = autocast or nullcontext()
    verdicts: list[list[bool]] = []
    for b in range(0, len(samples), batch_size):
        chunk = samples[b:b + batch_size]
        T = max(len(s.ids) for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s.ids)] = torch.tensor(s.ids)
        with autocast:
            pred = model(ids.to(device)).logits.argmax(-1).cpu()
        for i, s in enumerate(chunk):
            verdicts.append([bool((pred[i, a - 1:e - 1] == ids[i, a:e]).all()) for a, e in s.spans])
        if bar is not None:
            bar.update(len(chunk))
    return verdicts


@torch.no_grad()
def generation_agrees(model, sample: Sample, verdict: bool) -> bool:
    """The last span, generated greedily through prefill + decode, vs the teacher-forced verdict."""
    a, e = sample.spans[-1]
    generated = model.greedy_generate(sample.ids[:a], e - a)
    return (generated == sample.ids[a:e]) == verdict


def recall_table(model, codec: TextCodec, cfg: EvalConfig, autocast=None, log=print) -> list[dict]:
    rows = []
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        # in samples, on stderr: long contexts on CPU take minutes per cell
        bar = tqdm(total=len(cfg.tasks) * len(cfg.lengths) * cfg.samples, unit="sample", dynamic_ncols=True,
                   desc="recall")
        log = bar.write if log is print else log
    try:
        for task_spec in cfg.tasks:
            for length in cfg.lengths:
                if bar is not None:
                    bar.set_postfix_str(f"{task_spec} @ {length}", refresh=False)
                rows.append(_recall_cell(model, codec, cfg, task_spec, length, autocast, bar, log))
    finally:
        if bar is not None:
            bar.close()
    return rows


def _recall_cell(model, codec: TextCodec, cfg: EvalConfig, task_spec: str, length: int, autocast, bar, log
                 ) -> dict:
    """One (task, length) cell of the table."""
    t0 = time.perf_counter()
    samples = make_samples(task_spec, codec, length, cfg.samples, cfg.seed)
    verdicts = score_samples(model, samples, cfg.batch_size, codec.eos_id, autocast, bar)
    spans = [v for vs in verdicts for v in vs]
    row = {"task": task_spec, "context": length,
           "tokens_mean": sum(len(s.ids) for s in samples) / len(samples),
           "accuracy": sum(spans) / len(spans), "n_samples": len(samples), "n_answers": len(spans),
           "sample_accuracy": sum(all(v) for v in verdicts) / len(verdicts)}
    if samples[0].meta.get("depth") is not None:
        by_depth: dict[float, list[bool]] = {}
        for s, v in zip(samples, verdicts):
            by_depth.setdefault(s.meta["depth"], []).extend(v)
        row["by_depth"] = {f"{k:.2f}": sum(v) / len(v) for k, v in sorted(by_depth.items())}
    if cfg.check_generate > 0:
        checks = [generation_agrees(model, s, v[-1]) for s, v in
                  list(zip(samples, verdicts))[:cfg.check_generate]]
        row["generate_agreement"] = sum(checks) / len(checks)
    row["seconds"] = time.perf_counter() - t0
    log(f"{task_spec:>10} @ {length:>6}: accuracy {row['accuracy']:.3f} ({row['n_answers']} answers)")
    return row


@torch.no_grad()
def heldout_perplexity(model, codec: TextCodec, spec: str, seq_len: int, max_tokens: int, batch_size: int,
                       autocast=None) -> dict:
    device = next(model.parameters()).device
    autocast = autocast or nullcontext()
    nll, count, windows = 0.0, 0, list(heldout_windows(spec, codec, seq_len, max_tokens))
    if not windows:
        raise UsageError(f"--heldout {spec}: fewer than {seq_len} tokens of text")
    for b in range(0, len(windows), batch_size):
        x = torch.tensor(windows[b:b + batch_size], dtype=torch.long, device=device)
        with autocast:
            logits = model(x).logits
        nll += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += x[:, 1:].numel()
    mean = nll / count
    return {"spec": spec, "seq_len": seq_len, "tokens": count, "nll": mean, "perplexity": math.exp(mean),
            "bits_per_token": mean / math.log(2)}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here")
    return torch.device(name)


def _trained_on(model: str) -> list[str] | None:
    """What the model was trained on (statex.json), for the plot's notes; None: unknown."""
    from training.report import trained_tasks

    try:
        return trained_tasks(resolve_model_dir(model))
    except UsageError:
        return None


def evaluate_model(model, codec: TextCodec, cfg: EvalConfig, log=print) -> dict:
    """The numbers for one model (already loaded, in eval mode)."""
    device = next(model.parameters()).device
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    spec = model.state_spec()
    result = {"label": cfg.label, "model": cfg.model, "precision": "bf16" if bf16 else "fp32",
              "state_bytes_per_sequence": spec.bytes_per_sequence,
              "state_elements_per_sequence": spec.elements_per_sequence,
              "parameters": sum(p.numel() for p in model.parameters()),
              "trained_on": _trained_on(cfg.model),
              "recall": recall_table(model, codec, cfg, autocast, log)}
    if cfg.heldout:
        result["heldout"] = heldout_perplexity(model, codec, cfg.heldout, cfg.ppl_seq_len, cfg.ppl_tokens,
                                               cfg.batch_size, autocast)
        log(f"held-out perplexity {result['heldout']['perplexity']:.4f} over {result['heldout']['tokens']} tokens")
    return result


def run(cfg: EvalConfig, log=print) -> dict:
    """Load, evaluate, write eval.json / eval.md / eval.png to ``cfg.out`` (atomically)."""
    import json
    from pathlib import Path

    from model_registry.checkpoint import atomic_output_dir, load_model
    from training import report

    check_eval_config(cfg)
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise UsageError(f"{cfg.out} already exists (pass --overwrite to replace it)")
    model_dir = resolve_model_dir(cfg.model)
    codec = TextCodec.from_model_dir(model_dir)
    if cfg.heldout:   # the corpus exists and is text, before loading the model
        spec = parse_source_spec(cfg.heldout, "--heldout")
        if spec.kind in TASKS:
            raise UsageError(f"--heldout {cfg.heldout}: perplexity needs text, not a synthetic task")
        build_source(spec, codec, cfg.ppl_seq_len, shuffle=False)
    for t in cfg.tasks:   # every (task, length) cell can be built, before the model loads
        for n in cfg.lengths:
            make_samples(t, codec, n, 1, cfg.seed)
    model = load_model(model_dir, device=pick_device(cfg.device)).eval()
    result = evaluate_model(model, codec, cfg, log)
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        (tmp / "eval.json").write_text(json.dumps(result, indent=2))
        (tmp / "eval.md").write_text(report.markdown({cfg.label or Path(cfg.model).name: result}))
        report.plot_recall({cfg.label or Path(cfg.model).name: result}, tmp / "eval.png")
    return result
