"""The capacity experiment's own eval cells as recall-suite tasks, so a served
checkpoint of that experiment answers exactly the rows its ``evaluate`` scored.

``--tasks 'capacity:CELL?FIELD=VALUE&...'``: CELL is the experiment's cell name
(``mqar@2048/16p``, ``passkey@512``), which also fixes the cell's context;
the options are ``preset=full|tiny`` (default full), any ``Preset`` field (the
run's ``--set`` overrides, e.g. ``mqar_layout=zoology``) and ``corpus=FILE``
(the run's corpus, for the text layout's held-out filler). Row i is the
experiment's row i (``EvalCell`` with the recall seed, 1234 by default); each
answer (an MQAR value, the passkey's digits) becomes one query: the row up to
it as the prompt, its tokens as the expected ids. Key and value tokens have no
text, so these answers are scored on token ids only. docs/bench.md has the
command; training/experiments/statex_capacity.py the rows.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from statex_serve.bench.targets import BenchError

KIND = "capacity"
_CELL = re.compile(r"(mqar)@([1-9][0-9]*)/([1-9][0-9]*)p|(passkey)@([1-9][0-9]*)")


@dataclass
class CapacityTask:
    text: str                 # the --tasks entry, as given
    cell: dict                # an EvalCell spec: name, task, length, pairs
    preset: object            # statex_capacity.Preset
    corpus: str | None

    @property
    def length(self) -> int:
        return self.cell["length"]


def is_capacity(task: str) -> bool:
    return task.split("?", 1)[0].split(":", 1)[0] == KIND


def title(task: str) -> str:
    """What a plot calls a recall task: a capacity cell by its name (the options make it too long)."""
    return task.split("?", 1)[0].partition(":")[2] if is_capacity(task) else task


def parse(text: str) -> CapacityTask:
    """``capacity:CELL?options`` -> CapacityTask (raises BenchError); row 0 is built
    here, so a cell that does not fit its length fails before any target starts."""
    from urllib.parse import parse_qsl

    from training.experiments import statex_capacity as sc

    head, _, query = text.partition("?")
    name = head.partition(":")[2]
    m = _CELL.fullmatch(name)
    if not m:
        raise BenchError(f"--tasks {text}: need capacity:mqar@LENGTH/PAIRSp or capacity:passkey@LENGTH "
                         "(an experiment cell name, e.g. capacity:mqar@2048/16p)")
    cell = ({"task": "mqar", "length": int(m[2]), "pairs": int(m[3])} if m[1]
            else {"task": "passkey", "length": int(m[5])})
    cell["name"] = name       # the name seeds the cell's rows, as in the experiment
    options = dict(parse_qsl(query, keep_blank_values=True))
    preset_name, corpus = options.pop("preset", "full"), options.pop("corpus", None)
    if preset_name not in sc.PRESETS:
        raise BenchError(f"--tasks {text}: preset must be one of {', '.join(sc.PRESETS)}")
    unknown = [k for k in options if k not in sc.Preset.__dataclass_fields__]
    if unknown:
        raise BenchError(f"--tasks {text}: {unknown[0]!r} is not preset, corpus or a field of the "
                         "experiment's Preset")
    try:
        preset = sc.preset(preset_name, [f"{k}={v}" for k, v in options.items()])
    except SystemExit as e:   # preset()'s own one-line message about a bad value
        raise BenchError(f"--tasks {text}: {e}") from None
    if cell["task"] == "mqar" and preset.mqar_layout == "text" and not corpus:
        raise BenchError(f"--tasks {text}: the text layout's filler is the run's corpus: add corpus=FILE "
                         "(or mqar_layout=zoology if the run used it)")
    task = CapacityTask(text, cell, preset, corpus)
    rows(task, 1, 1234)
    return task


@functools.lru_cache(maxsize=4)
def _corpus(path: str):
    from training.experiments.statex_capacity import Corpus

    return Corpus(path)


def rows(task: CapacityTask, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The experiment's first ``n`` rows of the cell (ids, targets), for eval seed ``seed``."""
    from training.experiments.statex_capacity import EvalCell

    try:
        corpus = _corpus(task.corpus) if task.corpus else None
        return EvalCell(task.cell, corpus, task.preset, seed).rows(0, n)
    except OSError as e:
        raise BenchError(f"--tasks {task.text}: corpus: {e}") from None
    except (SystemExit, ValueError) as e:   # a corpus too small; pairs or a passkey that do not fit
        raise BenchError(f"--tasks {task.text}: {e}") from None


def check_vocabulary(task: CapacityTask, codec, vocab_size: int | None, label: str) -> None:
    """The rows are byte tokens, BOS and the key / value tokens after them: the
    target must have that byte tokenizer and a vocabulary that holds those ids."""
    p = task.preset
    need = f"byte tokens, BOS and key/value tokens up to id {p.vocab - 1} (n_keys={p.n_keys}, n_values={p.n_values})"
    if vocab_size is None:
        raise BenchError(f"{task.text}: target {label}: its vocabulary size is unknown (add ?dir=CHECKPOINT); "
                         f"the cell needs {need}")
    if not getattr(codec, "is_bytes", False) or vocab_size < p.vocab:
        what = "byte-level" if getattr(codec, "is_bytes", False) else "not byte-level"
        raise BenchError(f"{task.text}: target {label} has no such tokens (its tokenizer is {what}, its "
                         f"vocabulary {vocab_size} ids); the cell needs {need}")


def build_queries(task: CapacityTask, n: int, seed: int, mqar_queries: int) -> tuple[list[dict], list]:
    """The recall suite's queries and samples for the cell's first ``n`` rows: at
    most ``mqar_queries`` answers per row (evenly spread, as for text MQAR)."""
    from statex_serve.bench.recall import pick_spans
    from training.experiments.statex_capacity import IGNORE, EvalCell
    from training.tasks import Sample

    ids, tgt = rows(task, n, seed)
    queries, samples = [], []
    for i in range(n):
        asked = np.flatnonzero(tgt[i] != IGNORE)
        # runs of consecutive targets are one answer (the passkey's digits); MQAR answers are apart
        runs = np.split(asked, np.flatnonzero(np.diff(asked) != 1) + 1)
        spans = [(int(r[0]) + 1, int(r[-1]) + 2) for r in runs]       # answer tokens ids[a:e]
        depth = EvalCell.DEPTHS[i % len(EvalCell.DEPTHS)] if task.cell["task"] == "passkey" else None
        samples.append(Sample(ids[i].tolist(), spans, {"task": task.cell["task"], "depth": depth}))
        for j in pick_spans(spans, mqar_queries):
            a, e = spans[j]
            queries.append({"sample": i, "span": j, "depth": depth, "prompt": ids[i, :a].tolist(),
                            "expected": ids[i, a:e].tolist(), "token_ids": True})
    return queries, samples
