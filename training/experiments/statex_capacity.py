"""StateX's effect where the state is the bottleneck: base vs LPT vs StateX on
small GLA and Mamba2, several seeds, fixed step counts. Design: docs/training.md
("The capacity experiment"); results: docs/experiments/statex_capacity.md.

    python -m training.experiments.statex_capacity prepare --out corpus.jsonl
    python -m training.experiments.statex_capacity pilot --corpus corpus.jsonl --out P      # does MQAR learn?
    python -m training.experiments.statex_capacity run --corpus corpus.jsonl --out RESULTS --seeds 0,1,2
    python -m training.experiments.statex_capacity report --results RESULTS --out docs/experiments/statex_capacity.md
    python -m training.experiments.statex_capacity run --corpus corpus.jsonl --out R --tiny    # CPU, < 1 min
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# --- vocabulary -----------------------------------------------------------------------

EOS, BOS, PAD = 256, 257, 258        # model_registry.tokenizer's ids
KEY0 = 259                           # key tokens KEY0 .. KEY0+n_keys-1, then the value tokens


@dataclass
class Preset:
    d_model: int = 128
    layers: int = 4
    gla_heads: int = 4                # expand_k 0.5, expand_v 1: 4 heads of 16 x 32
    # fla's short conv on GLA's q, k, v (use_short_conv, conv_size 4), as Zoology always trains GLA: without
    # it GLA learned no MQAR in any H200 pilot. Off with `--set gla_short_conv=false`
    gla_short_conv: bool = True
    # GLA's input and output embeddings tied, as Mamba2's are (mamba_ssm's default; fla's GLA
    # unties them). Untied, GLA learned no MQAR over 512 values in runs 1-6 at any rate tried; tied,
    # the H200 pilot of 2026-11-30 reached 99 / 80 / 52 / 24% at 1 / 2 / 4 / 8 pairs in 1200 steps
    # at lr 1e-2 (docs/experiments/statex_capacity-gla-run6.md). Run 6's GLA half ran untied
    gla_tie_embeddings: bool = True
    mamba2_state: int = 16
    mamba2_head_dim: int = 32
    expand_layers: tuple = (0, 2)
    mamba2_expanded_state: int = 64
    # the StateX arm's expansion (training.expand), and the --alt arm's
    gla_init: str = "reinit"
    mamba2_init: str = "reinit"
    mamba2_dt_init: str = "official"
    alt_gla_init: str = "inherit"
    alt_mamba2_init: str = "preserve"
    alt_mamba2_dt_init: str = "inherit"
    n_keys: int = 512
    n_values: int = 512
    # MQAR rows: "text" (queries at uniform places in text filler, the first H200 run) or
    # "zoology" (Zoology's multiquery_ar: every query after the pairs at power-law gaps, random
    # byte filler; learnt far sooner in the pilots), see mqar_row
    mqar_layout: str = "zoology"
    mqar_power_a: float = 0.01
    # an MQAR-only phase before pre-training (0: none), never scaled by the plan. With 4-32 pairs
    # (runs 3-5, up to 4000 steps) whether a base crossed MQAR's plateau was a coin toss: most rows
    # held more pairs than a d_state-16 layer can (one B/C group: 16 key dimensions). With 1-8
    # pairs every base crossed by step 2000 in the H200 sweeps of 2026-11-30 (6 of 6; with 2-16 pairs
    # 12 of 18 reached 70% at the gate cell);
    # pre-training then brings the larger counts (docs/experiments/statex_capacity.md)
    mqar_steps: int = 2000
    mqar_seq: int = 256
    mqar_pairs: tuple = (1, 8)
    mqar_lr: float = 1e-2
    mqar_warmup: int = 100
    # pre-training (base, and the from-scratch upper bound's first phase)
    pre_seq: int = 512
    pre_batch: int = 64
    pre_steps: int = 300
    pre_lr: float = 1e-2
    pre_warmup: int = 100
    pre_pairs: tuple = (4, 48)
    # post-training (LPT, StateX, the upper bound's second phase): identical streams
    post_seq: int = 2048
    post_batch: int = 16
    post_steps: int = 1000
    # at 1e-3 the preserve expansion ended within 0.1 point of LPT after 1000 steps (its new
    # state dimensions unused); at 3e-3 it beat LPT in every seed (H200 sweeps, 2026-11-30)
    post_lr: float = 3e-3
    post_warmup: int = 40
    post_pairs: tuple = (4, 96)
    frac_text: float = 0.5
    frac_passkey: float = 0.1         # the rest of the rows are MQAR
    # evaluation
    gate_cell: tuple = (512, 8)       # (length, pairs): the base must recall here
    capacity_len: int = 2048
    capacity_pairs: tuple = (8, 16, 32, 64, 96, 128)
    length_pairs: int = 32
    lengths: tuple = (512, 1024, 2048, 4096, 8192)
    mqar_answers: int = 2560          # first rows of an MQAR cell: ceil(answers / pairs)
    min_rows: int = 32
    passkey_rows: int = 400
    target_se: float = 0.01           # rows are added until a cell's standard error is at most this...
    max_rows: int = 2500              # ...or it has this many rows
    max_cell_tokens: int = 8 << 20    # ...or this many tokens
    bpb_windows: int = 64
    eval_tokens_per_batch: int = 1 << 18
    log_every: int = 25
    # the pilot (``pilot``): MQAR rows only, one length, a few learning rates
    pilot_seq: int = 256
    pilot_pairs: tuple = (4, 32)
    pilot_steps: int = 2000
    pilot_lrs: tuple = (1e-3, 3e-3, 1e-2)
    pilot_eval_pairs: tuple = (4, 8, 16, 32)

    @property
    def vocab(self) -> int:
        return KEY0 + self.n_keys + self.n_values


PRESETS = {
    "full": Preset(),
    # the same pipeline at toy size: CPU, well under a minute (tests/test_capacity_experiment.py)
    "tiny": Preset(d_model=32, layers=2, gla_heads=2, mamba2_state=4, mamba2_head_dim=16, expand_layers=(0,),
                   mamba2_expanded_state=8, n_keys=32, n_values=32, pre_seq=96, pre_batch=8, pre_steps=4,
                   pre_warmup=1, pre_pairs=(2, 6), post_seq=160, post_batch=4, post_steps=3, post_warmup=1,
                   post_pairs=(2, 8), mqar_steps=2, mqar_seq=96, mqar_pairs=(2, 6), mqar_warmup=1, gate_cell=(96, 2),
                   capacity_len=160, capacity_pairs=(2, 8), length_pairs=4,
                   lengths=(300, 400), mqar_answers=16, min_rows=4, passkey_rows=4, max_rows=8, bpb_windows=2,
                   eval_tokens_per_batch=4096, log_every=1),
}
ARMS = ("base", "statex0", "lpt", "statex")


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(text) from None


def preset(name: str, overrides: list[str]) -> Preset:
    """A preset with ``FIELD=VALUE`` overrides (numbers, names, true/false, or comma lists for tuples)."""
    p = PRESETS[name]
    changes = {}
    for o in overrides:
        key, sep, val = o.partition("=")
        if not sep or key not in p.__dataclass_fields__:
            raise SystemExit(f"--set {o}: not FIELD=VALUE with a field of Preset")
        cur = getattr(p, key)
        try:
            if isinstance(cur, tuple):
                kind = type(cur[0]) if cur else int
                changes[key] = tuple(kind(x) for x in val.split(",") if x)
            else:
                changes[key] = _parse_bool(val) if isinstance(cur, bool) else type(cur)(val)
        except ValueError:
            raise SystemExit(f"--set {o}: {val!r} is not a valid {type(cur).__name__}") from None
    return replace(p, **changes)


def mqar_only(p: Preset) -> Preset:
    """The preset with every training row MQAR (the pilot and the MQAR-only phase)."""
    return replace(p, frac_text=0.0, frac_passkey=0.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- corpus ---------------------------------------------------------------------------

def prepare_corpus(out: Path, max_code_bytes: int = 6 << 20) -> dict:
    """English prose (the Python docs' topics and the stdlib's docstrings, as
    scripts/bundled_corpus.py builds it) then Python source, one JSON line per
    document: offline and on every machine with a Python install."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bundled_corpus", Path(__file__).resolve().parents[2] / "scripts" / "bundled_corpus.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    texts = bc.doc_topics() + bc.stdlib_docstrings()
    src = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib")
    total = 0
    if src.is_dir():
        for p in sorted(src.rglob("*.py")):
            if any(part in skip for part in p.relative_to(src).parts):
                continue
            t = p.read_text(encoding="utf-8", errors="replace")
            if total + len(t) > max_code_bytes:
                break
            texts.append(t)
            total += len(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    info = {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts), "python": sys.version.split()[0]}
    log(f"corpus: {info['documents']} documents, {info['bytes'] / 2**20:.1f} MiB -> {out}")
    return info


