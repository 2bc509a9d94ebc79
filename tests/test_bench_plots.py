"""Plots a person reads at a glance (bench and `statex-train eval`): lines named
by target, one legend for every panel, plain tick labels, a note where a model
was never trained on a task, only the models asked for in the memory plot."""
from __future__ import annotations

import json
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from statex_serve.bench import cli, plots

CONTEXTS = [256, 512, 1024, 2048]


@pytest.fixture
def figures(monkeypatch):
    """Figures the plot functions would close after saving, kept for inspection."""
    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plt.close(fig)


def _recall_rows(task, accuracies):
    return [{"task": task, "context": c, "accuracy": a} for c, a in zip(CONTEXTS, accuracies)]


def _results():
    cell = {"summary": {"ttft": {"p50_ms": 10.0}, "tpot": {"p50_ms": 2.0}, "output_throughput_tok_s": 100.0}}
    return {
        "settings": {"bandwidth_given": False},
        "targets": [{"label": "statex", "trained_on": ["jsonl", "passkey"], "engine": {"device": "cpu"}},
                    {"label": "llama-3-8b", "trained_on": None, "engine": {"device": "cpu"}}],
        "suites": {
            "latency": {label: {"cells": [{**cell, "context": c, "concurrency": 1} for c in CONTEXTS]}
                        for label in ("statex", "llama-3-8b")},
            "recall": {"statex": {"rows": _recall_rows("passkey", [1, 1, .8, .5]) + _recall_rows("niah", [0] * 4)},
                       "llama-3-8b": {"rows": _recall_rows("passkey", [1] * 4) + _recall_rows("niah", [0] * 4)}},
        },
    }


def _legend_texts(fig):
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_recall_plot_names_targets_shares_one_legend_and_says_never_trained(figures, tmp_path):
    assert plots.recall_plot(_results(), tmp_path / "recall.png").stat().st_size > 1000
    (fig,) = figures
    passkey, niah = fig.axes
    assert all(ax.get_legend() is None for ax in fig.axes)          # no panel hides lines under its legend
    assert sorted(_legend_texts(fig)) == ["llama-3-8b", "statex"]
    # statex was never trained on niah and scores 0 there: a note, not a line along the floor
    assert [line.get_label() for line in niah.get_lines()] == ["llama-3-8b"]
    assert any("never trained on niah" in t.get_text() and "statex" in t.get_text() for t in niah.texts)
    assert [line.get_label() for line in passkey.get_lines()] == ["statex", "llama-3-8b"] and not passkey.texts
    assert [t.get_text() for t in passkey.get_xticklabels()] == ["256", "512", "1K", "2K"]


def test_latency_plot_one_legend_outside_the_panels(figures, tmp_path):
    plots.latency_plot(_results(), tmp_path / "latency.png")
    (fig,) = figures
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert _legend_texts(fig) == ["statex c=1", "llama-3-8b c=1"]
    legend_box = fig.legends[0].get_window_extent()
    assert all(legend_box.x0 >= ax.get_window_extent().x1 for ax in fig.axes)    # beside, not over, the panels


