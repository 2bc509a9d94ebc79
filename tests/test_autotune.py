"""The autotune search limit (kernels/autotune.py): which launch configs a
Triton autotuner still benchmarks, and that the limit is process-wide and
can be lifted."""
from __future__ import annotations

import pytest
import triton
from triton.runtime.autotuner import Autotuner

from kernels.autotune import limit_autotune_search, pick_configs


def _configs():
    return [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
            for bk in (32, 64) for bv in (32, 64) for w in (2, 4, 8) for s in (2, 3, 4)]


def test_spread_keeps_the_smallest_and_the_largest_and_some_between():
    configs = _configs()
    kept = pick_configs(configs, 4)
    assert len(kept) == 4 and len({id(c) for c in kept}) == 4
    sizes = [(c.num_stages, c.kwargs["BK"] * c.kwargs["BV"], c.num_warps) for c in kept]
    assert sizes == sorted(sizes)
    assert sizes[0] == (2, 32 * 32, 2) and sizes[-1] == (4, 64 * 64, 8)
    assert pick_configs(configs, 2, "smallest")[1].num_warps == 4      # next smallest: more warps
    assert pick_configs(configs[:3], 4) == sorted(configs[:3], key=lambda c: (c.num_stages, c.num_warps))
    with pytest.raises(ValueError, match="pick"):
        pick_configs(configs, 2, "best")


def test_limit_applies_to_every_autotuner_and_lifts():
    original = Autotuner.prune_configs
    tuner = Autotuner.__new__(Autotuner)       # prune_configs reads only these attributes
    tuner.configs, tuner.early_config_prune, tuner.perf_model = _configs(), None, None
    tuner.nargs = {}
    try:
        limit_autotune_search(3)
        assert len(tuner.prune_configs({})) == 3
        limit_autotune_search(1, pick="smallest")
        assert tuner.prune_configs({})[0].num_warps == 2
        with pytest.raises(ValueError):
            limit_autotune_search(0)
    finally:
        limit_autotune_search(None)
    assert Autotuner.prune_configs is original
    assert len(tuner.prune_configs({})) == len(_configs())
