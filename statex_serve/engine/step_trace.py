"""A per-step timeline of the native engine, for finding where time goes under load.

Set ``STATEX_STEP_TRACE=FILE`` and the engine appends one JSON line per step to
FILE: when the step began (seconds since the engine was built), what it ran
(decode rows, prefill segments and tokens, requests admitted, whether the next
decode was launched ahead of the host work) and, per phase (admission, decode,
prefill), the wall time and the engine thread's CPU time, and ``wait_ms``: the
time spent sampling and reading the tokens back from the device, mostly waiting
for the GPU step (CUDA's wait spins, so it shows as CPU time too; in a step that
prefills, it includes sampling the finished prompts' first tokens). Wall time the thread
did not spend on the CPU is time it waited for the GIL (the event loop's work). Off by default: the
bookkeeping costs a few microseconds a step.

    python -m statex_serve.engine.step_trace FILE     # a summary per kind of step
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from contextlib import contextmanager

logger = logging.getLogger(__name__)

PHASES = ("admit", "decode", "prefill")


class StepTrace:
    """Collects one record per step and writes them as JSON lines (buffered)."""

    FLUSH_EVERY = 512

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as e:    # the server answers it with "cannot start: ..." and exit 2
            raise OSError(f"STATEX_STEP_TRACE={path}: cannot write there ({e.strerror or e})") from None
        self._origin = time.perf_counter()
        self._buffer: list[str] = []
        self.current: dict | None = None
        logger.info("step trace: one line per engine step into %s", path)

    def begin(self) -> None:
        self.current = {"t": round(time.perf_counter() - self._origin, 6)}

    @contextmanager
    def phase(self, name: str):
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            if self.current is not None:
                self.current[f"{name}_ms"] = round((time.perf_counter() - w0) * 1e3, 3)
                self.current[f"{name}_cpu_ms"] = round((time.thread_time() - c0) * 1e3, 3)

    def add(self, key: str, ms: float) -> None:
        """Add to a figure of the current step (e.g. time spent waiting for the GPU)."""
        if self.current is not None:
            self.current[key] = round(self.current.get(key, 0.0) + ms, 3)

    def end(self, **facts) -> None:
        if self.current is None:
            return
        self.current.update(facts)
        self._buffer.append(json.dumps(self.current))
        self.current = None
        if len(self._buffer) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._file.write("\n".join(self._buffer) + "\n")
            self._file.flush()
            self._buffer.clear()

    def close(self) -> None:
        self.flush()
        self._file.close()


def step_kind(rec: dict) -> str:
    if rec.get("prefill_tokens"):
        return "mixed" if rec.get("decode_rows") else "prefill"
    return "decode"


def summarize(records: list[dict]) -> str:
    """A Markdown table per kind of step: how many, their wall time (p50, total),
    the engine thread's CPU share, and the gap to the next step's start."""
    if not records:
        return "no steps recorded"
    gaps = [b["t"] - a["t"] for a, b in zip(records, records[1:])] + [None]
    rows = ["| kind | steps | step p50 ms | step total s | decode p50 ms (cpu) | prefill p50 ms (cpu) | "
            "wait p50 ms | rows p50 | prefill tok p50 | start-to-start p50 ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("decode", "mixed", "prefill"):
        sel = [(r, g) for r, g in zip(records, gaps) if step_kind(r) == kind]
        if not sel:
            continue
        recs = [r for r, _ in sel]

        def p50(key, recs=recs):
            vals = [r[key] for r in recs if key in r]
            return statistics.median(vals) if vals else 0.0
        wall = [sum(r.get(f"{p}_ms", 0.0) for p in PHASES) for r in recs]
        between = [g * 1e3 for _, g in sel if g is not None]
        rows.append(f"| {kind} | {len(recs)} | {statistics.median(wall):.2f} | {sum(wall) / 1e3:.3f} | "
                    f"{p50('decode_ms'):.2f} ({p50('decode_cpu_ms'):.2f}) | "
                    f"{p50('prefill_ms'):.2f} ({p50('prefill_cpu_ms'):.2f}) | {p50('wait_ms'):.2f} | "
                    f"{p50('decode_rows'):.0f} | "
                    f"{p50('prefill_tokens'):.0f} | {statistics.median(between) if between else 0.0:.2f} |")
    span = records[-1]["t"] - records[0]["t"]
    busy = sum(sum(r.get(f"{p}_ms", 0.0) for p in PHASES) for r in records) / 1e3
    rows.append("")
    rows.append(f"{len(records)} steps over {span:.3f} s; inside steps {busy:.3f} s, between steps "
                f"{span - busy:.3f} s (the engine thread idle or waiting for the GIL between steps)")
    return "\n".join(rows)


def read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m statex_serve.engine.step_trace",
                                 description="Summarize a STATEX_STEP_TRACE file: a table per kind of step.")
    ap.add_argument("file", help="the JSON-lines file the engine wrote")
    args = ap.parse_args(argv)
    try:
        records = read(args.file)
    except (OSError, json.JSONDecodeError) as e:
        print(f"step_trace: cannot read {args.file}: {e}", file=sys.stderr)
        return 1
    print(summarize(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