class Corpus:
    """Train / held-out byte streams (documents joined with EOS), split by a hash
    of the line number like training.data's ``split=``."""

    def __init__(self, path: Path, heldout_pct: float = 5.0):
        train, held = [], []
        raw = Path(path).read_bytes()
        self.sha = f"{zlib.crc32(raw):08x}"
        eos = np.asarray([EOS], dtype=np.int64)
        for n, line in enumerate(raw.decode("utf-8").splitlines()):
            if not line.strip():
                continue
            ids = np.frombuffer(json.loads(line)["text"].encode("utf-8"), dtype=np.uint8).astype(np.int64)
            (held if zlib.crc32(str(n).encode()) % 10000 < heldout_pct * 100 else train).extend((ids, eos))
        self.train = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
        self.heldout = np.concatenate(held) if held else np.zeros(0, dtype=np.int64)
        if len(self.train) < 1 << 14 or len(self.heldout) < 1 << 12:
            raise SystemExit(f"{path}: corpus too small ({len(self.train)} train / {len(self.heldout)} held-out bytes)")

    def window(self, rng: np.random.Generator, n: int, heldout: bool = False) -> np.ndarray:
        src = self.heldout if heldout else self.train
        start = int(rng.integers(0, len(src) - n))
        return src[start:start + n]


# --- rows: (ids [T], targets [T]; target t is the token after t, or -100) -------------

IGNORE = -100


def text_row(rng, corpus: Corpus, T: int, heldout: bool = False):
    ids = np.concatenate([[BOS], corpus.window(rng, T - 1, heldout)])
    tgt = np.full(T, IGNORE, dtype=np.int64)
    tgt[:-1] = ids[1:]
    return ids, tgt


def mqar_row(rng, corpus: Corpus, T: int, pairs: int, p: Preset, heldout: bool = False):
    """BOS, ``pairs`` key-value token pairs, then filler with every key asked once
    (in random order): the key, then its value (the answer). ``p.mqar_layout``
    "text": the questions at uniform places in text; "zoology": at power-law
    gaps after the pairs (most close to them), the rest random bytes, as
    Zoology's ``multiquery_ar`` (``power_a``, ``random_non_queries``)."""
    filler = T - 1 - 4 * pairs
    if filler < 0:
        raise ValueError(f"{pairs} pairs do not fit in {T} tokens")
    keys = rng.choice(p.n_keys, pairs, replace=False) + KEY0
    vals = rng.integers(0, p.n_values, pairs) + KEY0 + p.n_keys
    ids = np.empty(T, dtype=np.int64)
    ids[0] = BOS
    ids[1:1 + 2 * pairs:2], ids[2:2 + 2 * pairs:2] = keys, vals
    order = rng.permutation(pairs)
    start = 1 + 2 * pairs
    if p.mqar_layout == "zoology":
        slots = (T - start) // 2                     # a question takes two tokens
        w = np.arange(1, slots + 1, dtype=np.float64) ** (p.mqar_power_a - 1)
        qpos = start + 2 * np.sort(rng.choice(slots, pairs, replace=False, p=w / w.sum()))
    elif p.mqar_layout == "text":
        qpos = start + np.sort(rng.integers(0, filler + 1, pairs)) + 2 * np.arange(pairs)
    else:
        raise ValueError(f"mqar_layout must be 'text' or 'zoology', got {p.mqar_layout!r}")
    ids[qpos], ids[qpos + 1] = keys[order], vals[order]
    fill = np.ones(T, dtype=bool)
    fill[:start] = False
    fill[qpos] = fill[qpos + 1] = False
    ids[fill] = (rng.integers(0, 256, filler) if p.mqar_layout == "zoology"
                 else corpus.window(rng, filler, heldout))
    tgt = np.full(T, IGNORE, dtype=np.int64)
    tgt[qpos] = vals[order]
    return ids, tgt


class _Bytes:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def passkey_row(rng, T: int, depth: float | None = None):
    """training.tasks.passkey (the eval suite's definition), BOS first, exactly T tokens."""
    import random

    from training.tasks import passkey

    s = passkey(random.Random(int(rng.integers(1 << 62))), _Bytes(), T - 1, depth=depth)
    ids = np.asarray([BOS] + s.ids, dtype=np.int64)
    tgt = np.full(T, IGNORE, dtype=np.int64)
    a, e = s.spans[-1]
    tgt[a:e] = ids[a + 1:e + 1]          # shifted by the BOS: answer token j of s is ids[j + 1]
    return ids, tgt


