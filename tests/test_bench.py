"""``python -m statex_serve.bench``: the quick suites against a live server on
loopback (spawned by the bench) and the in-process engine side by side, bad
input, and the pieces the numbers rest on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from model_registry.testing import make_tiny_checkpoint
from statex_serve.bench import cli
from statex_serve.bench.modelinfo import H200_BANDWIDTH, load_facts, matched_transformer, parse_bandwidth
from statex_serve.bench.recall import pick_spans
from statex_serve.bench.targets import BenchError, RequestResult, _add_tokens, parse_target

DEPTHS = {"0.00", "0.25", "0.50", "0.75", "1.00"}
CONTEXTS = [64, 256, 1024]
OUTPUT_LEN = 16
REQUESTS = 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-ckpt")
    return {"statex": make_tiny_checkpoint(root / "statex", "gla", expanded=True, seed=0),
            "base": make_tiny_checkpoint(root / "base", "gla", expanded=False, seed=0)}


@pytest.fixture(scope="module")
def quick_run(ckpts, tmp_path_factory):
    """One quick run of every suite, A a statex-serve the bench spawns on
    loopback, B the base checkpoint on the engine in the bench's process."""
    out = tmp_path_factory.mktemp("bench-out")
    cmd = [sys.executable, "-m", "statex_serve.bench", "all", "--quick", "--no-progress",
           "--target", f"spawn:{ckpts['statex']}?label=statex&max_num_seqs=8",
           "--target", f"engine:{ckpts['base']}?label=base&max_num_seqs=8",
           "--contexts", ",".join(map(str, CONTEXTS)), "--concurrency", "1,2", "--requests", str(REQUESTS),
           "--output-len", str(OUTPUT_LEN), "--recall-contexts", "384,512", "--samples", "5", "--mqar-queries", "2",
           "--memory-models", "gla-1.3b", "--out", str(out)]
    # one torch thread per process: the bench, the engine in it and the spawned
    # server share 2 cores, and spinning OpenMP workers of oversubscribed
    # processes slow every decode step several-fold
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()                  # SIGTERM: the bench stops the server it spawned
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the quick run did not finish in 600 s: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), stdout


