"""The bench's ``capacity:CELL`` recall tasks (statex_serve/bench/capacity.py):
its queries are the capacity experiment's own rows, and a served tiny capacity
checkpoint scores them as the experiment's ``evaluate`` does, on the engine and
through statex-serve's HTTP server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from statex_serve.bench import capacity, cli
from statex_serve.bench.recall import RecallConfig, plan
from statex_serve.bench.targets import BenchError
from training.experiments import statex_capacity as sc

# the tiny preset, as a run with these --set overrides would have used it
SET = {"mqar_layout": "zoology", "n_keys": 16, "n_values": 16}
OPTS = "preset=tiny&" + "&".join(f"{k}={v}" for k, v in SET.items())
ROWS = 12


def experiment_cell(name: str, p, corpus=None) -> sc.EvalCell:
    """The experiment's own cell of that name, from its eval set (seed 1234)."""
    cells = [c for c in sc.eval_cells(p) if c["name"] == name]
    assert cells, f"{name} is not a cell of the preset"
    return sc.EvalCell(cells[0], corpus, p, 1234)


@pytest.mark.parametrize("name, layout", [("mqar@96/2p", "zoology"), ("mqar@160/8p", "zoology"),
                                          ("mqar@160/8p", "text"), ("passkey@300", "zoology")])
def test_queries_are_the_experiments_rows(name, layout, corpus_file):
    p = replace(sc.PRESETS["tiny"], **SET | {"mqar_layout": layout})
    task = capacity.parse(f"capacity:{name}?{OPTS}&mqar_layout={layout}&corpus={corpus_file}")
    queries, samples = capacity.build_queries(task, ROWS, 1234, mqar_queries=1000)
    ids, tgt = experiment_cell(name, p, sc.Corpus(corpus_file)).rows(0, ROWS)
    asked = [(i, q) for i in range(ROWS) for q in np.flatnonzero(tgt[i] != sc.IGNORE)]
    assert [s.ids for s in samples] == ids.tolist()
    if name.startswith("mqar"):   # one query per answer: the row up to the key, the value expected
        assert [(q["sample"], len(q["prompt"]) - 1) for q in queries] == asked
        for q, (i, pos) in zip(queries, asked):
            assert q["prompt"] == ids[i, :pos + 1].tolist() and q["expected"] == [tgt[i, pos]]
            assert sc.KEY0 + p.n_keys <= q["expected"][0] < p.vocab
    else:                         # one query per row: the passkey's digits after the question
        assert len(queries) == ROWS
        for q, i in zip(queries, range(ROWS)):
            a = len(q["prompt"])
            assert q["expected"] == tgt[i, a - 1:a - 1 + len(q["expected"])].tolist() == ids[i, a:a + 6].tolist()
            assert (tgt[i, a - 1 + 6:] == sc.IGNORE).all() and (tgt[i, :a - 1] == sc.IGNORE).all()


def test_mqar_queries_spreads_the_asked_answers():
    task = capacity.parse(f"capacity:mqar@160/8p?{OPTS}")
    queries, _ = capacity.build_queries(task, 3, 1234, mqar_queries=3)
    assert [(q["sample"], q["span"]) for q in queries] == [(i, j) for i in range(3) for j in (0, 4, 7)]