class Stream:
    """Training batches: fixed numbers of text / passkey / MQAR rows per batch, MQAR
    pairs uniform in ``pairs``. A pure function of (seed, step): LPT and StateX
    get the identical stream."""

    def __init__(self, corpus: Corpus, p: Preset, seq: int, batch: int, pairs: tuple, seed: int):
        self.corpus, self.p, self.seq, self.batch, self.pairs, self.seed = corpus, p, seq, batch, pairs, seed
        self.n_text = round(batch * p.frac_text)
        self.n_pass = round(batch * p.frac_passkey) if seq >= 300 else 0   # the passkey template is ~260 bytes
        self.step = 0

    def next(self):
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        rows, kinds = [], []
        for i in range(self.batch):
            if i < self.n_text:
                rows.append(text_row(rng, self.corpus, self.seq))
                kinds.append(0)
            elif i < self.n_text + self.n_pass:
                rows.append(passkey_row(rng, self.seq))
                kinds.append(1)
            else:
                lo, hi = self.pairs
                hi = min(hi, (self.seq - 1) // 4)
                rows.append(mqar_row(rng, self.corpus, self.seq, int(rng.integers(lo, hi + 1)), self.p))
                kinds.append(1)
        return (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), np.asarray(kinds))


# --- evaluation set -----------------------------------------------------------------