def test_quick_run_writes_json_markdown_and_plots(quick_run):
    out, res, stdout = quick_run
    assert res["command"].startswith("python -m statex_serve.bench all --quick")
    env = res["environment"]
    assert env["threads"]["OMP_NUM_THREADS"] == "1"
    assert env["versions"]["torch"] and env["versions"]["transformers"] and env["hardware"]["cpu_count"] >= 1
    assert [t["label"] for t in res["targets"]] == ["statex", "base"]
    assert [t["kind"] for t in res["targets"]] == ["spawn", "engine"]
    assert set(res["suites"]) == {"latency", "recall", "memory", "compare"}
    md = (out / "results.md").read_text()
    for heading in ("## Latency vs context", "## Recall vs context", "## Memory vs context", "## Compare"):
        assert heading in md
    assert md in stdout
    assert sorted(res["plots"]) == ["latency.png", "memory.png", "recall.png", "throughput.png"]
    for name in res["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert sorted(_image_links(md)) == sorted(res["plots"])       # every plot shown, no link to a missing one


def _image_links(md: str) -> list[str]:
    import re

    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_links_only_the_plots_the_run_drew(quick_run):
    """A suite cut short draws no plot: its section keeps its table and loses the link."""
    from statex_serve.bench.report import markdown

    _, res, _ = quick_run
    assert _image_links(markdown({**res, "plots": ["recall.png"]})) == ["recall.png"]
    assert _image_links(markdown({**res, "plots": []})) == []


def test_latency_cells_are_sane(quick_run):
    _, res, _ = quick_run
    for label, lat in res["suites"]["latency"].items():
        for c in (1, 2):
            cells = [cell for cell in lat["cells"] if cell["concurrency"] == c]
            assert [cell["context"] for cell in cells] == CONTEXTS, label     # monotone, none skipped
        for cell in lat["cells"]:
            s = cell["summary"]
            assert s["requests_failed"] == 0, s["errors"]
            assert s["requests_ok"] == REQUESTS
            for m in ("ttft", "tpot", "itl", "e2e"):
                assert 0 < s[m]["p50_ms"] <= s[m]["p99_ms"] + 1e-9
            assert s["output_throughput_tok_s"] > 0
            assert "floor_tpot_ms" in cell and cell["floor_tpot_ms"] > 0
            for r in cell["requests"]:
                assert r["prompt_tokens"] == cell["context"] and r["completion_tokens"] == OUTPUT_LEN
                assert len(r["itl_s"]) == OUTPUT_LEN - 1
                assert 0 < r["ttft_s"] <= r["e2e_s"]


def test_tpot_roughly_flat_in_context(quick_run):
    """A recurrent model reads a constant-size state per token: a decode step
    at 1K context costs about what it costs at 64. Judged at concurrency 1 on
    the lower quartile of each cell's inter-token gaps (other work on a shared
    2-core box only ever adds time; a quartile of ~30 gaps shrugs off bursts),
    with a generous bound; the report's TPOT p50 flatness is printed beside."""
    _, res, _ = quick_run
    for label in ("statex", "base"):
        lat = res["suites"]["latency"][label]
        flat = lat["tpot_flatness"]["1"]
        assert flat["contexts"] == CONTEXTS
        q1 = [float(np.percentile([g for r in c["requests"] for g in r["itl_s"] if g > 0], 25))
              for c in lat["cells"] if c["concurrency"] == 1]
        assert max(q1) / min(q1) < 3.0, (label, q1, flat["tpot_p50_ms"])


def test_recall_rows_are_sane(quick_run):
    _, res, _ = quick_run
    for rec in res["suites"]["recall"].values():
        assert [r["task"] for r in rec["rows"]] == ["passkey"] * 2 + ["niah"] * 2 + ["mqar"] * 2
        for task in ("passkey", "niah", "mqar"):
            assert [r["context"] for r in rec["rows"] if r["task"] == task] == [384, 512]
        for r in rec["rows"]:
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["sample_accuracy"] <= 1.0
            assert r["errors"] == 0 and r["n_samples"] == 5 and r["tokens_mean"] == r["context"]
            if r["task"] == "mqar":
                assert r["n_answers"] == 10
            else:
                assert r["n_answers"] == 5 and set(r["by_depth"]) == DEPTHS
                assert all(0.0 <= v <= 1.0 for v in r["by_depth"].values())
            for a in r["answers"]:
                assert a["correct"] == (a["got"] == a["expected"])


def test_memory_suite(quick_run, ckpts):
    _, res, _ = quick_run
    mem = res["suites"]["memory"]
    entries = {e["label"]: e for e in mem["entries"]}
    assert set(entries) == {"statex", "base", "gla-1.3b"}
    assert mem["llama_kv_check"]["all_match"]
    for label, e in entries.items():
        rows = e["rows"]
        assert [r["context"] for r in rows] == sorted(r["context"] for r in rows)
        assert len({r["bytes_per_sequence"] for r in rows}) == 1                 # constant state
        tf = [r["transformer_bytes_per_sequence"] for r in rows]
        assert tf == [e["transformer"]["kv_bytes_per_token"] * r["context"] for r in rows]   # linear KV
        assert all(r["max_sequences"] == mem["budget_bytes"] // r["bytes_per_sequence"] for r in rows)
    for label in ("statex", "base"):
        served = entries[label]["served"]
        assert served["matches_config"] and served["pool_bytes_per_slot"] == served["state_bytes_per_sequence"]
    big = entries["gla-1.3b"]["model"]
    assert big["state_bytes_per_sequence"] == 48 * 2**20          # fp32 S[4, 256, 512] x 24 layers


def test_compare_pairs_the_two_targets(quick_run):
    _, res, _ = quick_run
    cmp = res["suites"]["compare"]
    assert (cmp["a"], cmp["b"]) == ("statex", "base")
    assert [(r["context"], r["concurrency"]) for r in cmp["latency"]] == [(x, c) for x in CONTEXTS for c in (1, 2)]
    for r in cmp["latency"]:
        v = r["tpot_p50_ms"]
        assert v["b_over_a"] == pytest.approx(v["b"] / v["a"])
    assert len(cmp["recall"]) == 6
    m = cmp["memory"]
    assert m["state_bytes_per_sequence_a"] > m["state_bytes_per_sequence_b"]    # merged heads: bigger state
    assert m["b_over_a"] == pytest.approx(m["state_bytes_per_sequence_b"] / m["state_bytes_per_sequence_a"])


@pytest.mark.parametrize("argv, message", [
    (["nosuch"], "unknown suite 'nosuch'"),
    (["compare", "--target", "http://127.0.0.1:9"], "compare needs exactly two targets"),
    (["latency", "--target", "spawn:/no/such/dir"], "is not a checkpoint directory"),
    (["latency", "--contexts", "1K,abc"], "is not a comma-separated list"),
    (["memory", "--bandwidth", "fast"], "cannot read 'fast' as a bandwidth"),
    (["memory", "--memory-budget", "lots"], "cannot read 'lots' as a memory size"),
    (["memory", "--memory-models", "gpt-9"], "gpt-9 is neither a preset"),
    (["recall", "--target", "http://127.0.0.1:9", "--tasks", "passkey,sudoku"], "sudoku"),
    (["latency", "--target", "url:ftp://x"], "needs http:// or https://"),
])
def test_bad_input_is_one_line_and_nonzero(argv, message, capsys, tmp_path):
    try:
        rc = cli.main([*argv, "--out", str(tmp_path / "o"), "--no-progress"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_unreachable_url_is_one_line(capsys, tmp_path):
    rc = cli.main(["latency", "--target", "http://127.0.0.1:9", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "GET http://127.0.0.1:9/v1/models failed" in err[-1]


def test_tokens_of_one_chunk_are_spread_over_its_gap():
    r = RequestResult(prompt_tokens=1)
    _add_tokens(r, 2, 0.10)          # first chunk: two tokens at once (TTFT is when they arrive)
    _add_tokens(r, 3, 0.20)
    _add_tokens(r, 6, 0.50)          # three tokens held back then sent together
    assert r.token_times == pytest.approx([0.1, 0.1, 0.2, 0.3, 0.4, 0.5])
    r.ttft, r.e2e, r.completion_tokens = 0.1, 0.5, 6
    assert r.tpot == pytest.approx(0.08)


def test_pick_spans():
    spans = [(i, i + 1) for i in range(10)]
    assert pick_spans(spans, 4) == [0, 3, 6, 9]
    assert pick_spans(spans[:3], 4) == [0, 1, 2]
    assert pick_spans(spans, 1) == [9]


def test_floor_and_presets():
    gla = load_facts("gla-1.3b")
    statex = load_facts("gla-1.3b-statex")
    assert statex.state_bytes_per_sequence == 72 * 2**20 and statex.expanded_layers == [0, 6, 12, 18]
    # the decode floor (docs/bench.md): 2.73 GB of bf16 weights + 2 x 48 MiB state at 4.25 TB/s: about 0.67 ms
    assert gla.weights_bytes == pytest.approx(2.73e9, rel=0.01)
    assert gla.decode_floor_s(1, 4096, H200_BANDWIDTH) * 1e3 == pytest.approx(0.666, abs=0.005)
    assert gla.decode_floor_s(1, 4096, H200_BANDWIDTH) == gla.decode_floor_s(1, 131072, H200_BANDWIDTH)
    tf = matched_transformer(gla)
    assert abs(tf.params - gla.params) / gla.params < 0.05
    assert tf.decode_floor_s(1, 131072, H200_BANDWIDTH) > tf.decode_floor_s(1, 4096, H200_BANDWIDTH)
    assert parse_bandwidth("4.25TB/s") == 4.25e12 and parse_bandwidth("900 GB/s") == 9e11
    with pytest.raises(BenchError):
        parse_target("engine:/no/such/checkpoint")


def test_a_stopped_run_keeps_what_it_measured(ckpts, tmp_path):
    """SIGTERM after the latency suite finished, during the prefix suite: exit 143,
    and results.json / results.md hold the latency tables, marked incomplete."""
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "statex_serve.bench", "latency", "prefix", "--quick", "--no-progress",
           "--target", f"engine:{ckpts['base']}?label=base", "--contexts", "64,128", "--concurrency", "1",
           "--requests", "1", "--output-len", "4", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (out / "results.json").exists():   # the first checkpoint: latency done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[0].endswith("terminated")
    res = json.loads((out / "results.json").read_text())
    assert res["incomplete"].startswith("terminated")
    assert [c["context"] for c in res["suites"]["latency"]["base"]["cells"]] == [64, 128]
    assert "Incomplete run" in (out / "results.md").read_text()
