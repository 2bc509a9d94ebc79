"""Small PNGs (about 800 x 300 px): latency, recall and memory vs context."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from statex_serve.bench.report import show_floor

SIZE = (10, 3.4)
DPI = 80


def _log2_x(ax, xs):
    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x) for x in ticks], fontsize=7)
    ax.minorticks_off()


def latency_plot(results: dict, path: Path) -> Path | None:
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
        _log2_x(ax, xs)
        ax.set_xlabel("context (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylim(bottom=0)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def recall_plot(results: dict, path: Path) -> Path | None:
    recall = results["suites"].get("recall") or {}
    tasks = list(dict.fromkeys(r["task"] for res in recall.values() for r in res["rows"]))
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=SIZE, dpi=DPI, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        xs = []
        for label, res in recall.items():
            rows = [r for r in res["rows"] if r["task"] == task]
            x = [r["context"] for r in rows]
            xs += x
            ax.plot(x, [r["accuracy"] for r in rows], marker="o", ms=3, label=label)
        ax.set_title(f"{task} accuracy", fontsize=9)
        _log2_x(ax, xs)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def memory_plot(results: dict, path: Path) -> Path | None:
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
    axes[1].set_title(f"max sequences in {memory['budget_bytes'] / 2**30:.0f} GiB", fontsize=9)
    for ax in axes:
        _log2_x(ax, xs)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(results: dict, out_dir: Path) -> list[str]:
    from statex_serve.bench.prefix import plot as prefix_plot

    made = [latency_plot(results, out_dir / "latency.png"), recall_plot(results, out_dir / "recall.png"),
            memory_plot(results, out_dir / "memory.png"), prefix_plot(results, out_dir / "prefix.png")]
    return [p.name for p in made if p is not None]
