"""From CLI strings to a loaded model: device, dtypes, tokenizer, pool size."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from model_registry.dtypes import DTYPES, parse_dtype
from model_registry.state import StateSpec
from statex_serve.engine.args import EngineArgs

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmuls are slow there and greedy outputs
    then match the fp32 oracle); on CUDA the checkpoint's half dtype, else bfloat16."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return parse_dtype(name)


def checkpoint_dtype(config: dict) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        # never run a checkpoint's own tokenizer code (an ``auto_map`` would make
        # transformers ask for it, or run it)
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir}: cannot load a tokenizer ({e}); a checkpoint directory needs "
                         "tokenizer.json / tokenizer_config.json beside config.json") from None


def pool_slots(args: EngineArgs, spec: StateSpec) -> int:
    """State-pool size in sequences: ``--state-memory // bytes_per_sequence``
    (capped by ``--max-num-seqs`` when both are given), else ``--max-num-seqs``."""
    per_seq = spec.bytes_per_sequence
    if args.state_memory is not None:
        capacity = spec.capacity(args.state_memory)
        if capacity < 1:
            raise ValueError(f"--state-memory {args.state_memory} bytes holds no sequence: one sequence's "
                             f"state is {per_seq} bytes ({spec.summary()})")
        if args.max_num_seqs is not None and args.max_num_seqs < capacity:
            logger.info("--state-memory holds %d sequences; --max-num-seqs caps the pool at %d",
                        capacity, args.max_num_seqs)
            return args.max_num_seqs
        return capacity
    return args.max_num_seqs or EngineArgs.DEFAULT_MAX_NUM_SEQS


def eos_token_ids(config, tokenizer) -> frozenset[int]:
    ids = set()
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(x) for x in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
