"""Small PNGs (about 900 x 300 px): latency, recall and memory vs context, and
throughput vs concurrency (with the bandwidth floor). Lines
are named by target (its label, else the served model's name); one legend to
the right of the panels serves them all; axes read 256, 512, 1K, not 2^8."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from statex_serve.bench.capacity import title as capacity_title
from statex_serve.bench.formatting import DPI, ctx_label, log2_x, show_floor
from statex_serve.bench.prefix import plot as prefix_plot
from training.report import plain_log10_formatter, task_kind

SIZE = (11.5, 3.4)        # wide: the shared legend sits to the right of the panels


def _finish(fig, path: Path) -> Path:
    """One legend for every panel, outside them on the right (lines of the same
    name in several panels are listed once)."""
    seen = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    right = 1.0
    if seen:
        legend = fig.legend(list(seen.values()), list(seen), loc="center right", fontsize=7, frameon=False)
        fig.canvas.draw()            # the legend's size is known once drawn: the panels get the rest
        width_in = legend.get_window_extent().width / fig.dpi
        right = 1 - (width_in + 0.15) / fig.get_figwidth()
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def latency_plot(results: dict, path: Path) -> Path | None:
    """TTFT, TPOT (with the floor where shown) and output tok/s vs context; None without latency cells."""
    latency = results["suites"].get("latency") or {}
    if not any(res["cells"] for res in latency.values()):
        return None
    targets = {t["label"]: t for t in results.get("targets", [])}
    bw_given = results["settings"]["bandwidth_given"]
    fig, axes = plt.subplots(1, 3, figsize=SIZE, dpi=DPI)
    xs = []
    for label, res in latency.items():
        floor = show_floor(targets.get(label, {}), bw_given)
        for c in sorted({cell["concurrency"] for cell in res["cells"]}):
            cells = [cell for cell in res["cells"] if cell["concurrency"] == c]
            x = [cell["context"] for cell in cells]
            xs += x
            name = f"{label} c={c}"
            for ax, metric in zip(axes[:2], ("ttft", "tpot")):
                y = [cell["summary"][metric]["p50_ms"] if cell["summary"][metric] else float("nan") for cell in cells]
                line, = ax.plot(x, y, marker="o", ms=3, label=name)
                if metric == "tpot" and floor and all("floor_tpot_ms" in cell for cell in cells):
                    ax.plot(x, [cell["floor_tpot_ms"] for cell in cells], ls="--", color=line.get_color(), lw=1,
                            label=f"floor {name}")
            axes[2].plot(x, [cell["summary"]["output_throughput_tok_s"] or float("nan") for cell in cells],
                         marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)", "output tokens/s")):
        ax.set_title(title, fontsize=9)
        log2_x(ax, xs)
        ax.set_xlabel("context (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylim(bottom=0)
    return _finish(fig, path)


def throughput_plot(results: dict, path: Path) -> Path | None:
    """Output tok/s and ITL p50 vs concurrency, one line per (target, context), the
    memory-bandwidth floor dashed beside each: how close load gets to the floor,
    and whether throughput keeps rising with concurrency."""
    latency = results["suites"].get("latency") or {}
    targets = {t["label"]: t for t in results.get("targets", [])}
    bw_given = results["settings"]["bandwidth_given"]
    series = []
    for label, res in latency.items():
        floor = show_floor(targets.get(label, {}), bw_given)
        for ctx in sorted({cell["context"] for cell in res["cells"]}):
            cells = sorted((c for c in res["cells"] if c["context"] == ctx), key=lambda c: c["concurrency"])
            if len(cells) >= 2:
                series.append((f"{label} {ctx_label(ctx)}", cells, floor))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(SIZE[0] * 0.75, SIZE[1]), dpi=DPI)
    xs = []
    for name, cells, floor in series:
        x = [c["concurrency"] for c in cells]
        xs += x
        tok = [c["summary"]["output_throughput_tok_s"] or float("nan") for c in cells]
        itl = [c["summary"]["itl"]["p50_ms"] if c["summary"].get("itl") else float("nan") for c in cells]
        line, = axes[0].plot(x, tok, marker="o", ms=3, label=name)
        axes[1].plot(x, itl, marker="o", ms=3, color=line.get_color(), label=name)
        if floor and all("floor_out_tok_s" in c for c in cells):
            axes[0].plot(x, [c["floor_out_tok_s"] for c in cells], ls="--", lw=1, color=line.get_color(),
                         label=f"floor {name}")
            axes[1].plot(x, [c["floor_tpot_ms"] for c in cells], ls="--", lw=1, color=line.get_color(),
                         label=f"floor {name}")
    for ax, title in zip(axes, ("output tokens/s (whole run)", "ITL p50 (ms)")):
        ax.set_title(title, fontsize=9)
        log2_x(ax, xs)
        ax.set_xlabel("concurrent requests", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    return _finish(fig, path)


def recall_plot(results: dict, path: Path) -> Path | None:
    """A panel per recall task: accuracy vs context, a line per target; None without recall rows."""
    recall = results["suites"].get("recall") or {}
    tasks = list(dict.fromkeys(r["task"] for res in recall.values() for r in res["rows"]))
    if not tasks:
        return None
    trained = {t["label"]: t.get("trained_on") for t in results.get("targets", [])}
    colors = {label: f"C{i}" for i, label in enumerate(recall)}
    fig, axes = plt.subplots(1, len(tasks), figsize=SIZE, dpi=DPI, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        xs, untrained = [], []
        for label, res in recall.items():
            rows = [r for r in res["rows"] if r["task"] == task]
            x = [r["context"] for r in rows]
            xs += x
            known = trained.get(label)
            if known is not None and task_kind(task) not in known and not any(r["accuracy"] for r in rows):
                untrained.append(label)   # a note, not a line along 0 that reads like a failed model
                continue
            ax.plot(x, [r["accuracy"] for r in rows], marker="o", ms=3, label=label, color=colors[label])
        if untrained:
            ax.text(0.5, 0.5, f"never trained on {task_kind(task)}:\n" + "\n".join(untrained),
                    transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.35")
        ax.set_title(f"{capacity_title(task)} accuracy", fontsize=9)
        log2_x(ax, xs)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _finish(fig, path)


def memory_plot(results: dict, path: Path) -> Path | None:
    """Bytes per sequence and sequences in the budget vs context, the Transformer dashed; None without entries."""
    memory = results["suites"].get("memory")
    if not memory or not memory["entries"]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=SIZE, dpi=DPI)
    xs = memory["contexts"]
    seen_tf = set()
    for e in memory["entries"]:
        x = [r["context"] for r in e["rows"]]
        line, = axes[0].plot(x, [r["bytes_per_sequence"] / 2**20 for r in e["rows"]], marker="o", ms=3,
                             label=e["label"])
        axes[1].plot(x, [max(r["max_sequences"], 0.5) for r in e["rows"]], marker="o", ms=3,
                     color=line.get_color(), label=e["label"])
        key = (e["transformer"]["num_layers"], e["transformer"]["kv_bytes_per_token"])
        if e["transformer"]["kv_bytes_per_token"] and key not in seen_tf:
            seen_tf.add(key)
            tf = f"Transformer ({e['transformer']['params'] / 1e6:,.1f}M)"
            axes[0].plot(x, [r["transformer_bytes_per_sequence"] / 2**20 for r in e["rows"]], ls="--",
                         color=line.get_color(), lw=1, label=tf)
            axes[1].plot(x, [max(r["transformer_max_sequences"], 0.5) for r in e["rows"]], ls="--",
                         color=line.get_color(), lw=1, label=tf)
    axes[0].set_title("bytes per sequence (MiB)", fontsize=9)
    budget = f"{memory['budget_bytes'] / 2**30:.3g} GiB"
    if memory.get("budget_source"):
        budget += f" ({memory['budget_source']})"
    axes[1].set_title(f"max sequences in {budget}", fontsize=9)
    for ax in axes:
        log2_x(ax, xs)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain_log10_formatter())
        ax.set_xlabel("context (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _finish(fig, path)


def write_plots(results: dict, out_dir: Path) -> list[str]:
    made = [latency_plot(results, out_dir / "latency.png"), throughput_plot(results, out_dir / "throughput.png"),
            recall_plot(results, out_dir / "recall.png"),
            memory_plot(results, out_dir / "memory.png"), prefix_plot(results, out_dir / "prefix.png")]
    return [p.name for p in made if p is not None]