def eval_cells(p: Preset) -> list[dict]:
    cells = [{"group": "gate", "task": "mqar", "length": p.gate_cell[0], "pairs": p.gate_cell[1]}]
    cells += [{"group": "capacity", "task": "mqar", "length": p.capacity_len, "pairs": n} for n in p.capacity_pairs]
    cells += [{"group": "length", "task": "mqar", "length": n, "pairs": p.length_pairs} for n in p.lengths]
    cells += [{"group": "length", "task": "passkey", "length": n} for n in p.lengths]
    for c in cells:
        c["name"] = f"{c['task']}@{c['length']}" + (f"/{c['pairs']}p" if "pairs" in c else "")
        # first rows: enough answers for a 1-point standard error if answers were independent;
        # more are added (up to max_rows) while the measured standard error is above target_se
        c["rows"] = (max(p.min_rows, math.ceil(p.mqar_answers / c["pairs"])) if c["task"] == "mqar"
                     else p.passkey_rows)
        c["max_rows"] = max(c["rows"], min(p.max_rows, p.max_cell_tokens // c["length"]))
    return cells


class EvalCell:
    """Row i of a cell is a pure function of (seed, cell, i), built once per
    process and shared by every arm: held-out filler, passkey depths cycling."""

    DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, spec: dict, corpus: Corpus, p: Preset, seed: int):
        self.spec, self.corpus, self.p, self.seed = spec, corpus, p, seed
        self.ids: list[np.ndarray] = []
        self.tgt: list[np.ndarray] = []

    def rows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.spec
        while len(self.ids) < b:
            i = len(self.ids)
            rng = np.random.default_rng([self.seed, zlib.crc32(c["name"].encode()), i])
            if c["task"] == "mqar":
                ids, tgt = mqar_row(rng, self.corpus, c["length"], c["pairs"], self.p, heldout=True)
            elif c["task"] == "passkey":
                ids, tgt = passkey_row(rng, c["length"], self.DEPTHS[i % len(self.DEPTHS)])
            else:
                ids, tgt = text_row(rng, self.corpus, c["length"], heldout=True)
            self.ids.append(ids.astype(np.int32))
            self.tgt.append(tgt.astype(np.int32))
        return np.stack(self.ids[a:b]), np.stack(self.tgt[a:b])


def build_eval_set(corpus: Corpus, p: Preset, seed: int = 1234) -> list[EvalCell]:
    """The same rows for every arm and seed."""
    bpb = {"group": "bpb", "task": "text", "name": "bpb", "length": min(2048, p.post_seq), "rows": p.bpb_windows,
           "max_rows": p.bpb_windows}
    return [EvalCell(c, corpus, p, seed) for c in [*eval_cells(p), bpb]]


def _autocast(device):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def evaluate(model, eval_set: list[EvalCell], p: Preset, device, first_rows_only: int | None = None,
             grow_until: float | None = None) -> dict:
    """Per cell: accuracy (MQAR per answer, passkey per row: every answer token
    right) and its standard error over rows; bits per byte for the text cell.
    A cell starts with its ``rows`` and grows (fixed rule, same rows for every
    arm) until the standard error is at most ``target_se`` or ``max_rows``, and
    not after the wall-clock time ``grow_until``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    res = {}
    t0 = time.perf_counter()

    def score(cell: EvalCell, a: int, b: int, per_row: list, text: list) -> None:
        T = cell.spec["length"]
        bs = max(1, p.eval_tokens_per_batch // T)
        for s in range(a, b, bs):
            ids_np, tgt_np = cell.rows(s, min(b, s + bs))
            ids = torch.as_tensor(ids_np, device=device).long()
            tgt = torch.as_tensor(tgt_np, device=device).long()
            with _autocast(device):
                logits = model(ids).logits
            m = tgt != IGNORE
            if cell.spec["task"] == "text":
                m &= tgt != EOS
                ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.clamp_min(0).flatten(), reduction="none")
                text[0] += float((ce.view_as(tgt) * m).sum())
                text[1] += int(m.sum())
                continue
            ok = (logits.argmax(-1) == tgt) | ~m
            if cell.spec["task"] == "passkey":
                per_row += ok.all(-1).float().tolist()
            else:
                per_row += ((ok & m).sum(-1).float() / m.sum(-1).float()).tolist()

    def se(rows: list) -> float:
        return float(np.std(rows, ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else float("inf")

    with torch.no_grad():
        for cell in eval_set:
            c = cell.spec
            per_row, text = [], [0.0, 0]
            n = c["rows"] if first_rows_only is None else min(c["rows"], first_rows_only)
            score(cell, 0, n, per_row, text)
            while first_rows_only is None and c["task"] != "text" and se(per_row) > p.target_se \
                    and n < c["max_rows"] and (grow_until is None or time.time() < grow_until):
                want = math.ceil(n * (se(per_row) / p.target_se) ** 2 * 1.1)   # n for the target, then some
                new = min(c["max_rows"], max(want, n + c["rows"] // 4))
                score(cell, n, new, per_row, text)
                n = new
            if c["task"] == "text":
                res[c["name"]] = {"bits_per_byte": text[0] / text[1] / math.log(2), "bytes": text[1]}
                continue
            res[c["name"]] = {"group": c["group"], "task": c["task"], "length": c["length"],
                              "pairs": c.get("pairs"), "accuracy": float(np.mean(per_row)), "rows": len(per_row),
                              "se": se(per_row) if len(per_row) > 1 else None}
    res["_seconds"] = time.perf_counter() - t0
    model.train()
    return res


def time_eval(model, eval_set: list[EvalCell], p: Preset, device, warm: bool = False) -> float:
    """Projected seconds of one evaluation's first pass: one full batch per
    length, timed (after a first, compiling pass when ``warm``), times each
    cell's batch count. Timing a few rows per cell and scaling by tokens would
    count launch overhead as work: 25x too slow on the H200 (2026-11-30)."""
    import torch

    model.eval()
    per_len = {}
    with torch.no_grad():
        for cell in eval_set:
            T = cell.spec["length"]
            if T in per_len:
                continue
            bs = max(1, p.eval_tokens_per_batch // T)
            ids = torch.as_tensor(cell.rows(0, min(bs, cell.spec["max_rows"]))[0], device=device).long()
            for _ in range(2 if warm else 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with _autocast(device):
                    model(ids).logits.argmax(-1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                per_len[T] = (time.perf_counter() - t0) * bs / len(ids)
    model.train()
    return sum(math.ceil(c.spec["rows"] / max(1, p.eval_tokens_per_batch // c.spec["length"]))
               * per_len[c.spec["length"]] for c in eval_set)


# --- models ------------------------------------------------------------------------------

def model_config(family: str, p: Preset, expanded: bool = False):
    from model_registry.configs import StateXGLAConfig, StateXMamba2Config

    common = dict(vocab_size=p.vocab, hidden_size=p.d_model, num_hidden_layers=p.layers, bos_token_id=BOS,
                  eos_token_id=EOS, pad_token_id=PAD)
    if family == "gla":
        heads = [1 if expanded and i in p.expand_layers else p.gla_heads for i in range(p.layers)]
        return StateXGLAConfig(num_heads=p.gla_heads, layer_num_heads=heads, expand_k=0.5, expand_v=1.0,
                               use_short_conv=p.gla_short_conv, tie_word_embeddings=p.gla_tie_embeddings, **common)
    sizes = [p.mamba2_expanded_state if expanded and i in p.expand_layers else p.mamba2_state for i in range(p.layers)]
    return StateXMamba2Config(state_size=p.mamba2_state, layer_state_size=sizes, head_dim=p.mamba2_head_dim, expand=2,
                              n_groups=1, chunk_size=64, tie_word_embeddings=True, **common)


def new_model(family: str, p: Preset, seed: int, expanded: bool = False):
    import torch

    from model_registry import StateXGLAForCausalLM, StateXMamba2ForCausalLM

    torch.manual_seed(seed)
    cls = StateXGLAForCausalLM if family == "gla" else StateXMamba2ForCausalLM
    return cls(model_config(family, p, expanded))


def expand(family: str, model, p: Preset, seed: int, alt: bool = False):
    """StateX on a trained model (CPU copy): the preset's expansion (default reinit,
    the paper's), or its alternative (default GLA inherit, Mamba2 preserve + dt inherit: function-preserving).
    GLA's ``preserve`` widens each head's keys by the factor the merge grows the state (the head count),
    so both GLA expansions have the same state size."""
    from training.expand import expand_gla_heads, expand_mamba2_state, widen_gla_keys

    cpu = copy.deepcopy(model).to("cpu")
    if family == "gla":
        init = p.alt_gla_init if alt else p.gla_init
        layers = list(p.expand_layers)
        exp = (widen_gla_keys(cpu, layers, p.gla_heads * cpu.config.head_dims(layers[0])[1], seed)
               if init == "preserve" else expand_gla_heads(cpu, layers, 1, init, seed))
    else:
        exp = expand_mamba2_state(cpu, list(p.expand_layers), p.mamba2_expanded_state,
                                  p.alt_mamba2_init if alt else p.mamba2_init, seed,
                                  dt_init=p.alt_mamba2_dt_init if alt else p.mamba2_dt_init)
    return exp.model, exp.record(cpu)


def state_elements(model) -> int:
    return model.state_spec().elements_per_sequence


# --- training ------------------------------------------------------------------------------

def kind_loss(logits, tgt, kinds):
    """Mean token loss per kind (text; recall answers), averaged over the kinds present."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.clamp_min(0).flatten(), reduction="none").view_as(tgt)
    m = (tgt != IGNORE).float()
    parts = []
    for k in (0, 1):
        mk = m * (kinds == k).float()[:, None]
        parts.append((ce * mk).sum() / mk.sum().clamp_min(1.0))
    present = torch.stack([(kinds == k).any() for k in (0, 1)]).float()
    loss = (torch.stack(parts) * present).sum() / present.sum()
    return loss, parts


def train(model, stream: Stream, steps: int, lr: float, warmup: int, device, p: Preset, label: str,
          deadline: float | None = None) -> dict:
    """``steps`` AdamW steps on ``stream`` (warmup, cosine to 10%), stopping at
    ``deadline``; the loss curve and what was trained, for the arm's JSON."""
    import torch

    from training.train import TrainConfig, lr_at, param_groups

    sched = TrainConfig(model="", out="", lr=lr, warmup_steps=warmup, min_lr_ratio=0.1)
    model.to(device).train()
    # fused on the CPU too, so the toy pipeline (tests) steps the parameters as the GPU run does: in
    # place, without bumping their version counters (which once left a stale cache unnoticed)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), fused=True)
    curve, pending = [], []
    t0 = time.perf_counter()
    done = 0
    # the next batch is built on a CPU thread while the GPU runs this step
    prefetch = ThreadPoolExecutor(1)
    ahead = prefetch.submit(stream.next)
    for step in range(steps):
        if deadline is not None and time.time() > deadline:
            log(f"{label}: deadline reached after {step} of {steps} steps")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched, steps)
        ids, tgt, kinds = ahead.result()
        if step + 1 < steps:
            ahead = prefetch.submit(stream.next)
        ids, tgt = torch.as_tensor(ids, device=device), torch.as_tensor(tgt, device=device)
        kinds = torch.as_tensor(kinds, device=device)
        with _autocast(device):
            logits = model(ids).logits
        loss, parts = kind_loss(logits, tgt, kinds)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        pending.append(torch.stack([loss.detach(), *[x.detach() for x in parts]]))
        if done % p.log_every == 0 or done == steps:
            vals = torch.stack(pending).mean(0).tolist()      # one sync per log interval
            pending = []
            curve.append({"step": done, "loss": vals[0], "text": vals[1], "recall": vals[2],
                          "elapsed_s": time.perf_counter() - t0})
    prefetch.shutdown(wait=True, cancel_futures=True)
    return {"steps": done, "planned_steps": steps, "seconds": time.perf_counter() - t0, "curve": curve,
            "tokens": done * stream.batch * stream.seq, "lr": lr, "warmup": warmup, "seq": stream.seq,
            "batch": stream.batch, "pairs": list(stream.pairs), "data_seed": stream.seed}


