"""Arrays and streams for the Numba CUDA optimizer kernels: argument checks, scratch buffers,
host copies (``numba_cuda_optim`` and ``cuda_update`` launch with these).

Arrays may be NumPy arrays (under the Numba CUDA simulator), Numba device arrays or any
object with ``__cuda_array_interface__`` such as CuPy arrays, handed to kernels as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from gpubp.backends.numba_cuda import launch_stream

Array = Any

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT_DTYPES = FLOAT_DTYPES


# --- arrays --------------------------------------------------------------------

_ARRAY_TYPES: dict[type, bool] = {}


def _arr(a: Any, name: str) -> Any:
    """``a`` itself when a kernel takes it (a NumPy array, or any CUDA array: no wrapping), else TypeError."""
    if a is None:
        raise ValueError(f"{name}: expected an array, got None")
    kind = type(a)
    ok = _ARRAY_TYPES.get(kind)
    if ok is None:
        ok = _ARRAY_TYPES[kind] = (
            issubclass(kind, np.ndarray)
            or hasattr(kind, "__cuda_array_interface__")  # CuPy, Numba device arrays
            or hasattr(a, "copy_to_host")  # a simulator device array
        )
    if not ok:
        raise TypeError(f"{name}: expected a NumPy or CUDA array, got {kind.__name__}")
    return a


def _as_numba(a: Any) -> Any:
    """A NumPy array, or a Numba device array viewing ``a`` (for copies to and from the host)."""
    if isinstance(a, np.ndarray) or hasattr(a, "copy_to_host"):
        return a
    return cuda.as_cuda_array(a, sync=False)  # sync=False: the copy is queued on the caller's stream


def _contiguous(a: Any) -> bool:
    flags = getattr(a, "flags", None)
    if flags is None:
        return True
    try:
        return bool(flags["C_CONTIGUOUS"])
    except (KeyError, TypeError):
        return bool(getattr(flags, "c_contiguous", True))


def _check(arrays: dict[str, Any], n: int | None = None, dtype: np.dtype | None = None) -> tuple[int, np.dtype]:
    """Check that ``arrays`` (already converted) are 1-D, contiguous, of one float dtype and one length."""
    for name, a in arrays.items():
        dt = np.dtype(a.dtype)
        if dtype is None:
            if dt not in _FLOAT_DTYPES:
                raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {dt}")
            dtype = dt
        elif dt != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} like the other arrays, got {dt}")
        shape = tuple(a.shape)
        if len(shape) != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {shape}")
        if n is None:
            n = shape[0]
        elif shape[0] != n:
            raise ValueError(f"{name}: expected {n} elements like the other arrays, got {shape[0]}")
        if not _contiguous(a):
            raise ValueError(f"{name}: expected a contiguous array")
    assert n is not None and dtype is not None
    return n, dtype


def _one(a: Any, name: str, dtype: np.dtype) -> Any:
    """A one-element array of ``dtype`` (a device-side scalar)."""
    a = _arr(a, name)
    if np.dtype(a.dtype) != dtype or tuple(a.shape) != (1,):
        raise ValueError(f"{name}: expected a 1-element {dtype} array, got shape {tuple(a.shape)} dtype {a.dtype}")
    return a


_DEVICE_CACHE: dict[tuple, Any] = {}


def _stream_key(s: Any) -> int:
    return 0 if isinstance(s, int) else int(s)


def _workspace(what: str, n: int, dtype: Any, s: Any, like: Any) -> Any:
    """A scratch array of at least ``n`` elements on ``like``'s side, reused per (device, stream) on a GPU."""
    if isinstance(like, np.ndarray):
        return np.empty(max(n, 1), dtype)
    key = (what, int(cuda.get_current_device().id), _stream_key(s), np.dtype(dtype).str)
    a = _DEVICE_CACHE.get(key)
    if a is None or a.shape[0] < n:
        a = _DEVICE_CACHE[key] = cuda.device_array(max(n, 1), dtype, stream=s)
    return a


def _read_scalar(a: Any, s: Any) -> Any:
    """Element 0 of a 1-element array, on the host (waits for ``s``)."""
    if isinstance(a, np.ndarray):
        return a[0]
    host = _as_numba(a).copy_to_host(stream=s)
    if s != 0:
        s.synchronize()
    return host[0]


# --- helpers -------------------------------------------------------------------------------


def to_numpy(a: Array, *, stream: Any = 0) -> np.ndarray:
    """A host copy of ``a`` (waits for the copy to finish)."""
    if isinstance(a, np.ndarray):
        return np.array(a, copy=True)
    s = launch_stream(stream)
    host = _as_numba(_arr(a, "a")).copy_to_host(stream=s)
    if s != 0:
        s.synchronize()
    return np.asarray(host)


def assign_(dst: Array, src: np.ndarray, *, stream: Any = 0) -> None:
    """Copy the host array ``src`` (any shape, ``dst.size`` elements, ``dst``'s dtype) into ``dst``."""
    if isinstance(dst, np.ndarray):
        np.copyto(dst, np.asarray(src).reshape(dst.shape), casting="no")
        return
    d = _as_numba(_arr(dst, "dst"))
    host = np.asarray(src)
    if host.dtype != np.dtype(d.dtype):
        raise TypeError(f"src: expected dtype {d.dtype} (no casting), got {host.dtype}")
    host = np.ascontiguousarray(host.reshape(tuple(d.shape)))
    d.copy_to_device(host, stream=launch_stream(stream))
