"""The CUDA backend: CuPy arrays on an NVIDIA GPU, cuBLAS GEMMs, Numba kernels for the rest.

The same interface as ``numpy_ref`` (asarray, to_numpy, zeros, all_finite,
dense_forward / dense_backward, mse / cross_entropy / bce_with_logits, and
``optim``, the optimizer update maths), so that layers, losses and optimizers
are written once.

What runs where, for a dense layer (the "unfused" path: the baseline the fused
CUDA C kernels are measured against):

    forward   z = x @ W               cupy.matmul (cuBLAS; TF32 only if CUPY_TF32=1)
              a = f(z + b)            numba_cuda.bias_activation_forward (z + b kept if f' needs z)
    backward  dz = da * f'(z or a)    numba_cuda.activation_backward (skipped for identity)
              dW = x^T @ dz           cupy.matmul into the gradient arena
              db = sum_rows dz        numba_cuda.bias_grad (two-stage, fixed order: same bits every run)
              dx = dz @ W^T           cupy.matmul, skipped for the first layer

Every kernel runs on CuPy's current stream (Numba sees it through
``numba.cuda.external_stream``), so work is ordered without host waits. Loss
values stay on the device as 0-d float64 arrays until somebody reads them.

Host data goes to the device through four page-locked (pinned) staging buffers
used in turn: a copy is queued asynchronously, and a buffer is refilled only
after the copy queued from it four uploads ago has finished (a training step
uploads x and y, so the host runs at most two steps ahead of the device).

``CudaBackend.simulator()`` is the same code with NumPy arrays and the Numba
kernels running in the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): the
backend's own logic (dispatch, arenas, work buffers, optimizer launches) is
tested on machines without a GPU that way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpubp.activations import Activation

Array = Any

# Threads per block under the simulator, which runs every thread as a Python thread.
_SIM_THREADS = 32


class _OnStream:
    """A view of an update-maths module whose functions always run on the backend's stream."""

    def __init__(self, module: Any, backend: CudaBackend) -> None:
        self._module = module
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._module, name)
        if not callable(fn):
            return fn

        @functools.wraps(fn)
        def on_stream(*args: Any, **kwargs: Any) -> Any:
            with self._backend.context():
                kwargs.setdefault("stream", self._backend.stream())
                if self._backend.simulated:
                    with self._module.launch_config(threads=_SIM_THREADS):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)

        return on_stream


class _FusedDense:
    """Dense layers through the CUDA C kernels of kernels/ (gpubp.backends.cuda_fused)."""

    def __init__(self, backend: CudaBackend) -> None:
        from gpubp.backends import cuda_fused

        self._backend = backend
        self._rk = cuda_fused

    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool) -> tuple[Array, tuple]:
        with self._backend.context(), self._backend._oom(f"a fused dense forward of shape {tuple(x.shape)}"):
            return self._rk.dense_forward(x, w, b, act, training)

    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool
    ) -> Array | None:
        with self._backend.context(), self._backend._oom(f"a fused dense backward of shape {tuple(da.shape)}"):
            return self._rk.dense_backward(da, saved, w, act, dw, db, need_dx)


class _Slot:
    """One pinned staging buffer and the event of the copy last queued from it."""

    def __init__(self) -> None:
        self.mem: Any = None
        self.event: Any = None