def test_memory_plot_plain_ticks(figures, tmp_path):
    rows = [{"context": c, "bytes_per_sequence": 2**20, "max_sequences": 1000, "transformer_bytes_per_sequence":
             c * 2**12, "transformer_max_sequences": 2**30 // (c * 2**12)} for c in CONTEXTS]
    memory = {"entries": [{"label": "statex", "rows": rows, "transformer": {"num_layers": 2, "kv_bytes_per_token":
                                                                             4096, "params": 2e6}}],
              "contexts": CONTEXTS, "budget_bytes": 24 << 30, "budget_source": "this machine's memory"}
    plots.memory_plot({"suites": {"memory": memory}}, tmp_path / "memory.png")
    (fig,) = figures
    fig.canvas.draw()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels() if t.get_text()]
    assert labels and not any("^" in t for t in labels), labels       # 1, 10, 100, 1K rather than 10^k
    assert "24 GiB (this machine's memory)" in fig.axes[1].get_title()


def test_memory_suite_shows_only_the_models_asked_for():
    def models(*argv):
        return cli.resolve(cli.build_parser().parse_args(list(argv)))["memory_models"]

    assert models("memory", "--target", "http://127.0.0.1:9") == []          # the target's model only
    assert models("memory") == cli.MEMORY_PRESETS.split(",")                  # nothing else to show
    assert models("memory", "--target", "http://127.0.0.1:9", "--memory-models", "gla-1.3b") == ["gla-1.3b"]
    assert cli.resolve(cli.build_parser().parse_args(["memory"]))["budget"] is None   # auto: this machine's


def test_url_targets_are_named_after_their_model():
    def target(kind, label, model, explicit=False):
        return SimpleNamespace(kind=kind, label=label, info={"model": model},
                               spec=SimpleNamespace(options={"label": label} if explicit else {}))

    ts = [target("url", "127.0.0.1:8000", "qwen"), target("url", "127.0.0.1:8001", "qwen"),
          target("url", "mine", "qwen", explicit=True), target("spawn", "statex-mamba2-tiny", "x")]
    cli._name_targets(ts)
    assert [t.label for t in ts] == ["qwen", "qwen#2", "mine", "statex-mamba2-tiny"]


def test_trained_tasks_follow_the_provenance_chain(tmp_path):
    from training.report import trained_tasks

    chain = {"kind": "statex post-trained checkpoint", "post_training": {"data": ["jsonl:/c.jsonl?split=train@2"]},
             "base_provenance": {"kind": "statex expanded checkpoint", "base_provenance": {
                 "kind": "statex post-trained checkpoint", "post_training": {"data": ["passkey?min_len=64@1"]},
                 "base_provenance": {"kind": "random init"}}}}
    (tmp_path / "statex.json").write_text(json.dumps(chain))
    assert trained_tasks(tmp_path) == ["jsonl", "passkey"]
    (tmp_path / "statex.json").write_text(json.dumps({"imported_from": "/x", "source_format": "gla"}))
    assert trained_tasks(tmp_path) is None                                    # upstream training: unknown


def test_eval_plot_says_never_trained_and_plain_ticks(figures, tmp_path):
    from training.report import plot_recall

    result = {"trained_on": ["passkey"], "recall": _recall_rows("passkey", [1, 1, 1, .5]) + _recall_rows("mqar",
                                                                                                      [0] * 4)}
    plot_recall({"tiny": result}, tmp_path / "eval.png")
    (fig,) = figures
    passkey, mqar = fig.axes
    assert not mqar.get_lines() and any("never trained on mqar" in t.get_text() for t in mqar.texts)
    assert [t.get_text() for t in passkey.get_xticklabels()] == ["256", "512", "1K", "2K"]
    assert _legend_texts(fig) == ["tiny"]


def test_throughput_plot_against_concurrency_with_the_floor(figures, tmp_path):
    """tok/s and ITL against concurrency, per (target, context), with the floor
    dashed beside each line when the floor applies; nothing to draw with one
    concurrency level."""
    results = _results()
    assert plots.throughput_plot(results, tmp_path / "t.png") is None          # concurrency 1 only
    results["settings"]["bandwidth_given"] = True
    cells = []
    for c, tok in ((1, 400.0), (64, 2500.0), (256, 7800.0)):
        cells.append({"context": 4096, "concurrency": c, "floor_out_tok_s": 1475.0 * c ** 0.8,
                      "floor_tpot_ms": 0.7 + c / 30, "summary": {
                          "ttft": {"p50_ms": 40.0}, "tpot": {"p50_ms": 2.0}, "itl": {"p50_ms": 1.5 + c / 20},
                          "output_throughput_tok_s": tok}})
    results["suites"]["latency"]["statex"]["cells"] += cells
    assert plots.throughput_plot(results, tmp_path / "t.png").stat().st_size > 1000
    (fig,) = figures
    tok_ax, itl_ax = fig.axes
    assert [line.get_label() for line in tok_ax.get_lines()] == ["statex 4K", "floor statex 4K"]
    assert list(tok_ax.get_lines()[0].get_ydata()) == [400.0, 2500.0, 7800.0]
    assert list(itl_ax.get_lines()[1].get_xdata()) == [1, 64, 256]
    assert sorted(_legend_texts(fig)) == ["floor statex 4K", "statex 4K"]
