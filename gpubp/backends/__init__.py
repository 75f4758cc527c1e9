"""Backends: where the arrays live and which code runs the maths.

Every backend implements :class:`gpubp.backends.base.Backend`. ``numpy_ref`` is the
NumPy reference, the spec every other backend is checked against; ``cpu.CpuBackend``
the fast CPU default (BLAS GEMMs, fused Numba kernels); ``cuda.CudaBackend``
runs on NVIDIA GPUs (CuPy arrays, cuBLAS GEMMs or the fused CUDA C kernels, Numba
kernels); ``cudasim.SimulatedCudaBackend`` runs the CUDA backend's code with host
arrays in the Numba CUDA simulator. :func:`get_backend` maps a device to its backend;
this is the one place where the device decides the code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.backends import numba_compat
from gpubp.backends.base import Backend
from gpubp.device import Device

# Before any Numba CUDA kernel is compiled: NumPy 2.5 with numba-cuda <= 0.30.4 (numba_compat says why).
numba_compat.install()

__all__ = ["Backend", "get_backend", "backend_of", "host_backend"]

DENSE_IMPLS = ("auto", "fused", "unfused", "reference")


def get_backend(device: Device, dense_impl: str = "auto", dtype: Any = np.float32) -> Backend:
    """The backend that runs ``device``'s arrays, with dense layers as ``dense_impl`` says.

    ``dense_impl``: ``"auto"`` (each backend's default: on the CPU the fast backend,
    ``cpu.CpuBackend``), ``"unfused"`` (cuBLAS GEMMs and separate Numba kernels),
    ``"fused"`` (the CUDA C kernels of kernels/, float32, on a real GPU only) or
    ``"reference"`` (the NumPy spec, ``numpy_ref.NumpyBackend``, for every operation;
    CPU only).
    """
    if dense_impl not in DENSE_IMPLS:
        raise ValueError(f"dense_impl: expected one of {', '.join(DENSE_IMPLS)}, got {dense_impl!r}")
    if device.kind == "cpu":
        if dense_impl == "reference":
            return host_backend()
        if dense_impl != "auto":
            raise ValueError(
                f"dense_impl: {dense_impl!r} runs on a CUDA device only; on the CPU use 'auto' (the fast "
                "CPU backend) or 'reference' (the NumPy spec)"
            )
        from gpubp.backends.cpu import CpuBackend

        return CpuBackend.instance()
    if dense_impl == "reference":
        raise ValueError("dense_impl: 'reference' (the NumPy spec) runs on the CPU only; use device='cpu'")
    fused = dense_impl == "fused"
    if fused and np.dtype(dtype) != np.float32:
        raise ValueError(f"dense_impl: 'fused' kernels are float32 only, got dtype {np.dtype(dtype).name}")
    if device.simulated:
        from gpubp.backends.cudasim import SimulatedCudaBackend

        if fused:
            raise ValueError("dense_impl: 'fused' CUDA C kernels run on a real GPU only, not under the simulator")
        return SimulatedCudaBackend.instance()
    from gpubp.backends.cuda import CudaBackend

    return CudaBackend.for_device(device.index, fused=fused)


def host_backend() -> Backend:
    """The backend of host (NumPy) arrays: the reference."""
    from gpubp.backends.numpy_ref import BACKEND

    return BACKEND


def backend_of(array: object) -> Backend | None:
    """The backend whose arrays ``array`` is one of: the reference for NumPy arrays, None if unknown.

    CuPy arrays map to the CUDA backend of their device; anything else that is
    not a NumPy array gives None (callers then convert it to NumPy).
    """
    if isinstance(array, np.ndarray):
        return host_backend()
    if type(array).__module__.split(".")[0] == "cupy":
        from gpubp.backends.cuda import CudaBackend

        return CudaBackend.for_device(array.device.id)
    return None
