"""What it takes to build an engine: the CLI's flags as one dataclass, shared by
every backend (each reads the fields that apply to it)."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# The context a checkpoint is served with when neither --max-model-len nor its
# statex.json says otherwise: max_position_embeddings, capped here. A recurrent
# model has no position limit and its configs often say so with a huge number
# (ours default to 2^20); vLLM sizes per-request buffers from max_model_len and
# clients take /v1/models' max_model_len at its word.
DEFAULT_MAX_MODEL_LEN_CAP = 32768

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}


def parse_memory_size(text: str | int) -> int:
    """``"2GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"100000"`` -> bytes. KiB/MiB/GiB/TiB
    and the bare K/M/G/T are powers of 1024; KB/MB/GB/TB powers of 1000."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a memory size (examples: 2GiB, 512MiB, 1.5GB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def parse_budget(text: str | int) -> int:
    """A memory size that may be 0 (a cache tier turned off)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a memory budget must be at least 0, got {text}")
        return text
    return 0 if text.strip() in ("0", "0B", "0b") else parse_memory_size(text)


@dataclass
class EngineArgs:
    model: str                                   # checkpoint directory
    served_model_names: list[str] = field(default_factory=list)   # empty: ``model`` as given
    device: str = "auto"                         # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                          # auto | float32 | bfloat16 | float16
    state_dtype: str = "auto"                    # auto (the model's default, fp32) | float32 | bfloat16
    max_num_seqs: int | None = None              # state-pool slots (None: from state_memory, else 64)
    state_memory: int | None = None              # bytes for the state pool; capacity = budget // bytes/seq
    max_model_len: int | None = None             # None: default_max_model_len(model)
    prefill_chunk: int | None = None             # prompt tokens per engine step, at most (None: per device)
    max_queue: int = 1024                        # requests allowed to wait for a slot; more -> 503
    compile_cache_dir: str | None = None         # compiled kernels + autotune results (None: compile_cache.py)
    warmup: bool = True                          # compile every kernel variant before serving (CUDA)
    run_ahead: bool = True                       # launch decode step n+1 before step n's host work
    autotune: str = "fast"                       # fast: a few launch configs per library kernel; full: all
    # prefix cache (native engine): snapshots of the state after token prefixes
    prefix_cache: bool = True
    prefix_cache_memory: int | str | None = None      # bytes on the device (None: 1 GiB)
    prefix_cache_host_memory: int | str | None = None  # bytes of host memory for spills (None: 4 GiB on CUDA, 0 on CPU)
    max_logprobs: int = 20                       # logprob alternatives per position a request may ask for
    # native engine: a stream whose client stops reading is paused (its sequence
    # holds its slot and computes nothing); after this many seconds it is aborted
    stream_stall_timeout: float = 60.0
    # native engine: /health answers 503 while work is pending and no step has
    # finished for this many seconds (a hung step)
    step_timeout: float = 120.0
    tokenizer: str | None = None                 # tokenizer directory (None: the checkpoint's own)
    seed: int | None = None                      # seeds requests without a seed (reproducible runs); None: OS entropy
    vllm_args: dict = field(default_factory=dict)   # more vLLM engine arguments (e.g. tensor_parallel_size)

    DEFAULT_MAX_NUM_SEQS = 64
    DEFAULT_PREFIX_CACHE_MEMORY = 1 << 30
    # On CUDA the device tier defaults to this share of the memory left free
    # after the weights and state pools (at least DEFAULT_PREFIX_CACHE_MEMORY):
    # snapshots are allocated as they are stored, and a fixed 1 GiB held 14
    # snapshots of a 1.3B GLA (72 MiB each), so a burst of 64 unrelated
    # prompts spilled ~50 of them to host memory (docs/perf.md, "The engine under load").
    PREFIX_CACHE_FREE_MEMORY_SHARE = 0.25
    DEFAULT_PREFIX_CACHE_HOST_MEMORY = 4 << 30
    # A prefill call has a fixed cost (one eager launch of every layer's kernels:
    # ~40 ms for a 1.3B model on an H200, where 8K tokens take 66 ms, docs/perf.md),
    # so a GPU reads long prompts in large segments, as vLLM's default
    # max_num_batched_tokens does. On CPU the per-token cost dominates and small
    # segments keep concurrent streams smooth.
    DEFAULT_PREFILL_CHUNK = {"cuda": 8192, "cpu": 512}

    def __post_init__(self):
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if self.autotune not in ("fast", "full"):
            raise ValueError(f"--autotune must be fast or full, got {self.autotune!r}")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be at least 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.max_logprobs < 0:
            raise ValueError(f"--max-logprobs must be at least 0, got {self.max_logprobs}")
        if not self.stream_stall_timeout > 0:
            raise ValueError(f"--stream-stall-timeout must be positive, got {self.stream_stall_timeout}")
        if not self.step_timeout > 0:
            raise ValueError(f"--step-timeout must be positive, got {self.step_timeout}")
        if self.state_memory is not None and self.state_memory <= 0:
            raise ValueError(f"--state-memory must be positive, got {self.state_memory}")
        for name in ("prefix_cache_memory", "prefix_cache_host_memory"):
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, parse_budget(value))
                except ValueError as e:
                    raise ValueError(f"--{name.replace('_', '-')}: {e}") from None

    def prefill_chunk_for(self, device_type: str) -> int:
        """--prefill-chunk, or the device's default."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        return self.DEFAULT_PREFILL_CHUNK.get(device_type, self.DEFAULT_PREFILL_CHUNK["cpu"])

    def prefix_cache_budgets(self, device_type: str, free_device_bytes: int | None = None) -> tuple[int, int]:
        """(device bytes, host bytes) of the prefix cache. The device tier defaults
        to a share of ``free_device_bytes`` on CUDA, 1 GiB elsewhere; on CPU the
        device is host memory, so the host tier defaults to 0 there."""
        device = self.prefix_cache_memory
        if device is None:
            device = self.DEFAULT_PREFIX_CACHE_MEMORY
            if device_type == "cuda" and free_device_bytes:
                device = max(device, int(free_device_bytes * self.PREFIX_CACHE_FREE_MEMORY_SHARE))
        host = self.prefix_cache_host_memory
        if host is None:
            host = self.DEFAULT_PREFIX_CACHE_HOST_MEMORY if device_type == "cuda" else 0
        return device, host

    def with_default_max_model_len(self) -> "EngineArgs":
        """These arguments with ``max_model_len`` filled in from the checkpoint when
        it is None (see ``default_max_model_len``); both engines are built from this."""
        if self.max_model_len is not None:
            return self
        length, source = default_max_model_len(self.model)
        logger.info("max_model_len %d (%s); a recurrent model runs longer when asked: --max-model-len N",
                    length, source)
        return dataclasses.replace(self, max_model_len=length)

    @property
    def served_name(self) -> str:
        return self.served_model_names[0] if self.served_model_names else self.model


