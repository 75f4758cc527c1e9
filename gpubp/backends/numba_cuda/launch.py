"""The launch machinery both Numba kernel packages share: the device build of the scalar maths,
the one counted launch path, streams, the grid-stride kernel factory, and the launchers' checks.

Nothing here is a kernel of its own. ``numba_cuda``'s kernel modules and ``numba_cuda_optim``
build their kernels with :data:`dm` and :func:`elementwise` and launch them through a
:class:`Launches`; the launchers validate their arguments with the helpers at the end.

Device functions are inlined into their kernels (inline="always", at the Numba IR level):
besides being cheap, this lets compile_ptx build every kernel without a GPU present (a called,
not inlined, device function is compiled for the current device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda, float32, float64  # the package's __init__ has checked numba-cuda's floor

from gpubp.backends import _cudasim, numba_setup, scalar_math

#: True when the kernels run under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
SIMULATOR: bool = _cudasim.active()
_cudasim.install()  # simulator only: shared arrays that the simulator's threads really share
if not SIMULATOR:
    numba_setup.ensure_nvvm()  # before the first compile; names the fix when libNVVM is missing

Array = Any

# Launch defaults. The launch shape never changes a result (see the package docstring).
ELEMENTWISE_THREADS = 256
MAX_BLOCKS = 8192  # grid-stride loops cover anything beyond this many blocks

_device = cuda.jit(device=True, inline="always")


def _product_rn() -> Any:
    """a * b on the device, rounded on its own: libdevice fmul_rn (float32) / dmul_rn (float64).

    The compiler never fuses these with an add into an FMA, so an update rounds as NumPy's does.
    """
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic
    from numba.cuda.typing import signature

    @intrinsic
    def mul_rn(typingctx, a, b):
        if a != b or a not in (float32, float64):
            return None
        fn = libdevice.fmul_rn if a == float32 else libdevice.dmul_rn
        sig = signature(a, a, b)

        def codegen(context, builder, signature_, args):
            return context.get_function(fn, sig)(builder, args)

        return sig, codegen

    return mul_rn


#: scalar_math compiled for the kernels (``dm.act_f(...)`` and so on). This is the one place
#: where the simulator and a GPU differ: the simulator's device code is Python, whose product
#: is already unfused; a GPU needs the intrinsic.
dm = scalar_math.build(_device, mul=None if SIMULATOR else _product_rn(), wide=float if SIMULATOR else None)


class Launches:
    """The one launch path of a module's kernels: it counts launches, and on a GPU launches
    each kernel through a dispatcher specialised once per ``key`` (the argument types the
    key stands for, e.g. the data dtype), so no launch pays for typing its arguments again.
    """

    def __init__(self) -> None:
        self.count = 0
        self._ready: dict[tuple, Any] = {}

    def __call__(self, kernel: Any, key: Any, blocks: Any, threads: Any, stream: Any, *args: Any) -> None:
        self.count += 1
        ready = self._ready.get((kernel, key))
        if ready is None:
            ready = self._ready[kernel, key] = kernel.specialize(*args)
        ready[blocks, threads, stream](*args)


#: The launch path of every ``numba_cuda`` kernel.
_launch = Launches()


def launch_count() -> int:
    """Kernels ``numba_cuda`` has launched so far (the backend reports launches per training step)."""
    return _launch.count


_STREAMS: dict[int, Any] = {}


def launch_stream(stream: Any) -> Any:
    """``stream`` as Numba's launch syntax takes it: 0, a Numba stream, or one wrapped (once per
    handle) from a CuPy stream or a raw ``cudaStream_t`` handle."""
    if stream is None:
        return 0
    if hasattr(stream, "auto_synchronize"):  # a Numba stream (or the simulator's)
        return stream
    ptr = getattr(stream, "ptr", stream)  # a CuPy stream, or a raw handle
    if isinstance(ptr, bool) or not isinstance(ptr, (int, np.integer)):
        raise TypeError(f"stream: expected 0, a Numba or CuPy stream, or a stream handle, got {type(stream).__name__}")
    ptr = int(ptr)
    if ptr == 0:
        return 0
    s = _STREAMS.get(ptr)
    if s is None:
        s = _STREAMS[ptr] = cuda.external_stream(ptr)
    return s


def _unchanged(args):
    return args


def elementwise(body: Callable | None = None, *, prepare: Callable | None = None) -> Any:
    """The kernel ``kernel(n, args)`` that runs ``body(i, args)`` for every i in [0, n), grid-stride.

    minitorch's map/zip for any mix of arrays and scalars: ``body`` is a plain function of
    one index (compiled here as an inlined device function) that unpacks the tuple ``args``
    (a tuple, because a kernel's arity is fixed and an inlined function takes no ``*args``).
    Any grid covers any n. ``prepare(args) -> args`` (optional) runs once per thread before
    the loop, for values that are the same for every element (a scale read from the device).
    The kernel takes body's name. Use as ``@elementwise`` or ``@elementwise(prepare=f)``.
    """
    if body is None:
        return lambda fn: elementwise(fn, prepare=prepare)
    step = _device(body)
    setup = _device(_unchanged if prepare is None else prepare)

    def kernel(n, args):
        ready = setup(args)
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            step(i, ready)

    kernel.__name__ = kernel.__qualname__ = body.__name__
    kernel.__doc__ = body.__doc__
    return cuda.jit(kernel)


def _elementwise(kernel: Any, dt: np.dtype, n: int, threads: int, max_blocks: int, stream: Any, args: tuple) -> None:
    """One launch of an :func:`elementwise` kernel over n elements."""
    _launch(kernel, dt, _grid(n, threads, max_blocks), threads, stream, n, args)


# --- the launchers' checks, shapes and scratch buffers (no device calls but allocation) ---------

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _dtype(x: Array, name: str) -> np.dtype:
    dt = np.dtype(x.dtype)
    if dt not in _FLOATS:
        raise TypeError(f"{name}: expected float32 or float64, got {dt}")
    return dt


def _c_contiguous(x: Array, name: str) -> None:
    flags = getattr(x, "flags", None)
    if flags is None:
        return
    try:
        ok = bool(flags["C_CONTIGUOUS"])
    except (KeyError, TypeError):
        ok = bool(getattr(flags, "c_contiguous", True))
    if not ok:
        raise ValueError(f"{name}: expected a C-contiguous array")


def _flat(x: Array) -> Array:
    return x if x.ndim == 1 else x.reshape(x.size)


def _size(shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _empty(shape: tuple, dtype: Any, like: Array, stream: Any) -> Array:
    """An uninitialised array on the same side as ``like`` (host NumPy, CuPy, or Numba device)."""
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=dtype)
    module = type(like).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy.empty(shape, dtype=dtype)
    return cuda.device_array(shape, dtype=dtype, stream=stream)


def _work(work: Array | None, size: int, like: Array, stream: Any, name: str) -> Array:
    """A float64 scratch vector of at least ``size`` (>= 1) elements: ``work`` checked, or a new one."""
    size = max(1, size)
    if work is None:
        return _empty((size,), np.float64, like, stream)
    if np.dtype(work.dtype) != np.float64 or work.ndim != 1 or work.size < size:
        raise ValueError(f"{name}: work must be a float64 vector of at least {size} elements")
    return work


def _grid(units: int, threads: int, max_blocks: int) -> int:
    return max(1, min((units + threads - 1) // threads, int(max_blocks)))


def _check_threads(threads: int, limit: int, name: str) -> int:
    threads = int(threads)
    if not 1 <= threads <= limit:
        raise ValueError(f"{name}: threads must be in [1, {limit}], got {threads}")
    return threads