class StepTimer:
    """Training steps (forward, backward, AdamW) of a throw-away copy: ``run(n)``
    once to compile the kernels, then again, timed, while every pipeline does
    the same (the time then includes the sharing of the GPU)."""

    def __init__(self, model, stream: Stream, device):
        import torch

        self.m = copy.deepcopy(model).to(device).train()
        self.opt = torch.optim.AdamW(self.m.parameters(), lr=1e-5, fused=True)
        self.stream, self.device = stream, device

    def run(self, n: int) -> float:
        import torch

        dev = self.device
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            ids, tgt, kinds = self.stream.next()
            with _autocast(dev):
                logits = self.m(torch.as_tensor(ids, device=dev)).logits
            loss, _ = kind_loss(logits, torch.as_tensor(tgt, device=dev), torch.as_tensor(kinds, device=dev))
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n


# --- one pipeline (one process) ----------------------------------------------------------

def limit_autotuning(configs: int) -> None:
    """On CUDA, every Triton autotuner tries at most ``configs`` configurations.
    fla's and mamba-ssm's try up to ~100 per kernel: on 2026-11-30 the GLA
    pipelines had not compiled after 240 s. Any configuration computes the same
    function (kernels/autotune.py)."""
    import torch

    if configs > 0 and torch.cuda.is_available():
        from kernels.autotune import limit_autotune_search

        limit_autotune_search(configs)


class Pipeline:
    """One process: a (family, seed) pipeline of every arm, or the first seed's
    from-scratch upper bound. ``probe`` builds, compiles and times; the
    coordinator's plan sets the steps; ``run_arms`` trains and evaluates."""

    def __init__(self, args):
        import torch

        self.args, self.p, self.out = args, preset(args.preset, args.set), Path(args.out)
        self.fam, self.seed, self.kind, self.deadline = args.family, args.seed, args.kind, args.deadline
        self.arm_dir = self.out / "arms" / self.fam / (f"seed{self.seed}" if self.kind == "main" else "scratch")
        self.arm_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
        self.name = f"{self.fam}/{'seed' + str(self.seed) if self.kind == 'main' else 'scratch'}"
        self.corpus = Corpus(Path(args.corpus))
        self.eval_set = build_eval_set(self.corpus, self.p)
        self.base = new_model(self.fam, self.p, self.seed, expanded=(self.kind == "scratch")).to(self.device)
        self.probe_result: dict = {}

    def mqar_stream(self, seed: int | None = None) -> Stream:
        """MQAR rows only (no text, no passkey), for the phase before pre-training."""
        p = self.p
        return Stream(self.corpus, mqar_only(p), p.mqar_seq, p.pre_batch, p.mqar_pairs,
                      seed=500 + self.seed if seed is None else seed)

    def pre_stream(self) -> Stream:
        p = self.p
        return Stream(self.corpus, p, p.pre_seq, p.pre_batch, p.pre_pairs, seed=1000 + self.seed)

    def post_stream(self) -> Stream:
        """A fresh copy of the one post-training stream: every arm sees the same batches."""
        p = self.p
        return Stream(self.corpus, p, p.post_seq, p.post_batch, p.post_pairs, seed=2000 + self.seed)

    def probe(self) -> dict:
        """Compile (and autotune) every step and evaluation shape, signal ready,
        then time them together with the other pipelines once ``go`` appears."""
        p, dev, out = self.p, self.device, self.out
        t0 = time.perf_counter()
        probe_pre = Stream(self.corpus, p, p.pre_seq, p.pre_batch, p.pre_pairs, seed=99)
        probe_post = Stream(self.corpus, p, p.post_seq, p.post_batch, p.post_pairs, seed=99)
        warm, timed = (1, 1) if self.args.preset == "tiny" else (3, 5)
        timers = {"pre_step_s": StepTimer(self.base, probe_pre, dev),
                  "post_step_s": StepTimer(self.base, probe_post, dev)}
        if p.mqar_steps:
            timers["mqar_step_s"] = StepTimer(self.base, self.mqar_stream(seed=99), dev)
        if self.kind == "main":   # the expanded layers' kernels too
            timers["post_step_expanded_s"] = StepTimer(expand(self.fam, self.base, p, self.seed)[0], probe_post, dev)
        for t in timers.values():
            t.run(warm)
        evaluate(self.base, self.eval_set, p, dev, first_rows_only=2)
        time_eval(self.base, self.eval_set, p, dev, warm=True)
        log(f"{self.name}: compiled in {time.perf_counter() - t0:.0f} s")
        (out / "ready").mkdir(exist_ok=True)
        (out / "ready" / f"{self.fam}_{self.kind}_{self.seed}").touch()
        while not (out / "go").exists() and time.time() < self.deadline:
            time.sleep(0.1)
        probe = {k: t.run(timed) for k, t in timers.items()}
        del timers
        probe["eval_s"] = time_eval(self.base, self.eval_set, p, dev)
        probe["setup_s"] = time.perf_counter() - t0
        n_alt = int(self.args.alt and self.kind == "main")
        probe["evals_s"] = ((4 + n_alt) if self.kind == "main" else 1) * probe["eval_s"]
        probe["mqar_s"] = p.mqar_steps * probe.get("mqar_step_s", 0.0)
        probe["train_s"] = (probe["mqar_s"] + p.pre_steps * probe["pre_step_s"]
                            + p.post_steps * (probe["post_step_s"]
                                              + (1 + n_alt) * probe.get("post_step_expanded_s", 0.0)))
        (out / "probes").mkdir(exist_ok=True)
        (out / "probes" / f"{self.fam}_{self.kind}_{self.seed}.json").write_text(json.dumps(probe))
        log(f"{self.name}: probe {json.dumps({k: round(v, 4) for k, v in probe.items()})}")
        self.probe_result = probe
        return probe

    def wait_for_plan(self) -> dict | None:
        """The coordinator's plan.json, or None at the deadline."""
        plan_path = self.out / "plan.json"
        while not plan_path.exists():
            if time.time() > self.deadline:
                log(f"{self.name}: no plan before the deadline")
                return None
            time.sleep(0.2)
        return json.loads(plan_path.read_text())

    def until(self, evals_left: int) -> float:
        """Training stops in time for the evaluations still to come."""
        return self.deadline - evals_left * 1.5 * self.probe_result["eval_s"] - 5

    def train(self, model, stream: Stream, steps: int, phase: str, label: str, evals_left: int) -> dict:
        p = self.p
        lr, warmup = {"mqar": (p.mqar_lr, p.mqar_warmup), "pre": (p.pre_lr, p.pre_warmup),
                      "post": (p.post_lr, p.post_warmup)}[phase]
        return train(model, stream, steps, lr, warmup, self.device, p, f"{self.name} {label}", self.until(evals_left))

    def write(self, arm: str, rec: dict) -> None:
        rec |= {"family": self.fam, "seed": self.seed, "arm": arm}
        tmp = self.arm_dir / f".{arm}.json"
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(self.arm_dir / f"{arm}.json")
        log(f"{self.name}: wrote {arm}")

    def run_eval(self, model, arm: str, extra: dict, evals_after: int = 0) -> None:
        """Evaluate, write the arm's JSON, and save the first seed's servable checkpoints."""
        if time.time() > self.deadline:
            log(f"{self.name}: no time left to evaluate {arm}")
            return
        r = evaluate(model, self.eval_set, self.p, self.device, grow_until=self.until(evals_after + 1))
        self.write(arm, {"eval": r, "state_elements": state_elements(model),
                         "parameters": sum(q.numel() for q in model.parameters()), **extra})
        if self.args.save_checkpoints and arm in ("base", "lpt", "statex", "statex_alt"):
            self.save_checkpoint(model, arm, extra)

    def save_checkpoint(self, model, arm: str, extra: dict) -> None:
        """A servable checkpoint (our format, the byte tokenizer; key / value
        tokens have no text) for the bench's recall suite through the server."""
        from model_registry.checkpoint import save_checkpoint as save
        from model_registry.tokenizer import save_byte_tokenizer

        tok = self.out / "checkpoints" / ".byte-tokenizer"
        if not (tok / "tokenizer.json").is_file():
            save_byte_tokenizer(tok)
        prov = {"kind": f"statex capacity experiment: {arm}", "family": self.fam, "seed": self.seed, "arm": arm,
                **{k: v for k, v in extra.items() if k == "expansion"},
                "training": [{k: v for k, v in t.items() if k != "curve"} for t in extra.get("train", [])]}
        save(copy.deepcopy(model).to("cpu"), self.out / "checkpoints" / self.fam / arm, tokenizer_src=tok,
             provenance=prov, overwrite=True)

    def pretrain(self, mqar_steps: int, pre_steps: int, label: str, evals_left: int) -> list[dict]:
        """The MQAR-only phase (if any), then pre-training: their train records."""
        records = []
        if mqar_steps:
            records.append(self.train(self.base, self.mqar_stream(), mqar_steps, "mqar", f"{label} mqar", evals_left))
        records.append(self.train(self.base, self.pre_stream(), pre_steps, "pre", label, evals_left))
        return records

    def run_scratch(self, mqar_steps: int, pre_steps: int, post_steps: int) -> None:
        """The upper bound: the expanded architecture through every phase."""
        tr_pre = self.pretrain(mqar_steps, pre_steps, "pre", 1)
        tr_post = self.train(self.base, self.post_stream(), post_steps, "post", "post", 1)
        self.run_eval(self.base, "scratch", {"train": [*tr_pre, tr_post]})

    def run_arms(self, mqar_steps: int, pre_steps: int, post_steps: int) -> None:
        """Base, StateX at 0 steps, LPT, StateX (and its alternative), each evaluated when done."""
        arms = [("statex", False)] + ([("statex_alt", True)] if self.args.alt else [])
        base = self.base
        tr = self.pretrain(mqar_steps, pre_steps, "base", 3 + len(arms))
        self.run_eval(base, "base", {"train": tr}, evals_after=2 + len(arms))
        expanded = {}
        for arm, alt in arms:
            m, record = expand(self.fam, base, self.p, self.seed, alt)
            expanded[arm] = (m.to(self.device), record)
        self.run_eval(expanded["statex"][0], "statex0", {"expansion": expanded["statex"][1], "train": tr},
                      evals_after=1 + len(arms))
        lpt = copy.deepcopy(base)
        post_tr = self.train(lpt, self.post_stream(), post_steps, "post", "lpt", 1 + len(arms))
        self.run_eval(lpt, "lpt", {"train": [*tr, post_tr]}, evals_after=len(arms))
        del lpt
        for i, (arm, _) in enumerate(arms):
            m, record = expanded[arm]
            post_tr = self.train(m, self.post_stream(), post_steps, "post", arm, len(arms) - i)
            self.run_eval(m, arm, {"expansion": record, "train": [*tr, post_tr]}, evals_after=len(arms) - i - 1)


