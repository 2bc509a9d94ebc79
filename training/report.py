"""Render evaluation results: a Markdown table and a PNG of accuracy vs context,
for one model or several side by side (base / LPT / StateX)."""
from __future__ import annotations

import json
from pathlib import Path


def trained_tasks(model_dir: str | Path | None) -> list[str] | None:
    """The kinds of data (``passkey``, ``niah``, ``jsonl``, ...) a checkpoint was
    ever trained on, from its statex.json chain (every post-training of every
    stage); None when that is unknown: no statex.json, or an imported upstream
    model whose own training is not recorded."""
    if model_dir is None:
        return None
    try:
        record = json.loads((Path(model_dir) / "statex.json").read_text())
    except (OSError, ValueError):
        return None
    kinds: list[str] = []
    while isinstance(record, dict):
        kind = str(record.get("kind", ""))
        if "imported_from" in record or not (kind.startswith("random") or kind in (
                "statex post-trained checkpoint", "statex expanded checkpoint")):
            return None
        for spec in (record.get("post_training") or {}).get("data") or []:
            kind = str(spec).split("?", 1)[0].split("@", 1)[0].split(":", 1)[0]
            if kind not in kinds:
                kinds.append(kind)
        record = record.get("base_provenance")
    return kinds


def task_kind(task_spec: str) -> str:
    """``niah?needles=8`` -> ``niah``."""
    return task_spec.split("?", 1)[0]


def plain_log2_axis(ax, values, axis: str = "x") -> None:
    """A log2 axis with a tick at every value, labelled 256, 512, 1K, 2K (not 2^8)."""
    ticks = sorted(set(values))
    if not ticks:
        return
    getattr(ax, f"set_{axis}scale")("log", base=2)
    # fixed limits: a panel whose lines are all left out (never trained) keeps its axis
    getattr(ax, f"set_{axis}lim")(ticks[0] / 2 ** 0.25, ticks[-1] * 2 ** 0.25)
    getattr(ax, f"set_{axis}ticks")(ticks)
    getattr(ax, f"set_{axis}ticklabels")([f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v)
                                          for v in ticks])
    ax.minorticks_off()


def plain_log10_formatter():
    """Labels for a log10 axis: 0.1, 1, 10, 100, 1K, 10K, 1M rather than 10^k."""
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _pos):
        if v <= 0:
            return ""
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if v >= div:
                return f"{v / div:g}{suffix}"
        return f"{v:g}"

    return FuncFormatter(fmt)


def _cell(rows: list[dict], task: str, ctx: int) -> dict | None:
    return next((r for r in rows if r["task"] == task and r["context"] == ctx), None)


def markdown(results: dict[str, dict], title: str | None = None) -> str:
    """``results``: label -> evaluate_model() output."""
    labels = list(results)
    first = results[labels[0]]["recall"]
    tasks = list(dict.fromkeys(r["task"] for r in first))
    contexts = sorted({r["context"] for r in first})
    lines = [f"## {title}", ""] if title else []
    lines += ["Recall accuracy (exact match of every answer token; MQAR: per query).", "",
              "| task | context | " + " | ".join(labels) + " |",
              "|---|---:|" + "---:|" * len(labels)]
    for t in tasks:
        for c in contexts:
            cells = []
            for lab in labels:
                r = _cell(results[lab]["recall"], t, c)
                cells.append("" if r is None else f"{r['accuracy']:.3f}")
            lines.append(f"| {t} | {c} | " + " | ".join(cells) + " |")
    lines += ["", "| model | parameters | state per sequence | held-out perplexity | bits/token |",
              "|---|---:|---:|---:|---:|"]
    for lab in labels:
        r = results[lab]
        h = r.get("heldout")
        ppl = f"{h['perplexity']:.4f}" if h else "-"
        bpt = f"{h['bits_per_token']:.4f}" if h else "-"
        state_kib = r["state_bytes_per_sequence"] / 1024
        lines.append(f"| {lab} | {r['parameters']:,} | {state_kib:.1f} KiB | {ppl} | {bpt} |")
    agree = [row.get("generate_agreement") for r in results.values() for row in r["recall"]
             if row.get("generate_agreement") is not None]
    if agree:
        lines += ["", f"Teacher-forced verdicts agree with greedy generation through prefill/decode on "
                      f"{100 * sum(agree) / len(agree):.1f}% of the checked samples."]
    return "\n".join(lines) + "\n"


def plot_recall(results: dict[str, dict], path: str | Path, title: str | None = None) -> None:
    """One panel per task, one line per model, accuracy vs context (log2 axis).
    A model that was never trained on a task (its statex.json says so) and
    scores 0 gets a note in that panel instead of a line along the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    tasks = list(dict.fromkeys(r["task"] for r in results[labels[0]]["recall"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.6, 3.4), squeeze=False)
    colors = {lab: f"C{i}" for i, lab in enumerate(labels)}
    for ax, task in zip(axes[0], tasks):
        xs, notes = [], []
        for lab in labels:
            rows = sorted((r for r in results[lab]["recall"] if r["task"] == task), key=lambda r: r["context"])
            xs += [r["context"] for r in rows]
            trained = results[lab].get("trained_on")
            if trained is not None and task_kind(task) not in trained and not any(r["accuracy"] for r in rows):
                notes.append(lab)
                continue
            ax.plot([r["context"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=lab,
                    color=colors[lab])
        if notes:
            ax.text(0.5, 0.5, "never trained on " + task_kind(task) + ":\n" + "\n".join(notes),
                    transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.35")
        plain_log2_axis(ax, xs)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy")
    handles = [plt.Line2D([], [], color=colors[lab], marker="o", label=lab) for lab in labels]
    fig.legend(handles=handles, loc="center right", fontsize=8)   # outside the panels: one legend for all
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
