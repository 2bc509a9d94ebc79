"""Import mamba-ssm's Triton ops without its compiled CUDA extension.

mamba-ssm's package __init__ imports ``selective_scan_cuda`` (a compiled
extension we do not build: Mamba2 needs only the Triton ops). An empty stub
module of that name lets the package import; the Triton ops never touch it.
"""
from __future__ import annotations

import sys
import types

try:
    import selective_scan_cuda  # noqa: F401
except ImportError:
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))

from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: E402
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: E402

__all__ = ["mamba_chunk_scan_combined", "selective_state_update"]