def worker(args) -> int:
    """One pipeline process: probe, wait for the plan, then the arms."""
    import torch

    torch.set_num_threads(max(1, args.threads))
    limit_autotuning(args.autotune_configs)
    pipe = Pipeline(args)
    pipe.probe()
    plan = pipe.wait_for_plan()
    if plan is None:
        return 1
    if plan.get("stop"):
        log(f"{pipe.name}: the plan says stop ({plan['reason']})")
        return 0
    if pipe.kind == "scratch":
        pipe.run_scratch(plan.get("mqar_steps", 0), plan["pre_steps"], plan["post_steps"])
    else:
        pipe.run_arms(plan.get("mqar_steps", 0), plan["pre_steps"], plan["post_steps"])
    return 0


# --- the pilot -------------------------------------------------------------------------------

def pilot(args) -> int:
    """Does the recipe learn recall at all? Per family and learning rate: a fresh
    base model trained on MQAR rows only (``pilot_seq`` tokens, ``pilot_pairs``)
    for ``pilot_steps`` steps, then its accuracy per pair count at that length.
    Minutes on a GPU, where gate 1 of a full run costs the whole run."""
    import torch

    limit_autotuning(args.autotune_configs)
    p = mqar_only(preset(args.preset, args.set))
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    corpus = Corpus(Path(args.corpus))
    cells = [{"group": "pilot", "task": "mqar", "length": p.pilot_seq, "pairs": n,
              "name": f"mqar@{p.pilot_seq}/{n}p", "rows": max(p.min_rows, math.ceil(p.mqar_answers / n)),
              "max_rows": max(p.min_rows, math.ceil(p.mqar_answers / n))}
             for n in p.pilot_eval_pairs if 4 * n < p.pilot_seq]
    eval_set = [EvalCell(c, corpus, p, 1234) for c in cells]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"preset": asdict(p), "environment": environment(), "runs": []}
    for fam in args.families.split(","):
        for lr in p.pilot_lrs:
            model = new_model(fam, p, args.seed).to(device)
            stream = Stream(corpus, p, p.pilot_seq, p.pre_batch, p.pilot_pairs, seed=3000 + args.seed)
            tr = train(model, stream, p.pilot_steps, lr, p.pre_warmup, device, p, f"pilot {fam} lr {lr:g}")
            ev = evaluate(model, eval_set, p, device)
            acc = {k: round(v["accuracy"], 4) for k, v in ev.items() if not k.startswith("_")}
            log(f"pilot {fam} lr {lr:g}: final recall loss {tr['curve'][-1]['recall']:.3f}, accuracy {acc}")
            results["runs"].append({"family": fam, "lr": lr, "train": tr, "eval": ev})
            (out / "pilot.json").write_text(json.dumps(results, indent=1))
    return 0


