"""Where Numba's CUDA compiler libraries come from: NVRTC and libNVVM.

Numba compiles kernels with libNVVM and finds it, like NVRTC, through
cuda-pathfinder: NVIDIA's wheels, conda, the system loader, then CUDA_PATH /
CUDA_HOME. One common set-up defeats that search: NVRTC from a wheel
(nvidia-cuda-nvrtc, which CuPy pulls in) and libNVVM only in a system toolkit
(/usr/local/cuda-X.Y/nvvm/lib64), with neither CUDA_HOME nor CUDA_PATH set. The
wheels hold no libNVVM, the system loader does not look in nvvm/lib64, and Numba
will not infer the toolkit from NVRTC's location when NVRTC came from a wheel.

:func:`ensure_nvvm` runs that search once, before the first compile; when it
fails it looks in CUDA_HOME, CUDA_PATH and /usr/local/cuda* itself and loads the
libNVVM it finds (Numba's search then finds it loaded). Where there is none it
raises :class:`NvvmNotFoundError`, which names the fix. :func:`describe` says
where each library was found, or why not, for ``gpubp info``.

This module imports neither Numba nor CuPy.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Found", "NvvmNotFoundError", "ensure_nvvm", "locate", "toolkit_roots", "describe"]

#: Where system CUDA toolkits are installed (a glob; the newest version is tried first).
SYSTEM_TOOLKITS = "/usr/local/cuda*"

FIX = (
    "pip install 'gpubp[cuda13]' (it brings the nvidia-nvvm wheel; 'gpubp[cuda12]' brings "
    "nvidia-cuda-nvcc-cu12, which carries libNVVM for CUDA 12), or set CUDA_HOME to a CUDA "
    "toolkit that has nvvm/lib64/libnvvm.so"
)


class NvvmNotFoundError(RuntimeError):
    """libNVVM, the library Numba compiles CUDA kernels with, is not installed where it can be found."""


@dataclass(frozen=True)
class Found:
    """A library and where it came from: ``via`` is cuda-pathfinder's step, or the toolkit of the fallback."""

    name: str
    path: str
    via: str


def _pathfinder_load(name: str) -> Found:
    """cuda-pathfinder's search (it also loads the library); LookupError with its reason when it fails."""
    try:
        from cuda import pathfinder
    except ImportError as e:  # older numba-cuda: Numba's own search applies
        raise LookupError(f"cuda-pathfinder is not installed ({e})") from None
    try:
        lib = pathfinder.load_nvidia_dynamic_lib(name)
    except Exception as e:  # DynamicLibNotFoundError, and whatever a broken install raises
        raise LookupError(f"{type(e).__name__}: {e}") from None
    return Found(name, str(lib.abs_path), str(lib.found_via))


def _preload(path: str) -> None:
    """Load a shared library by path (global symbols), so that later searches find it loaded."""
    ctypes.CDLL(path, mode=getattr(os, "RTLD_GLOBAL", 0))


def locate(name: str) -> Found:
    """Find (and load) the NVIDIA library ``name`` ("nvrtc", "nvvm") as Numba does; LookupError if not found."""
    return _pathfinder_load(name)


def _system_order(path: str) -> tuple:
    """The unversioned /usr/local/cuda link first (what nvcc and CuPy use), then the newest version."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", Path(path).name))
    return (bool(numbers), tuple(-n for n in numbers))


def toolkit_roots() -> list[Path]:
    """CUDA toolkits to search for libNVVM: CUDA_HOME, CUDA_PATH, then /usr/local/cuda* (newest first)."""
    roots: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            roots.append(Path(value))
    for p in sorted(glob.glob(SYSTEM_TOOLKITS), key=_system_order):
        if Path(p) not in roots:
            roots.append(Path(p))
    return roots


def nvvm_in(root: Path) -> Path | None:
    """The libNVVM of the toolkit at ``root`` (nvvm/lib64 on Linux, nvvm/bin on Windows), or None."""
    if sys.platform == "win32":
        patterns = ("nvvm/bin/x64/nvvm64*.dll", "nvvm/bin/nvvm64*.dll")
    else:
        patterns = ("nvvm/lib64/libnvvm.so*", "nvvm/lib/libnvvm.so*")
    for pattern in patterns:
        hits = sorted(root.glob(pattern), key=lambda p: (len(p.name), p.name), reverse=True)
        if hits:
            return hits[0]  # libnvvm.so.4.0.0 before libnvvm.so.4 before libnvvm.so
    return None


_nvvm: Found | None = None


def ensure_nvvm() -> Found:
    """Make libNVVM findable by Numba before its first compile; where it is, and how it was found.

    Raises :class:`NvvmNotFoundError` (naming the fix) when no libNVVM can be found.
    """
    global _nvvm
    if _nvvm is not None:
        return _nvvm
    try:
        _nvvm = _pathfinder_load("nvvm")
        return _nvvm
    except LookupError as e:
        reason = str(e)
    tried = []
    for root in toolkit_roots():
        path = nvvm_in(root)
        tried.append(str(root))
        if path is None:
            continue
        try:
            _preload(str(path))
        except OSError as e:
            reason += f"; {path} would not load: {e}"
            continue
        try:
            _pathfinder_load("nvvm")  # now found loaded, as Numba's own look-up will find it
        except LookupError as e:
            reason += f"; {path} loaded but still not found: {e}"
            continue
        _nvvm = Found("nvvm", str(path), f"fallback: the toolkit at {root}")
        return _nvvm
    where = ", ".join(tried) if tried else f"no CUDA_HOME, CUDA_PATH or {SYSTEM_TOOLKITS}"
    raise NvvmNotFoundError(
        f"libNVVM (NVVM, the CUDA compiler library Numba builds kernels with) was not found: {reason}. "
        f"Also searched: {where}. Fix: {FIX}."
    )


def describe() -> dict[str, str]:
    """{"NVRTC": where, "NVVM": where}: a path and how it was found, or why it was not (never raises)."""
    out: dict[str, str] = {}
    try:
        f = locate("nvrtc")
        out["NVRTC"] = f"{f.path} (via {f.via})"
    except LookupError as e:
        out["NVRTC"] = f"not found: {e}"
    try:
        f = ensure_nvvm()
        out["NVVM"] = f"{f.path} (via {f.via})"
    except NvvmNotFoundError as e:
        out["NVVM"] = f"not found: {e}"
    except Exception as e:  # a broken install: report it, do not crash `gpubp info`
        out["NVVM"] = f"not found: {type(e).__name__}: {e}"
    return out
