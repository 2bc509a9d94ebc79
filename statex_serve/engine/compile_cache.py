"""Where compiled GPU kernels and autotune results persist between starts.

A fresh start on a GPU compiles and autotunes every Triton kernel a request can
reach (fla's and mamba-ssm's prefill kernels, ours, and the fused elementwise
kernels ``torch.compile`` makes): minutes. All of it lands in one directory, so
a second start of the same model on the same machine reuses it:

- ``triton/``: Triton's compiled kernels and, with ``TRITON_CACHE_AUTOTUNING``,
  the autotuner's choices (fla and mamba-ssm autotune per shape class);
- ``inductor/``: ``torch.compile``'s graphs and generated kernels.

The directory is ``--compile-cache-dir``, else ``$STATEX_CACHE_DIR``, else
``$XDG_CACHE_HOME/statex-serve`` (``~/.cache/statex-serve``). Cache variables the
user already set (``TRITON_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``) win.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    if os.environ.get("STATEX_CACHE_DIR"):
        return Path(os.environ["STATEX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "statex-serve"


def configure_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point the kernel caches at ``cache_dir`` (see the module docstring); call
    before fla or mamba-ssm is imported (their autotuners read the setting when
    they are defined). Returns the directory."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--compile-cache-dir {root}: cannot create it ({e.strerror})") from None
    if not os.access(root, os.W_OK):
        raise ValueError(f"--compile-cache-dir {root}: not writable")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    return root
