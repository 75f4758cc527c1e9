"""Backends: where the arrays live and which code runs the maths.

``numpy_ref`` is the NumPy reference, the spec every other backend is checked
against; ``cuda.CudaBackend`` runs on NVIDIA GPUs (CuPy arrays, cuBLAS GEMMs, Numba
kernels). :func:`get_backend` maps a device to its backend.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from gpubp.device import Device


def get_backend(device: Device) -> Any:
    """Return the backend that runs ``device``'s arrays (numpy_ref, or a CudaBackend)."""
    if device.kind == "cpu":
        from gpubp.backends import numpy_ref

        return numpy_ref
    from gpubp.backends.cuda import CudaBackend

    if device.simulated:
        return CudaBackend.simulator()
    return CudaBackend.for_device(device.index)


def backend_of(array: object) -> ModuleType | None:
    """The backend whose arrays ``array`` is one of: numpy_ref for host arrays, None if unknown.

    CuPy arrays map to the CUDA backend of their device; anything else that is
    not a NumPy array gives None (callers then convert it to NumPy).
    """
    import numpy as np

    if isinstance(array, np.ndarray):
        from gpubp.backends import numpy_ref

        return numpy_ref
    module = type(array).__module__.split(".")[0]
    if module == "cupy":
        from gpubp.backends.cuda import CudaBackend

        return CudaBackend.for_device(array.device.id)
    return None
