"""How the bench writes its numbers, shared by the Markdown report, the plots
and the suites that render their own part (prefix): byte sizes, milliseconds,
counts, context lengths (256, 1K), Markdown tables, when the bandwidth floor
is shown, and the log2 context axis of every plot. It imports no other bench
module, so any of them can import it."""
from __future__ import annotations

from training.report import plain_log2_axis

DPI = 80                  # every bench PNG: small files (about 900 x 300 px)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 1 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_number(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def ctx_label(n: int) -> str:
    """A context length as a reader says it: 512, 1K, 32K."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def show_floor(target: dict, bandwidth_given: bool) -> bool:
    """The floor is printed beside GPU results (or any, once --bandwidth is given)."""
    device = (target.get("engine") or {}).get("device")
    return bandwidth_given or device is None or str(device).startswith("cuda")


def log2_x(ax, xs) -> None:
    """The context (or concurrency) axis: log2, a tick at every value, small labels."""
    plain_log2_axis(ax, xs)
    ax.tick_params(axis="x", labelsize=7)
