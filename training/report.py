"""Render evaluation results: a Markdown table and a PNG of accuracy vs context,
for one model or several side by side (base / LPT / StateX)."""
from __future__ import annotations

from pathlib import Path


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
    """One panel per task, one line per model, accuracy vs context (log2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    tasks = list(dict.fromkeys(r["task"] for r in results[labels[0]]["recall"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for lab in labels:
            rows = sorted((r for r in results[lab]["recall"] if r["task"] == task), key=lambda r: r["context"])
            ax.plot([r["context"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
