"""Device strings: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"auto"``.

Nothing here imports CuPy unless a CUDA device is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A resolved device: ``kind`` is ``"cpu"`` or ``"cuda"``, ``index`` the GPU ordinal."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def cuda_status() -> tuple[int, str]:
    """Return ``(number of CUDA devices, reason when 0)`` without raising.

    The reason says which piece is missing: CuPy, the driver, or a device.
    """
    try:
        import cupy
    except ImportError:
        return 0, "CuPy is not installed (pip install 'gpubp[cuda13]' or 'gpubp[cuda12]')"
    except Exception as e:  # a broken CuPy install: report it, do not crash `gpubp info`
        return 0, f"CuPy failed to import: {e}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or driver too old for this CuPy
        return 0, f"no usable CUDA driver ({type(e).__name__}: {e})"
    if n == 0:
        return 0, "the CUDA driver reports no GPU"
    return n, ""


def parse_device(device: str | Device) -> Device:
    """Parse a device string, raising ValueError/TypeError on a malformed one.

    ``"auto"`` resolves to ``"cpu"`` while gpubp has no CUDA backend; see
    :func:`resolve_device`.
    """
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device: expected a string such as 'cpu', 'cuda', 'cuda:1' or 'auto', got {type(device).__name__}")
    d = device.strip().lower()
    if d == "cpu":
        return Device("cpu")
    if d == "auto":
        return resolve_device("auto")
    if d == "cuda" or d.startswith("cuda:"):
        idx = 0
        if ":" in d:
            try:
                idx = int(d.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"device: expected 'cuda:N' with an integer N, got {device!r}") from None
            if idx < 0:
                raise ValueError(f"device: GPU index must be >= 0, got {device!r}")
        return resolve_device(f"cuda:{idx}")
    raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def resolve_device(device: str) -> Device:
    """Resolve ``"auto"`` or ``"cuda:N"`` against what this machine and this build offer."""
    if device == "auto":
        return Device("cpu")
    n, why = cuda_status()
    if n == 0:
        raise RuntimeError(f"device {device!r} asked for, but no GPU can be used: {why}")
    raise RuntimeError(
        f"device {device!r}: this version of gpubp trains on the CPU only (the CUDA backend "
        "is not part of it yet); use device='cpu' or device='auto'"
    )


def auto_device_reason() -> str:
    """One line saying why ``"auto"`` picked the device it did."""
    n, why = cuda_status()
    if n == 0:
        return f"no GPU: {why}"
    return f"{n} GPU(s) seen, but this version of gpubp has no CUDA backend yet"