class CudaBackend:
    """Arrays and kernels of one CUDA device (or of the simulator: see the module docstring)."""

    name = "cuda"
    _cache: dict[Any, CudaBackend] = {}

    @classmethod
    def for_device(cls, index: int) -> CudaBackend:
        """The backend of GPU ``index`` (one per device and process)."""
        key = int(index)
        if key not in cls._cache:
            cls._cache[key] = cls(key)
        return cls._cache[key]

    @classmethod
    def simulator(cls) -> CudaBackend:
        """The backend with host arrays and the Numba CUDA simulator (needs NUMBA_ENABLE_CUDASIM=1)."""
        if "sim" not in cls._cache:
            cls._cache["sim"] = cls(None)
        return cls._cache["sim"]

    def __init__(self, index: int | None) -> None:
        from gpubp.backends import numba_cuda, numba_cuda_optim

        self.simulated = index is None
        if self.simulated and not numba_cuda.SIMULATOR:
            raise RuntimeError("the simulated CUDA backend needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported")
        self.index = 0 if index is None else int(index)
        self.nk = numba_cuda
        self.optim = _OnStream(numba_cuda_optim, self)
        self._threads = {"threads": _SIM_THREADS} if self.simulated else {}
        self._bias_threads = {"tile": 8, "row_threads": 2} if self.simulated else {}
        self._work: dict[Any, Array] = {}
        self._slots = [_Slot() for _ in range(4)]
        self._next_slot = 0
        self._numba_streams: dict[int, Any] = {}
        if self.simulated:
            self.xp = np
            self._device = None
        else:
            import cupy
            from numba.core import config as numba_config

            self.xp = cupy
            self._device = cupy.cuda.Device(self.index)
            # Every launch runs on the stream its arrays were made on (CuPy's current
            # stream); Numba need not synchronise on a CUDA-array-interface stream.
            numba_config.CUDA_ARRAY_INTERFACE_SYNC = False

    def __repr__(self) -> str:
        return "CudaBackend(simulator)" if self.simulated else f"CudaBackend(cuda:{self.index})"

    # -- device, stream, memory ------------------------------------------------------------

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Make this backend's GPU current for CuPy and Numba (a no-op under the simulator)."""
        if self.simulated:
            yield
            return
        from numba import cuda

        with self._device:
            if cuda.get_current_device().id != self.index:
                cuda.select_device(self.index)
            yield

    def stream(self) -> Any:
        """CuPy's current stream as a Numba stream (0, the default stream, under the simulator)."""
        if self.simulated:
            return 0
        import cupy
        from numba import cuda

        ptr = cupy.cuda.get_current_stream().ptr
        if ptr == 0:
            return 0
        if ptr not in self._numba_streams:
            self._numba_streams[ptr] = cuda.external_stream(ptr)
        return self._numba_streams[ptr]

    @contextlib.contextmanager
    def _oom(self, what: str, nbytes: int | None = None) -> Iterator[None]:
        """Turn CuPy's out-of-memory error into a MemoryError that gives the sizes."""
        if self.simulated:
            yield
            return
        import cupy

        try:
            yield
        except cupy.cuda.memory.OutOfMemoryError as e:
            free, total = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            asked = f"{nbytes / 2**20:.1f} MiB asked for" if nbytes is not None else str(e)
            raise MemoryError(
                f"out of GPU memory on cuda:{self.index} while {what}: {asked}; "
                f"{free / 2**20:.1f} MiB free of {total / 2**20:.1f} MiB on the device, "
                f"{pool.total_bytes() / 2**20:.1f} MiB held by CuPy's memory pool "
                f"(use a smaller batch or model, or free other arrays)"
            ) from None

    def _scratch(self, size: int, key: str) -> Array:
        """A float64 work vector of at least ``size`` elements, reused across calls on one stream."""
        stream = self.stream()
        slot = (key, id(stream) if stream != 0 else 0)
        buf = self._work.get(slot)
        if buf is None or buf.size < size:
            buf = self.zeros(max(1, int(size)), np.float64)
            self._work[slot] = buf
        return buf

    # -- array helpers ---------------------------------------------------------------------

    def is_device_array(self, x: Any) -> bool:
        """Whether x lives on a GPU (CuPy, or anything exposing CUDA memory); never under the simulator."""
        if self.simulated or isinstance(x, np.ndarray):
            return False
        if hasattr(x, "__cuda_array_interface__"):
            return True
        dl = getattr(x, "__dlpack_device__", None)
        if dl is not None:
            try:
                return dl()[0] in (2, 13)  # kDLCUDA, kDLCUDAManaged
            except Exception:
                return False
        return False

    def zeros(self, shape: Any, dtype: Any) -> Array:
        dt = np.dtype(dtype)
        if self.simulated:
            return np.zeros(shape, dtype=dt)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        with self.context(), self._oom("allocating an array", n):
            return self.xp.zeros(shape, dtype=dt)

    def asarray(self, x: Any, dtype: Any) -> Array:
        """x as a C-contiguous array of ``dtype`` on this device.

        Device arrays (CuPy, __cuda_array_interface__, DLPack) are taken without a
        copy when dtype and layout already match; host arrays are copied in through
        the pinned staging buffers.
        """
        dt = np.dtype(dtype)
        if self.simulated:
            return np.array(x, dtype=dt, order="C", copy=True)  # a copy, as a transfer would be
        cupy = self.xp
        with self.context():
            if self.is_device_array(x):
                if not isinstance(x, cupy.ndarray):
                    x = cupy.asarray(x) if hasattr(x, "__cuda_array_interface__") else cupy.from_dlpack(x)
                if x.dtype == dt and x.flags.c_contiguous:
                    return x
                with self._oom("converting an input array", x.size * dt.itemsize):
                    return cupy.ascontiguousarray(x, dtype=dt)
            return self._upload(np.ascontiguousarray(x, dtype=dt))

    def _upload(self, host: np.ndarray) -> Array:
        cupy = self.xp
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        if slot.event is not None:
            slot.event.synchronize()  # the copy queued from this buffer four uploads ago
        if slot.mem is None or slot.mem.size() < host.nbytes:
            slot.mem = cupy.cuda.alloc_pinned_memory(max(host.nbytes, 1))
        staged = np.frombuffer(slot.mem, dtype=host.dtype, count=host.size).reshape(host.shape)
        np.copyto(staged, host)
        with self._oom("copying input to the device", host.nbytes):
            out = cupy.empty(host.shape, dtype=host.dtype)
        stream = cupy.cuda.get_current_stream()
        out.set(staged, stream=stream)
        slot.event = stream.record()
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        """A host copy (waits for the device)."""
        if isinstance(x, np.ndarray) or np.isscalar(x):
            return np.asarray(x)
        with self.context():
            return self.xp.asnumpy(x)

    def all_finite(self, x: Array) -> bool:
        """Whether every element is finite (one deterministic kernel pass; waits for the answer)."""
        flat = x.reshape(-1)
        return bool(self.optim.all_finite(flat)) if flat.size else True

    # -- dense layer: forward and backward as a pair -----------------------------------------

    def dense_ops(self, impl: str, dtype: Any) -> Any:
        """What runs dense layers: this backend (unfused: cuBLAS + Numba) or the fused CUDA C kernels."""
        if impl in ("auto", "unfused"):
            return self
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"dense_impl: 'fused' kernels are float32 only, got dtype {np.dtype(dtype).name}")
        if self.simulated:
            raise ValueError("dense_impl: 'fused' CUDA C kernels run on a real GPU only, not under the simulator")
        return _FusedDense(self)

    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool) -> tuple[Array, tuple]:
        """a = f(x @ W + b); saved = (x, z or a or None) when training, else (). See numpy_ref."""
        xp = self.xp
        with self.context(), self._oom(f"a dense forward of shape {tuple(x.shape)} @ {tuple(w.shape)}"):
            z = xp.matmul(x, w)
            keep_z = training and act.saves == "z"
            a = xp.empty_like(z) if keep_z else z  # a over z when z + b is not needed again
            self.nk.bias_activation_forward(z, b, act, a, keep_z, stream=self.stream(), **self._threads)
        if not training:
            return a, ()
        return a, (x, {"z": z, "a": a, "": None}[act.saves])

    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool
    ) -> Array | None:
        """dz = da * f'; dW = x^T dz (into dw); db = sum_rows dz (into db); dx = dz W^T if need_dx."""
        xp = self.xp
        x, kept = saved
        with self.context(), self._oom(f"a dense backward of shape {tuple(da.shape)}"):
            stream = self.stream()
            if act.saves == "":
                dz = da  # identity: f' = 1
            else:
                z = kept if act.saves == "z" else None
                a = kept if act.saves == "a" else None
                dz = self.nk.activation_backward(da, z, a, act, stream=stream, **self._threads)
            xp.matmul(x.T, dz, out=dw)
            work = self._scratch(self.nk.bias_grad_work_size(*dz.shape), "bias_grad")
            self.nk.bias_grad(dz, db, stream=stream, work=work, **self._bias_threads)
            return xp.matmul(dz, w.T) if need_dx else None

    # -- losses: value and gradient in one call -----------------------------------------------

    def _loss(self, kernel: Any, pred: Array, target: Array, scale: float, rowwise: bool) -> tuple[Array, Array]:
        with self.context(), self._oom(f"a loss over {tuple(pred.shape)}"):
            value = self.xp.empty(1, dtype=np.float64)
            grad = self.xp.empty_like(pred)
            work = self._scratch(self.nk.loss_work_size(tuple(pred.shape), rowwise=rowwise), "loss")
            kernel(pred, target, scale, value, grad, stream=self.stream(), work=work, **self._threads)
        return value.reshape(()), grad

    def mse(self, pred: Array, target: Array, scale: float) -> tuple[Array, Array]:
        return self._loss(self.nk.mse, pred, target, scale, rowwise=False)

    def cross_entropy(self, logits: Array, target: Array, scale: float) -> tuple[Array, Array]:
        return self._loss(self.nk.cross_entropy, logits, target, scale, rowwise=True)

    def bce_with_logits(self, logits: Array, target: Array, scale: float) -> tuple[Array, Array]:
        return self._loss(self.nk.bce_with_logits, logits, target, scale, rowwise=False)
