"""Device strings: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (and ``"cudasim"``).

Nothing here imports CuPy unless a CUDA device is asked for.

``"cudasim"`` runs the CUDA backend's own code with host (NumPy) arrays and its
Numba kernels in the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1 must be set
before numba is imported). It is very slow and exists so that the CUDA backend
can be tested on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import warnings
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


_STATUS: tuple[int, str] | None = None
_TOLD = False  # whether "auto" has said, in this process, why it runs on the CPU
_LOCK = threading.Lock()
_CUDA_ERROR_NO_DEVICE = 100
_CUDA_12_FIX = "pip install 'gpubp[cuda12]', the CuPy build for CUDA 12 drivers"


def _libcuda() -> tuple[ctypes.CDLL | None, str]:
    """The CUDA driver library, or None and why not."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            return ctypes.CDLL(name), ""
        except OSError:
            pass
    return None, f"{names[0]} not found"


def _device_nodes() -> bool | None:
    """Linux: whether /dev/nvidia0, /dev/nvidia1, ... exist; None where that says nothing
    (another system, or WSL, where the GPU is /dev/dxg)."""
    if not sys.platform.startswith("linux") or os.path.exists("/dev/dxg"):
        return None
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _cu_init(lib: ctypes.CDLL) -> int:
    """cuInit(0)'s result code (0: success; 100: CUDA_ERROR_NO_DEVICE)."""
    try:
        return int(lib.cuInit(0))
    except (AttributeError, OSError):
        return -1


def _driver_version(lib: ctypes.CDLL | None) -> int | None:
    """The CUDA version the driver supports, as 12040 for 12.4; None when unknown."""
    if lib is None:
        return None
    v = ctypes.c_int(0)
    try:
        return v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0 else None
    except (AttributeError, OSError):
        return None


def _cuda(v: int) -> str:
    return f"CUDA {v // 1000}.{v % 1000 // 10}"


def _no_gpu() -> tuple[str | None, ctypes.CDLL | None]:
    """("no NVIDIA GPU found (...)", None) when the machine has none the driver can see, else
    (None, the driver library)."""
    fix = "fix: use device='cpu' or 'auto', or run on a machine with an NVIDIA GPU and its driver"
    lib, why = _libcuda()
    nodes = _device_nodes()
    if lib is None:
        hint = "; no /dev/nvidia* device either" if nodes is False else ""
        return f"no NVIDIA GPU found (no NVIDIA driver: {why}{hint}) ({fix})", None
    if nodes is False:
        return f"no NVIDIA GPU found (no /dev/nvidia* device; the NVIDIA driver library is installed) ({fix})", lib
    if _cu_init(lib) == _CUDA_ERROR_NO_DEVICE:
        return f"no NVIDIA GPU found (the NVIDIA driver reports no CUDA device: cuInit returned 100) ({fix})", lib
    return None, lib


def _probe() -> tuple[int, str]:
    try:
        import cupy
    except ImportError:
        nogpu, _ = _no_gpu()
        if nogpu:
            return 0, nogpu
        return 0, "CuPy is not installed (fix: pip install 'gpubp[cuda13]', or 'gpubp[cuda12]' for a CUDA 12 driver)"
    except Exception as e:  # a broken CuPy install: report it, do not crash `gpubp info`
        return 0, f"CuPy failed to import: {e} (fix: reinstall the cupy-cuda13x / cupy-cuda12x wheel)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, no device, or a driver too old for this CuPy
        nogpu, lib = _no_gpu()
        if nogpu:
            return 0, nogpu
        if "InsufficientDriver" in str(e) or getattr(e, "status", None) == 35:
            try:
                built = _cuda(int(cupy.cuda.runtime.runtimeGetVersion()))
            except Exception:
                built = "a newer CUDA"
            have = _driver_version(lib)
            if have is None:
                fix = "update the NVIDIA driver"
            elif have // 1000 == 12 and not built.startswith("CUDA 12"):
                fix = f"update the NVIDIA driver, or {_CUDA_12_FIX}"
            else:
                fix = "update the NVIDIA driver"
            supports = f"supports up to {_cuda(have)}" if have else "is older"
            return 0, f"the NVIDIA driver is too old for this CuPy: it {supports}, CuPy needs {built} (fix: {fix})"
        return 0, f"the CUDA runtime cannot use the NVIDIA driver ({type(e).__name__}: {e}) (check nvidia-smi)"
    if n == 0:
        return 0, "the NVIDIA driver reports no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return n, ""


def cuda_status(refresh: bool = False) -> tuple[int, str]:
    """Return ``(number of CUDA devices, reason when 0)`` without raising.

    The reason tells apart a machine with no NVIDIA GPU at all ("no NVIDIA GPU found": no
    driver library, no /dev/nvidia* device, or cuInit finds no device), a driver too old for
    the installed CuPy (with the versions, and the fix), a missing CuPy and a broken one.
    Probed once per process; ``refresh=True`` probes again.
    """
    global _STATUS
    with _LOCK:
        if _STATUS is None or refresh:
            _STATUS = _probe()
        return _STATUS


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
        n, why = cuda_status()
        if n == 0:
            _tell_once(f"device 'auto' runs on the CPU: {why}")
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


def _tell_once(message: str) -> None:
    """A UserWarning with ``message``, the first time in this process only."""
    global _TOLD
    with _LOCK:
        told, _TOLD = _TOLD, True
    if told:
        return
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "gpubp":
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)  # pointing at the caller outside gpubp


def auto_device_reason() -> str:
    """One line saying why ``"auto"`` picked the device it did. A program that shows it
    (the gpubp command does) is not warned again by ``parse_device("auto")``."""
    global _TOLD
    n, why = cuda_status()
    if n == 0:
        with _LOCK:
            _TOLD = True
        return f"no GPU: {why}"
    return f"{n} GPU(s) seen, using cuda:0"