# --- the coordinator ------------------------------------------------------------------------

def environment() -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("triton", "flash-linear-attention", "mamba_ssm", "transformers"):
        try:   # metadata, not import: mamba_ssm's __init__ needs a CUDA extension we do not install
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    return env


SCALES = (1.0, 0.75, 0.5, 0.35, 0.25)


def plan_steps(p: Preset, probes: dict, elapsed: float, budget: float) -> dict:
    """Steps x1 if every pipeline's projected work (+10%) fits in what is left of
    the budget; else the largest scale of SCALES that fits; else stop. The scale
    applies to pre- and post-training only: the MQAR-only phase and evaluation
    keep their size (a shortened MQAR phase does not cross the plateau)."""
    if not probes:
        return {"stop": True, "reason": "no pipeline finished its probe"}
    left = budget - elapsed
    for scale in SCALES:
        need = max(pr.get("mqar_s", 0.0) + (pr["train_s"] - pr.get("mqar_s", 0.0)) * scale + pr["evals_s"]
                   for pr in probes.values())
        if need * 1.1 <= left:
            return {"stop": False, "scale": scale, "mqar_steps": p.mqar_steps,
                    "pre_steps": max(1, round(p.pre_steps * scale)),
                    "post_steps": max(1, round(p.post_steps * scale)), "projected_s": elapsed + need,
                    "left_s": left}
    return {"stop": True, "reason": f"projected {need:.0f} s of work even at {SCALES[-1]} of the steps; "
                                    f"{left:.0f} s left", "projected_s": elapsed + need}


def visible_gpus(args) -> list[str]:
    """The GPUs the pipelines may use (``--gpus``, default every visible one), as
    CUDA_VISIBLE_DEVICES entries; none on the CPU."""
    import torch

    if args.gpus is not None and args.gpus < 1:
        raise SystemExit(f"--gpus {args.gpus}: need at least 1")
    if args.device == "cpu" or not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        ids = [str(i) for i in range(torch.cuda.device_count())]
    n = len(ids) if args.gpus is None else args.gpus
    if n > len(ids):
        raise SystemExit(f"--gpus {n}: only {len(ids)} visible")
    return ids[:n]


def assign_gpus(jobs: list[tuple], gpus: list[str]) -> dict[tuple, str | None]:
    """Pipelines round-robin over the GPUs, in job order (every family's seeds, then
    the upper bounds), so that each GPU gets an equal share. The runs so far
    shared one GPU among four pipelines; each pipeline's steps are small kernels,
    and processes on one GPU take turns."""
    return {j: (gpus[i % len(gpus)] if gpus else None) for i, j in enumerate(jobs)}


def run(args) -> int:
    """The ``run`` command: start every pipeline (the first seed of each family
    first), then coordinate them (_coordinate)."""
    p = preset(args.preset, args.set)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} exists and is not empty (pass --overwrite)")
    if not Path(args.corpus).is_file():
        raise SystemExit(f"no corpus at {args.corpus}: run `prepare` first")
    seeds = [int(s) for s in args.seeds.split(",")]
    families = args.families.split(",")
    if not seeds or any(f not in ("gla", "mamba2") for f in families):
        raise SystemExit("--families must be gla and/or mamba2, --seeds a list of integers")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("plan.json", "meta.json", "go"):
        (out / f).unlink(missing_ok=True)
    for d in ("ready", "probes", "arms", "checkpoints"):
        if (out / d).is_dir():
            shutil.rmtree(out / d)
    t_start = time.time()
    deadline = t_start + args.budget_s
    meta = {"command": " ".join(["python", "-m", "training.experiments.statex_capacity", *sys.argv[1:]]),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset_name": args.preset,
            "preset": asdict(p), "overrides": args.set, "seeds": seeds, "families": families, "budget_s": args.budget_s,
            "environment": environment(), "corpus": {"path": str(args.corpus), "sha": Corpus(Path(args.corpus)).sha},
            "arms": list(ARMS) + (["statex_alt"] if args.alt else []) + ["scratch"]}
    jobs = [(f, s, "main") for f in families for s in seeds] + [(f, seeds[0], "scratch") for f in families]
    gpu_of = assign_gpus(jobs, visible_gpus(args))
    meta["gpus"] = {"/".join(map(str, j)): g for j, g in gpu_of.items()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "logs").mkdir(exist_ok=True)
    procs = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    def start(fam, seed, kind):
        cmd = [sys.executable, "-m", "training.experiments.statex_capacity", "_worker", "--family", fam, "--seed",
               str(seed), "--kind", kind, "--corpus", str(args.corpus), "--out", str(out), "--preset", args.preset,
               "--deadline", str(deadline), "--threads", str(args.threads), "--device", args.device] + \
              (["--alt"] if args.alt else []) + [f"--set={o}" for o in args.set] + \
               ["--autotune-configs", str(args.autotune_configs)] + \
              (["--save-checkpoints"] if args.checkpoints and kind == "main" and seed == seeds[0] else [])
        logf = (out / "logs" / f"{fam}_{kind}_{seed}.log").open("w")
        gpu = gpu_of[(fam, seed, kind)]
        procs[(fam, seed, kind)] = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT,
            env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu})

    # The first seed of each family compiles (and autotunes) alone; the others
    # start when it is ready and load its kernels from the shared Triton cache
    # instead of compiling the same kernels four times at once.
    first = [j for j in jobs if j[1] == seeds[0] and j[2] == "main"]
    for j in first:
        start(*j)
    log(f"compiling: {', '.join(f'{f}/{k}/{s}' for f, s, k in first)}")
    while time.time() < t_start + args.probe_s * 0.75:
        if all((out / "ready" / f"{f}_{k}_{s}").exists() or procs[(f, s, k)].poll() is not None
               for f, s, k in first):
            break
        time.sleep(0.2)
    rest = [j for j in jobs if j not in first]
    for j in rest:
        start(*j)
    log(f"after {time.time() - t_start:.0f} s started {', '.join(f'{f}/{k}/{s}' for f, s, k in rest)}")
    try:
        return _coordinate(args, p, out, procs, meta, t_start, deadline)
    finally:   # however the coordinator ends, no pipeline outlives it
        for pr in procs.values():
            if pr.poll() is None:
                pr.kill()


