"""Dtype names as our CLIs, configs and vLLM's cache options spell them: one table
for the native engine, the vLLM engine and the vLLM model classes."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# recurrent state: the pool dtypes the state kernels are tested with
STATE_DTYPES = ("float32", "fp32", "bfloat16", "bf16")


def _parse(name: str, option: str, names, listed) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in names:
        raise ValueError(f"{option} {name!r}: one of auto, {', '.join(listed)}")
    return DTYPES[name]


def parse_dtype(name: str) -> torch.dtype | None:
    """``--dtype``: None for ``auto`` (the caller's default), else a name of DTYPES."""
    return _parse(name, "--dtype", DTYPES, sorted(DTYPES))


def parse_state_dtype(name: str) -> torch.dtype | None:
    """``--state-dtype``: None for ``auto`` (the model's own choice: fp32), float32 or bfloat16."""
    return _parse(name, "--state-dtype", STATE_DTYPES, ("float32", "bfloat16"))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name vLLM and config.json use)."""
    return str(dtype).removeprefix("torch.")
