"""How widely the Triton autotuners of fla and mamba-ssm search.

Their prefill kernels autotune over up to ~100 launch configurations per kernel
and shape class, compiling each one: on a fresh H200 fla's GLA prefill alone
took over 5 minutes (2026-11-30, docs/perf.md). Any configuration computes the
same function, so a server that must be ready soon can try only a few.
``limit_autotune_search`` keeps, of the configurations left after a kernel's
own pruning, ``max_configs`` spread evenly over their size (stages, block
elements, warps: from the smallest to the largest), or the smallest ones.
The choice is remembered on disk per kept set (Triton's autotune cache), so
either search is paid once per machine.
"""
from __future__ import annotations

import math

_PICKS = ("spread", "smallest")


def _size(cfg) -> tuple:
    blocks = math.prod(v for v in cfg.kwargs.values() if isinstance(v, int) and not isinstance(v, bool))
    return (cfg.num_stages, blocks, cfg.num_warps)


def pick_configs(configs: list, max_configs: int, pick: str = "spread") -> list:
    """``max_configs`` of ``configs``: evenly spaced by size, or the smallest."""
    if pick not in _PICKS:
        raise ValueError(f"pick must be one of {_PICKS}, got {pick!r}")
    ordered = sorted(configs, key=_size)
    if len(ordered) <= max_configs:
        return ordered
    if pick == "smallest" or max_configs == 1:
        return ordered[:max_configs]
    step = (len(ordered) - 1) / (max_configs - 1)
    return [ordered[round(i * step)] for i in range(max_configs)]


def limit_autotune_search(max_configs: int | None, pick: str = "spread") -> None:
    """Process-wide: every Triton autotuner benchmarks at most ``max_configs``
    configurations (None: all of them again)."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.__dict__.get("_statex_original_prune", Autotuner.prune_configs)
    Autotuner._statex_original_prune = original
    if max_configs is None:
        Autotuner.prune_configs = original
        return
    if max_configs < 1:
        raise ValueError(f"max_configs must be at least 1, got {max_configs}")
    if pick not in _PICKS:
        raise ValueError(f"pick must be one of {_PICKS}, got {pick!r}")

    def prune_configs(self, *args, **kwargs):
        return pick_configs(original(self, *args, **kwargs), max_configs, pick)

    Autotuner.prune_configs = prune_configs
