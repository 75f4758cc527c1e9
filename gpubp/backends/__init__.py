"""Backends: where the arrays live and which code runs the maths.

``numpy_ref`` is the NumPy reference, the spec every other backend is checked
against. :func:`get_backend` maps a device string to its backend module.
"""

from __future__ import annotations

from types import ModuleType

from gpubp.device import Device


def get_backend(device: Device) -> ModuleType:
    """Return the backend module that runs ``device``'s arrays."""
    if device.kind == "cpu":
        from gpubp.backends import numpy_ref

        return numpy_ref
    raise RuntimeError(f"no backend for device {device}")


def backend_of(array: object) -> ModuleType:
    """Return the backend module whose arrays ``array`` is one of."""
    import numpy as np

    if isinstance(array, np.ndarray):
        from gpubp.backends import numpy_ref

        return numpy_ref
    raise TypeError(f"no backend for arrays of type {type(array).__name__}")
