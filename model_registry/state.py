"""Per-layer recurrent state: what each layer keeps per sequence, and the pools
that hold it for many sequences.

A sequence's whole state has a constant size fixed by the config. A pool holds
one tensor per (layer, state) with exactly that layer's shape, ``[num_slots,
...]``, so an expanded layer costs what it needs and nothing is padded. A slot
index addresses the same sequence in every layer's pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from model_registry.dtypes import dtype_name

def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class StateTensorSpec:
    """One state tensor of one layer, for one sequence."""

    name: str                  # "recurrent" (GLA S), "conv", "ssm"
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)


@dataclass(frozen=True)
class LayerStateSpec:
    layer: int
    tensors: tuple[StateTensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class StateSpec:
    """Every layer's state for one sequence, and its exact size."""

    layers: tuple[LayerStateSpec, ...]

    @property
    def bytes_per_sequence(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def elements_per_sequence(self) -> int:
        return sum(t.numel for layer in self.layers for t in layer.tensors)

    def capacity(self, budget_bytes: int) -> int:
        """How many sequences a state-memory budget holds (exact: no padding)."""
        return budget_bytes // self.bytes_per_sequence

    def summary(self) -> str:
        mib = self.bytes_per_sequence / 2**20
        kinds = sorted({(t.name, t.shape, dtype_name(t.dtype))
                        for layer in self.layers for t in layer.tensors})
        parts = ", ".join(f"{name}{list(shape)} {dt}" for name, shape, dt in kinds)
        return f"{mib:.2f} MiB per sequence over {len(self.layers)} layers ({parts})"

    def to_dict(self) -> dict:
        return {
            "bytes_per_sequence": self.bytes_per_sequence,
            "layers": [
                {"layer": layer.layer, "bytes": layer.nbytes,
                 "tensors": [{"name": t.name, "shape": list(t.shape),
                              "dtype": dtype_name(t.dtype)} for t in layer.tensors]}
                for layer in self.layers
            ],
        }


@dataclass
class StatePools:
    """Pre-allocated state for ``num_slots`` sequences: ``pools[layer][name]``
    is a ``[num_slots, *shape]`` tensor. Kernels update rows in place."""

    spec: StateSpec
    num_slots: int
    pools: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def allocate(cls, spec: StateSpec, num_slots: int, device="cpu") -> "StatePools":
        if num_slots < 1:
            raise ValueError(f"a state pool needs at least one slot, got {num_slots}")
        pools = [{t.name: torch.zeros((num_slots, *t.shape), dtype=t.dtype, device=device)
                  for t in layer.tensors} for layer in spec.layers]
        return cls(spec=spec, num_slots=num_slots, pools=pools)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor]:
        return self.pools[layer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.pools for t in layer.values())

    def zero_(self, slot: int) -> None:
        for layer in self.pools:
            for t in layer.values():
                t[slot].zero_()

    def copy_slot_(self, src: int, dst: int) -> None:
        for layer in self.pools:
            for t in layer.values():
                t[dst].copy_(t[src])

    def snapshot(self, slot: int, device=None) -> list[dict[str, torch.Tensor]]:
        """A copy of one sequence's whole state (e.g. for a prefix cache)."""
        return [{k: t[slot].to(device or t.device, copy=True) for k, t in layer.items()}
                for layer in self.pools]

    def restore_(self, slot: int, snapshot: list[dict[str, torch.Tensor]]) -> None:
        for layer, snap in zip(self.pools, snapshot):
            for k, t in layer.items():
                t[slot].copy_(snap[k], non_blocking=True)
