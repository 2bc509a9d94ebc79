"""Recall suite: passkey, multi-key NIAH and MQAR accuracy vs context length
and needle depth, through the target's generation path.

The samples are training's own (``training.eval.make_samples`` over
``training.tasks``): same seed, same prompts as ``statex-train eval``. Those
are token ids with answer spans, made for teacher-forced scoring; this adapter
turns each span into a prompt-style query: the prompt is every token before the
span, the model generates the span's length greedily (EOS ignored), and the
answer counts when it reproduces the span exactly (token ids where the target
returns them, else the decoded text). For a causal model that is the same
verdict as training's teacher-forced argmax. MQAR samples have many answers; at
most ``mqar_queries`` of them per sample are asked (evenly spread over the
sample's queries), each with the earlier queries' true answers in its prompt.
``capacity:CELL`` tasks are the capacity experiment's own rows (``capacity.py``).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from statex_serve.bench.targets import BenchError, Target


@dataclass
class RecallConfig:
    tasks: list[str]
    contexts: list[int]
    samples: int
    mqar_queries: int = 4
    concurrency: int = 4
    seed: int = 1234


class HFCodec:
    """training.tasks' Codec over a Hugging Face tokenizer (for tokenizers
    without a tokenizer.json, which training's TextCodec needs)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def make_codec(target: Target):
    from training.data import TextCodec

    tok = target.tokenizer()
    path = Path(target.tokenizer_dir) / "tokenizer.json"
    if path.is_file():
        return TextCodec(path, tok.eos_token_id if tok.eos_token_id is not None else 0)
    return HFCodec(tok)


def check_tasks(tasks: list[str]) -> None:
    from statex_serve.bench import capacity
    from training.data import parse_source_spec
    from training.errors import UsageError
    from training.tasks import TASKS

    for t in tasks:
        if capacity.is_capacity(t):
            capacity.parse(t)
            continue
        try:
            kind = parse_source_spec(t).kind
        except UsageError as e:
            raise BenchError(f"--tasks: {e}") from None
        if kind not in TASKS:
            raise BenchError(f"--tasks: {t!r} is not a recall task (one of {', '.join(TASKS)}, "
                             f"{capacity.KIND}:CELL)")


def pick_spans(spans: list[tuple[int, int]], limit: int) -> list[int]:
    """Indices of at most ``limit`` spans, evenly spread, the last always included."""
    n = len(spans)
    if n <= limit:
        return list(range(n))
    if limit == 1:
        return [n - 1]
    return sorted({round(j * (n - 1) / (limit - 1)) for j in range(limit)})


def build_queries(task: str, codec, ctx: int, cfg: RecallConfig) -> tuple[list[dict], list]:
    from training.errors import UsageError
    from training.eval import make_samples

    try:
        samples = make_samples(task, codec, ctx, cfg.samples, cfg.seed)
    except UsageError as e:   # e.g. a context shorter than the task's fixed text
        raise BenchError(str(e)) from None
    queries = []
    for i, s in enumerate(samples):
        for j in pick_spans(s.spans, cfg.mqar_queries):
            a, e = s.spans[j]
            queries.append({"sample": i, "span": j, "depth": s.meta.get("depth"), "prompt": s.ids[:a],
                            "expected": s.ids[a:e]})
    return queries, samples


def plan(codec, cfg: RecallConfig, max_len: int | None, vocab_size: int | None = None, label: str = ""
         ) -> list[dict]:
    """Every (task, context) cell with its queries, or the reason it is skipped. A
    capacity cell has its own context; ``vocab_size`` (the target's) is checked for it."""
    from statex_serve.bench import capacity

    cells = []
    for task in cfg.tasks:
        cap = capacity.parse(task) if capacity.is_capacity(task) else None
        if cap is not None:
            capacity.check_vocabulary(cap, codec, vocab_size, label)
        for ctx in [cap.length] if cap else cfg.contexts:
            if max_len and ctx > max_len:
                cells.append({"task": task, "context": ctx, "skip": f"context > max_model_len {max_len}"})
                continue
            if cap:
                queries, samples = capacity.build_queries(cap, cfg.samples, cfg.seed, cfg.mqar_queries)
            else:
                queries, samples = build_queries(task, codec, ctx, cfg)
            cells.append({"task": task, "context": ctx, "queries": queries, "samples": samples})
    return cells


async def run_recall(target: Target, cfg: RecallConfig, cells: list[dict], codec, progress=None) -> dict:
    """Ask every query of ``cells`` (from ``plan``) and score the answers."""
    sem = asyncio.Semaphore(cfg.concurrency)
    rows, skipped = [], []

    async def ask(q):
        ids_only = q.get("token_ids", False)   # answers without text (capacity cells)
        async with sem:
            r = await target.generate(q["prompt"], len(q["expected"]), token_ids=ids_only)
        if progress is not None:
            progress.update(1)
        if r.token_ids is not None:
            correct = r.ok and r.token_ids == q["expected"]
        else:
            correct = r.ok and not ids_only and r.text == codec.decode(q["expected"])
        answer = {"sample": q["sample"], "span": q["span"], "depth": q["depth"], "prompt_tokens": len(q["prompt"]),
                  "expected": codec.decode(q["expected"]), "got": r.text, "correct": bool(correct),
                  "latency_s": r.e2e, "error": r.error}
        if ids_only:
            answer.update(expected_ids=q["expected"], got_ids=r.token_ids)
        return answer

    for cell in cells:
        task, ctx = cell["task"], cell["context"]
        if "skip" in cell:
            skipped.append({"task": task, "context": ctx, "reason": cell["skip"]})
            continue
        samples = cell["samples"]
        answers = list(await asyncio.gather(*(ask(q) for q in cell["queries"])))
        per_sample: dict[int, list[bool]] = {}
        for a in answers:
            per_sample.setdefault(a["sample"], []).append(a["correct"])
        row = {"task": task, "context": ctx, "tokens_mean": sum(len(s.ids) for s in samples) / len(samples),
               "accuracy": sum(a["correct"] for a in answers) / len(answers), "n_samples": len(samples),
               "n_answers": len(answers),
               "sample_accuracy": sum(all(v) for v in per_sample.values()) / len(per_sample),
               "errors": sum(a["error"] is not None for a in answers)}
        depths = {}
        for a in answers:
            if a["depth"] is not None:
                depths.setdefault(f"{a['depth']:.2f}", []).append(a["correct"])
        if depths:
            row["by_depth"] = {k: sum(v) / len(v) for k, v in sorted(depths.items())}
        row["answers"] = answers
        rows.append(row)
    return {"config": cfg.__dict__, "rows": rows, "skipped": skipped}
