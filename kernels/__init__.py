"""State-update kernels for GLA and Mamba2 (see kernels/README.md for the contract).

Each family exposes one function per job; it runs the Triton kernel on CUDA
tensors and the readable torch reference otherwise. ``STATEX_KERNELS=reference``
forces the reference everywhere (debugging, A/B checks).
"""
from kernels._dispatch import use_fast_path

__all__ = ["use_fast_path"]