def trained_context_length(model_dir: str | Path) -> int | None:
    """The sequence length of the newest post-training recorded in ``statex.json``
    (``post_training.seq_len``, following ``base_provenance`` back through an
    expansion, which does not train); None when no training is recorded."""
    try:
        record = json.loads((Path(model_dir) / "statex.json").read_text())
    except (OSError, ValueError):
        return None
    while isinstance(record, dict):
        seq_len = (record.get("post_training") or {}).get("seq_len")
        if isinstance(seq_len, int) and seq_len > 1:
            return seq_len
        record = record.get("base_provenance")
    return None


def default_max_model_len(model_dir: str | Path) -> tuple[int, str]:
    """(tokens, where the number comes from): the length the checkpoint was trained
    at, else its ``max_position_embeddings`` capped at DEFAULT_MAX_MODEL_LEN_CAP."""
    trained = trained_context_length(model_dir)
    if trained is not None:
        return trained, "the length it was trained at, statex.json post_training.seq_len"
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    n = config.get("max_position_embeddings")
    if not isinstance(n, int) or n < 2:
        return DEFAULT_MAX_MODEL_LEN_CAP, "no trained length or max_position_embeddings: the default cap"
    if n > DEFAULT_MAX_MODEL_LEN_CAP:
        return DEFAULT_MAX_MODEL_LEN_CAP, (f"config max_position_embeddings {n} capped at "
                                           f"{DEFAULT_MAX_MODEL_LEN_CAP}")
    return n, "config max_position_embeddings"