def _coordinate(args, p: Preset, out: Path, procs: dict, meta: dict, t_start: float, deadline: float) -> int:

    # stage 1: every pipeline compiles; when all are ready (or the probe time is up) they time
    # their steps together; then the plan
    while time.time() < t_start + args.probe_s:
        ready = len(list((out / "ready").glob("*"))) if (out / "ready").is_dir() else 0
        if ready >= sum(pr.poll() is None for pr in procs.values()):
            break
        time.sleep(0.2)
    (out / "go").touch()
    log(f"all pipelines compiled after {time.time() - t_start:.0f} s; timing steps")
    while True:
        probes = {q.stem: json.loads(q.read_text()) for q in (out / "probes").glob("*.json")} \
            if (out / "probes").is_dir() else {}
        alive = [k for k, pr in procs.items() if pr.poll() is None]
        if len(probes) >= len([k for k in procs if procs[k].poll() in (None, 0)]) or not alive \
                or time.time() > t_start + args.probe_s:
            break
        time.sleep(0.5)
    plan = plan_steps(p, probes, time.time() - t_start, args.budget_s - args.reserve_s)
    plan["probes"] = probes
    plan["elapsed_at_plan_s"] = time.time() - t_start
    (out / ".plan.json").write_text(json.dumps(plan, indent=1))
    (out / ".plan.json").replace(out / "plan.json")
    log(f"plan: {json.dumps({k: v for k, v in plan.items() if k != 'probes'})}")

    # stage 2: the pipelines run; kill any still running at the deadline
    for key, pr in procs.items():
        try:
            pr.wait(timeout=max(1.0, deadline + 15 - time.time()))
        except subprocess.TimeoutExpired:
            pr.kill()
            log(f"killed {key} at the deadline")
    status = {"/".join(map(str, k)): pr.returncode for k, pr in procs.items()}
    meta |= {"plan": {k: v for k, v in plan.items() if k != "probes"}, "exit_codes": status,
             "elapsed_s": time.time() - t_start}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"done in {meta['elapsed_s']:.0f} s; exit codes {status}")
    results = collect(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all(c == 0 for c in status.values()) else 1


def collect(out: Path) -> dict:
    """meta.json plus every arm JSON, in one dict (what the report reads)."""
    meta = json.loads((out / "meta.json").read_text())
    arms = [json.loads(f.read_text()) for f in sorted((out / "arms").glob("*/*/*.json"))]
    return {"meta": meta, "arms": arms}


def main(argv=None) -> int:
    """The command line: prepare, run, pilot, report (and the internal _worker)."""
    ap = argparse.ArgumentParser(prog="python -m training.experiments.statex_capacity",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write the text corpus (JSONL)")
    pp.add_argument("--out", required=True)
    pr = sub.add_parser("run", help="every pipeline, concurrently; results per arm as they finish")
    pr.add_argument("--corpus", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--seeds", default="0,1,2")
    pr.add_argument("--families", default="gla,mamba2")
    pr.add_argument("--tiny", dest="preset", action="store_const", const="tiny", default="full",
                    help="the toy size (CPU, under a minute)")
    pr.add_argument("--alt", action="store_true", help="also the alternative expansion (default GLA inherit, "
                                                       "Mamba2 preserve with dt inherited; --set alt_*_init=...)")
    pr.add_argument("--budget-s", type=float, default=400, help="wall clock for the whole run, from its start")
    pr.add_argument("--reserve-s", type=float, default=15, help="held back from the plan for writing results")
    pr.add_argument("--probe-s", type=float, default=240, help="give up waiting for probes after this")
    pr.add_argument("--threads", type=int, default=2, help="torch CPU threads per pipeline")
    pr.add_argument("--gpus", type=int, default=None,
                    help="spread the pipelines over this many of the visible GPUs (default: all of them)")
    pr.add_argument("--device", default="auto", choices=("auto", "cpu"))
    pr.add_argument("--autotune-configs", type=int, default=2,
                    help="on CUDA, each Triton autotuner tries at most this many configurations (0: all)")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--checkpoints", action="store_true",
                    help="save the first seed's base, LPT and StateX as servable checkpoints (OUT/checkpoints/)")
    pr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a preset field, e.g. --set pre_steps=3000 --set pre_lr=2e-3 (recorded in meta.json)")
    pw = sub.add_parser("_worker", help=argparse.SUPPRESS)
    for a in ("--family", "--kind", "--corpus", "--out", "--preset", "--device"):
        pw.add_argument(a, required=True)
    pw.add_argument("--seed", type=int, required=True)
    pw.add_argument("--deadline", type=float, required=True)
    pw.add_argument("--threads", type=int, default=2)
    pw.add_argument("--autotune-configs", type=int, default=0)
    pw.add_argument("--alt", action="store_true")
    pw.add_argument("--set", action="append", default=[])
    pw.add_argument("--save-checkpoints", action="store_true")
    pl = sub.add_parser("pilot", help="MQAR only, a few learning rates, per family: does the recipe learn "
                                      "recall at all? (run before a full run)")
    pl.add_argument("--corpus", required=True)
    pl.add_argument("--out", required=True, help="directory for pilot.json")
    pl.add_argument("--families", default="gla,mamba2")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--tiny", dest="preset", action="store_const", const="tiny", default="full")
    pl.add_argument("--device", default="auto", choices=("auto", "cpu"))
    pl.add_argument("--autotune-configs", type=int, default=2,
                    help="on CUDA, each Triton autotuner tries at most this many configurations (0: all)")
    pl.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a preset field, e.g. --set mqar_layout=zoology --set pilot_lrs=1e-3,1e-2")
    rp = sub.add_parser("report", help="results directory -> markdown with tables and plots")
    rp.add_argument("--results", required=True, help="a run's --out (or its results.json)")
    rp.add_argument("--out", required=True, help="the markdown file; plots and the raw JSON go beside it")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare_corpus(Path(args.out))
        return 0
    if args.cmd == "_worker":
        return worker(args)
    if args.cmd == "pilot":
        return pilot(args)
    if args.cmd == "report":
        from training.experiments.capacity_report import write_report

        write_report(Path(args.results), Path(args.out))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