@pytest.mark.parametrize("spec, message", [
    ("capacity:mqar@2048", "need capacity:mqar@LENGTH/PAIRSp"),
    ("capacity:niah@512", "need capacity:mqar@LENGTH/PAIRSp"),
    ("capacity:mqar@0512/8p?mqar_layout=zoology", "need capacity:mqar@LENGTH/PAIRSp"),
    ("capacity:mqar@100/30p?mqar_layout=zoology", "30 pairs do not fit in 100 tokens"),
    ("capacity:passkey@100", "passkey needs at least"),
    ("capacity:mqar@512/8p?mqar_layout=zoology&pairs=8", "'pairs' is not preset, corpus or a field"),
    ("capacity:mqar@512/8p?n_keys=many&mqar_layout=zoology", "'many' is not a valid int"),
    ("capacity:mqar@512/8p?preset=huge", "preset must be one of full, tiny"),
    ("capacity:mqar@512/8p?mqar_layout=text", "add corpus=FILE"),
    ("capacity:mqar@512/8p?corpus=/no/such.jsonl", "corpus: [Errno 2]"),
])
def test_bad_spec_is_one_line_and_nonzero(spec, message, capsys, tmp_path):
    rc = cli.main(["recall", "--target", "http://127.0.0.1:9", "--tasks", spec, "--out", str(tmp_path / "o"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


class _Codec:
    def __init__(self, is_bytes: bool):
        self.is_bytes = is_bytes      # what training's TextCodec says of a byte-level tokenizer


def test_a_vocabulary_without_key_tokens_is_refused():
    cfg = RecallConfig([f"capacity:mqar@160/8p?{OPTS}"], [512], 2)
    for codec, vocab, message in ((_Codec(False), 10_000, "is not byte-level"),
                                  (_Codec(True), 259, "vocabulary 259 ids"),
                                  (_Codec(True), None, "vocabulary size is unknown")):
        with pytest.raises(BenchError, match=message):
            plan(codec, cfg, None, vocab, "t")
    cells = plan(_Codec(True), cfg, None, sc.KEY0 + 32, "t")
    assert [(c["context"], len(c["queries"])) for c in cells] == [(160, 2 * 4)]   # its own length, 4 answers a row


# --- a served tiny capacity checkpoint --------------------------------------------------

CELLS = ("mqar@96/2p", "mqar@160/8p", "passkey@300")


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory):
    """A tiny Mamba2 of the experiment, trained on MQAR until it recalls some
    answers (not all, not none: a wrong verdict anywhere shows), saved as the
    experiment saves its checkpoints."""
    import torch

    from model_registry.checkpoint import save_checkpoint
    from model_registry.tokenizer import save_byte_tokenizer

    torch.manual_seed(0)
    p = replace(sc.PRESETS["tiny"], **SET, frac_text=0.0, frac_passkey=0.0)
    model = sc.new_model("mamba2", p, 0)
    sc.train(model, sc.Stream(sc.Corpus(corpus_file), p, 96, 16, (2, 4), 0), 100, 1e-2, 5, torch.device("cpu"),
             p, "tiny")
    root = tmp_path_factory.mktemp("capacity-ckpt")
    save_byte_tokenizer(root / "tok")
    save_checkpoint(model.eval(), root / "mamba2", tokenizer_src=root / "tok", provenance={"kind": "test"})
    return model, p, root / "mamba2"


@pytest.fixture(scope="module")
def served_run(trained, tmp_path_factory):
    """The bench's recall suite over the cells, on the engine and through a spawned statex-serve."""
    _, _, ckpt = trained
    out = tmp_path_factory.mktemp("bench-out")
    cmd = [sys.executable, "-m", "statex_serve.bench", "recall", "--no-progress",
           "--target", f"engine:{ckpt}?label=engine", "--target", f"spawn:{ckpt}?label=spawn",
           "--tasks", ",".join(f"capacity:{c}?{OPTS}" for c in CELLS), "--samples", str(ROWS),
           "--mqar-queries", "1000", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_served_scores_equal_the_experiments_evaluate(trained, served_run):
    import torch

    model, p, _ = trained
    cells = []
    for name in CELLS:
        cell = experiment_cell(name, p)
        cell.spec = {**cell.spec, "rows": ROWS, "max_rows": ROWS}
        cells.append(cell)
    ev = sc.evaluate(model, cells, p, torch.device("cpu"), first_rows_only=ROWS)
    assert 0 < ev["mqar@96/2p"]["accuracy"] < 1 and 0 < ev["mqar@160/8p"]["accuracy"] < 1   # the test can fail
    for label in ("engine", "spawn"):
        rows = {r["task"].split("?")[0].split(":")[1]: r for r in served_run["suites"]["recall"][label]["rows"]}
        assert set(rows) == set(CELLS)
        for name in CELLS:
            assert rows[name]["errors"] == 0 and rows[name]["n_samples"] == ROWS
            assert rows[name]["accuracy"] == pytest.approx(ev[name]["accuracy"]), (label, name)


def test_served_answers_are_the_models_greedy_tokens(trained, served_run):
    """Answer by answer: the generated ids are the model's argmax after the prompt
    (the first token for the passkey, where later ones follow the model's own)."""
    import torch

    model, p, _ = trained
    answers = {label: {r["task"]: r["answers"] for r in res["rows"]}
               for label, res in served_run["suites"]["recall"].items()}
    for task, got in answers["engine"].items():   # the HTTP path gives the same tokens
        assert [a["got_ids"] for a in got] == [a["got_ids"] for a in answers["spawn"][task]]
    for task, got in answers["engine"].items():
        ids = torch.as_tensor(capacity.rows(capacity.parse(task), ROWS, 1234)[0]).long()
        with torch.no_grad():
            pred = model(ids).logits.argmax(-1)
        for a in got:
            assert a["got_ids"][0] == pred[a["sample"], a["prompt_tokens"] - 1]
            assert a["correct"] == (a["got_ids"] == a["expected_ids"])


def test_plots_call_a_capacity_cell_by_its_name():
    assert capacity.title("capacity:mqar@2048/16p?mqar_layout=zoology") == "mqar@2048/16p"
    assert capacity.title("niah?needles=8") == "niah?needles=8"
