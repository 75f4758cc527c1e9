"""Device strings: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (and ``"cudasim"``).

Nothing here imports CuPy unless a CUDA device is asked for.

``"cudasim"`` runs the CUDA backend's own code with host (NumPy) arrays and its
Numba kernels in the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1 must be set
before numba is imported). It is very slow and exists so that the CUDA backend
can be tested on machines without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A resolved device: ``kind`` is ``"cpu"`` or ``"cuda"``, ``index`` the GPU ordinal."""

    kind: str
    index: int = 0
    simulated: bool = False

    def __str__(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        return "cudasim" if self.simulated else f"cuda:{self.index}"


def cuda_status() -> tuple[int, str]:
    """Return ``(number of CUDA devices, reason when 0)`` without raising.

    The reason says which piece is missing, and how to fix it: CuPy, the driver,
    or a device.
    """
    try:
        import cupy
    except ImportError:
        return 0, "CuPy is not installed (fix: pip install 'gpubp[cuda13]', or 'gpubp[cuda12]' for a CUDA 12 driver)"
    except Exception as e:  # a broken CuPy install: report it, do not crash `gpubp info`
        return 0, f"CuPy failed to import: {e} (fix: reinstall the cupy-cuda13x / cupy-cuda12x wheel)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or a driver too old for this CuPy
        return 0, (
            f"no usable NVIDIA driver ({type(e).__name__}: {e}) (fix: install an NVIDIA driver, "
            "or a cupy-cuda12x build if the driver only supports CUDA 12)"
        )
    if n == 0:
        return 0, "the NVIDIA driver reports no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return n, ""


def parse_device(device: str | Device) -> Device:
    """Parse and resolve a device string, raising ValueError/TypeError on a malformed one
    and RuntimeError (saying why, and how to fix it) when a GPU is asked for and none can be used."""
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise TypeError(
            f"device: expected a string such as 'cpu', 'cuda', 'cuda:1' or 'auto', got {type(device).__name__}"
        )
    d = device.strip().lower()
    if d == "cpu":
        return Device("cpu")
    if d == "auto":
        n, _ = cuda_status()
        return Device("cuda", 0) if n > 0 else Device("cpu")
    if d == "cudasim":
        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            raise RuntimeError("device 'cudasim' needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported")
        return Device("cuda", 0, simulated=True)
    if d == "cuda" or d.startswith("cuda:"):
        idx = 0
        if ":" in d:
            try:
                idx = int(d.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"device: expected 'cuda:N' with an integer N, got {device!r}") from None
            if idx < 0:
                raise ValueError(f"device: GPU index must be >= 0, got {device!r}")
        n, why = cuda_status()
        if n == 0:
            raise RuntimeError(f"device {device!r} asked for, but no GPU can be used: {why}")
        if idx >= n:
            raise RuntimeError(f"device {device!r}: only {n} GPU(s) visible (cuda:0 to cuda:{n - 1})")
        return Device("cuda", idx)
    raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def auto_device_reason() -> str:
    """One line saying why ``"auto"`` picked the device it did."""
    n, why = cuda_status()
    if n == 0:
        return f"no GPU: {why}"
    return f"{n} GPU(s) seen, using cuda:0"
