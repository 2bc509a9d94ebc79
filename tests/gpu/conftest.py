"""GPU test setup: full-precision fp32 dots, and a short autotune search for
fla's and mamba-ssm's kernels."""
from __future__ import annotations

import os

import pytest

# fla's and mamba-ssm's dots on fp32 inputs default to TF32 (~1e-3 relative);
# the fp32 tolerances (1e-5 on states) hold only with IEEE dots. Set for the
# whole session, before anything compiles: Triton reads it when it traces a
# kernel, and a kernel compiled once is reused by every later call in the
# process, so switching it per test made the precision depend on test order.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


@pytest.fixture(scope="session", autouse=True)
def _two_autotune_configs():
    """fla and mamba-ssm autotune over up to ~100 configs per kernel and shape:
    minutes of compiling per test on a fresh machine (four xdist workers doing
    it at once looked like a hang). Any config computes the same function, so
    the tests try only the two smallest (fewest stages, block elements, warps);
    ``STATEX_TEST_FULL_AUTOTUNE=1`` keeps the full search."""
    if os.environ.get("STATEX_TEST_FULL_AUTOTUNE") == "1":
        yield
        return
    from kernels.autotune import limit_autotune_search

    limit_autotune_search(2, pick="smallest")
    yield
    limit_autotune_search(None)
