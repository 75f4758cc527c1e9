"""The CUDA backend: CuPy arrays on an NVIDIA GPU, cuBLAS GEMMs, Numba kernels for the rest.

Implements gpubp.backends.base.Backend. What runs where, for a dense layer (the "unfused" path: the baseline the fused
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

Mixed precision (a ``precision`` argument, gpubp.precision): native for tf32, bf16-mixed and
fp16-mixed (``native_precisions``; gpubp.backends.cuda_precision): tensor-core GEMMs through
cublasGemmEx (TF32 compute type, or 16-bit inputs with fp32 accumulation), 16-bit working copies of
the weights made once per parameter change, the Numba 16-bit epilogue and activation backward;
what a layer returns stays float32. Fused or not (the tensor-core fused kernels take da in 16 bits,
the spec a float32 da: not wired). A precision outside ``native_precisions`` is emulated around the
unfused path: the kernels above on copies rounded at the spec's points, outputs rounded in place.

With ``fused=True`` dense layers run the fused CUDA C kernels of kernels/ instead
(gpubp.backends.cuda_fused: forward GEMM + bias + activation in one kernel, backward
with dz formed in the operand loads); everything else is the same.

The simulated backend (gpubp.backends.cudasim) subclasses this one and overrides
only where arrays live and how kernels are launched: the hooks :meth:`context`,
:meth:`stream`, :meth:`_oom` and the array helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp._random import dropout_keep
from gpubp.activations import Activation
from gpubp.backends.base import Array, Backend, Value
from gpubp.precision import Precision, active, emulate_dense_forward, emulate_dense_gemms, round_to
from gpubp.step_plan import CaptureError, Cell, get

if TYPE_CHECKING:
    from gpubp.backends.rows import Hyper, LossRule, Rule


def _refilled(run: Any) -> Any:
    """A planned form's thunk: ``run()``'s arrays, written after the first call into those it
    returned first (the arrays the rest of the recorded step is bound to)."""
    first: list[Any] = []

    def thunk() -> Any:
        fresh = run()
        if not first:
            first.append(fresh)
            return fresh
        for into, new in zip(first[0], fresh, strict=True):
            into[...] = new
        return first[0]

    return thunk


class _Slot:
    """One pinned staging buffer and the event of the copy last queued from it."""

    def __init__(self) -> None:
        self.mem: Any = None
        self.event: Any = None


def _cuda_interface(x: Any) -> bool:
    """Whether x exposes __cuda_array_interface__; a torch tensor that requires grad gets a TypeError."""
    try:
        return hasattr(x, "__cuda_array_interface__")
    except RuntimeError:  # torch: "Can't get __cuda_array_interface__ on Variable that requires grad"
        if getattr(x, "requires_grad", False):
            raise TypeError(
                f"x: a {type(x).__name__} that requires grad cannot be shared without a copy; "
                "pass x.detach() (gpubp computes its own gradients)"
            ) from None
        raise


class CudaBackend(Backend):
    """Arrays and kernels of one CUDA device."""

    name = "cuda"
    _cache: dict[Any, CudaBackend] = {}
    #: launch-shape keywords for the Numba kernels (the simulator narrows them)
    _launch: dict[str, int] = {}
    _bias_launch: dict[str, int] = {}
    #: a recorded step's per-step values reach the primitives as step_plan Cells, read on the device
    #: (gpubp.backends.cuda_graph.device_cell): the optimizer's scalars, the guard's tag, dropout keys
    reads_cells = True
    #: the CUDA graph capture under way (a cuda_graph.Capture), None outside
    _capture: Any = None
    #: the precisions run natively (gpubp.backends.cuda_precision); others are emulated (training warns)
    native_precisions: tuple[str, ...] = ("tf32", "bf16-mixed", "fp16-mixed")
    #: bumped whenever parameters may change (update, assign_, full): the 16-bit weight copies' key
    _param_version = 0
    _native_dense: Any = None

    @classmethod
    def for_device(cls, index: int, fused: bool = False) -> CudaBackend:
        """The backend of GPU ``index`` (one per device, dense path and process)."""
        key = (int(index), bool(fused))
        if key not in cls._cache:
            cls._cache[key] = cls(*key)
        return cls._cache[key]

    def __init__(self, index: int, fused: bool = False) -> None:
        import cupy
        from numba.core import config as numba_config

        from gpubp.backends import numba_cuda, numba_cuda_optim

        self.index = int(index)
        self.fused = bool(fused)
        self.nk = numba_cuda
        self.nbo = numba_cuda_optim
        self.xp = cupy
        self._device = cupy.cuda.Device(self.index)
        self._work: dict[Any, Array] = {}
        self._slots = [_Slot() for _ in range(4)]
        self._next_slot = 0
        self._numba_streams: dict[int, Any] = {}
        self._gemms = 0  # cuBLAS GEMM calls queued by this backend (see launch_count)
        # Every launch runs on the stream its arrays were made on (CuPy's current
        # stream); Numba need not synchronise on a CUDA-array-interface stream.
        numba_config.CUDA_ARRAY_INTERFACE_SYNC = False
        if self.fused:
            from gpubp.backends import cuda_fused

            self._fused = cuda_fused

    def _blas(self) -> tuple[Any, Any]:
        """CuPy's cuBLAS bindings and this device's handle (the simulator's tests pass a fake)."""
        from cupy_backends.cuda.libs import cublas

        return cublas, self.xp.cuda.device.get_cublas_handle()

    def _native(self, prec: Precision | None) -> Any:
        """The native mixed-precision dense path when ``prec`` is one of ``native_precisions``, else None."""
        if prec is None or prec.name not in self.native_precisions:
            return None
        if self._native_dense is None:
            from gpubp.backends.cuda_precision import NativeDense

            self._native_dense = NativeDense(self)
        return self._native_dense

    def graph_capture(self, plan: Any) -> Any:
        """A context manager capturing the recorded step run inside as a CUDA graph (``plan.graph``):
        gpubp.backends.cuda_graph."""
        from gpubp.backends import cuda_graph

        return cuda_graph.graph_capture(self, plan)

    def _cell(self, cell: Cell, dtype: Any, kind: str) -> Array:
        from gpubp.backends import cuda_graph

        return cuda_graph.device_cell(self, cell, dtype, kind)

    def _loss_scale(self, scale: Any) -> float:
        """A weighted loss's scale: the loss kernels take it as a launch argument (the host forms the
        gradient factor from it, and the value's final product), so a recorded one cannot be replayed
        as a graph; the step runs eagerly (StepCapture's CaptureError)."""
        if type(scale) is Cell:
            raise CaptureError("a weighted loss's scale changes per step and the CUDA loss kernels take it as a "
                               "launch argument")
        return scale

    # -- planned forms (gpubp.step_plan): the primitives that take cells, replayed with the cells as
    #    they are (a re-capture, the simulator's replay) and their outputs written into those of the capture

    def plan_update(self, rule: Rule, p: Array, g: Array, state: tuple, hp: Any, guard: Array | None = None) -> Any:
        return lambda: self.update(rule, p, g, state, hp, guard)

    def plan_flag_nonfinite_(self, value: Any, g: Array, flag: Array, tag: Any) -> Any:
        return lambda: self.flag_nonfinite_(value, g, flag, tag)

    def plan_dropout_forward(self, x: Array, key: Any, p: float, precision: Precision | None = None) -> Any:
        return _refilled(lambda: self.dropout_forward(x, key, p, precision))

    def plan_loss(self, rule: LossRule, pred: Array, target: Array, scale: Any, weight: Array | None = None) -> Any:
        return _refilled(lambda: self.loss(rule, pred, target, scale, weight))

    def launch_count(self) -> int:
        """Kernels queued so far: every Numba kernel launch in this process (``numba_cuda`` and
        ``numba_cuda_optim`` count them), the fused CUDA C kernel launches, and this backend's
        cuBLAS GEMM calls. CuPy's own elementwise kernels (dropout masks, row gathers, dtype
        conversions) are not counted. ``gpubp bench`` and the GPU check report the difference
        over one training step."""
        fused = self._fused.launch_count() if self.fused else 0
        return self.nk.launch_count() + self.nbo.launch_count() + fused + self._gemms

    def __repr__(self) -> str:
        return f"CudaBackend(cuda:{self.index}{', fused' if self.fused else ''})"

    # -- device, stream, memory (hooks the simulator overrides) ----------------------------

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Make this backend's GPU current for CuPy and Numba."""
        from numba import cuda

        with self._device:
            if cuda.get_current_device().id != self.index:
                cuda.select_device(self.index)
            yield

    def stream(self) -> Any:
        """CuPy's current stream as a Numba stream (0 for the default stream)."""
        from numba import cuda

        ptr = self.xp.cuda.get_current_stream().ptr
        if ptr == 0:
            return 0
        if ptr not in self._numba_streams:
            self._numba_streams[ptr] = cuda.external_stream(ptr)
        return self._numba_streams[ptr]

    @contextlib.contextmanager
    def _oom(self, what: str, nbytes: int | None = None) -> Iterator[None]:
        """Turn CuPy's out-of-memory error into a MemoryError that gives the sizes."""
        cupy = self.xp
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

    @contextlib.contextmanager
    def _launching(self, what: str, nbytes: int | None = None) -> Iterator[Any]:
        """Device current, out-of-memory translated; yields the stream to launch on."""
        with self.context(), self._oom(what, nbytes), self.nbo.launch_config(**self._launch):
            yield self.stream()

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
        """Whether x lives on a GPU (CuPy, or anything exposing CUDA memory)."""
        if isinstance(x, np.ndarray):
            return False
        if _cuda_interface(x):
            return True
        dl = getattr(x, "__dlpack_device__", None)
        if dl is not None:
            try:
                return dl()[0] in (2, 13)  # kDLCUDA, kDLCUDAManaged
            except Exception:
                return False
        return False

    def full(self, shape: Any, value: float, dtype: Any) -> Array:
        n = int(np.prod(shape, dtype=np.int64))
        self._param_version += 1  # a new array may take a freed one's memory
        with self._launching("allocating an array", n * np.dtype(dtype).itemsize) as s:
            out = self.nbo.full(n, value, dtype, stream=s)
        return out if isinstance(shape, (int, np.integer)) else out.reshape(shape)

    def assign_(self, dst: Array, src: np.ndarray) -> None:
        self._param_version += 1
        with self._launching("copying to the device") as s:
            self.nbo.assign_(dst, src, stream=s)

    def asarray(self, x: Any, dtype: Any) -> Array:
        """x as a C-contiguous array of ``dtype`` on this device.

        Device arrays (CuPy, __cuda_array_interface__, DLPack) are taken without a
        copy when dtype and layout already match; host arrays are copied in through
        the pinned staging buffers.
        """
        dt = np.dtype(dtype)
        cupy = self.xp
        with self.context():
            if self.is_device_array(x):
                if not isinstance(x, cupy.ndarray):
                    x = cupy.asarray(x) if _cuda_interface(x) else cupy.from_dlpack(x)
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
        from gpubp.backends.cuda_precision import bf16_to_float32, is_bf16

        if is_bf16(x):  # a native bf16 saved tensor: its values
            return bf16_to_float32(self.to_numpy(x.view(type=type(x).__mro__[1])))
        if isinstance(x, np.ndarray) or np.isscalar(x):
            return np.array(x, copy=True)
        with self.context():
            return self.xp.asnumpy(x)

    def take_rows(self, data: Array, index: slice | np.ndarray) -> Array:
        """Rows of a device array (a host index array is uploaded first), or of a host array, uploaded."""
        if not self.is_device_array(data):
            return self.asarray(data[index], data.dtype)
        with self.context():
            if not isinstance(index, slice):
                index = self.asarray(index, np.int64)
            return data[index]

    # -- dense layer: forward and backward as a pair -----------------------------------------

    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool,
                      precision: Precision | None = None) -> tuple[Array, tuple]:
        """a = f(x @ W + b); saved = (x, z or a or a mask) when training, else (). See numpy_ref.
        Under a precision: native (cuda_precision) or the unfused kernels on rounded copies (an emulation)."""
        prec = active(precision)
        native = self._native(prec)
        if native is not None:
            with self._launching(f"a {prec.name} dense forward of shape {tuple(x.shape)} @ {tuple(w.shape)}") as s:
                return native.forward(x, w, b, act, training, prec, s)
        if prec is not None:
            with self.context(), self._oom(f"a mixed-precision dense forward of shape {tuple(x.shape)}"):
                return emulate_dense_forward(self.xp, self._dense_forward, x, w, b, act, training, prec)
        if self.fused:
            with self.context(), self._oom(f"a fused dense forward of shape {tuple(x.shape)}"):
                return self._fused.dense_forward(x, w, b, act, training)
        return self._dense_forward(x, w, b, act, training)

    def _dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool) -> tuple[Array, tuple]:
        """The unfused forward: cuBLAS, then the bias-activation kernel."""
        xp = self.xp
        with self._launching(f"a dense forward of shape {tuple(x.shape)} @ {tuple(w.shape)}") as s:
            z = xp.matmul(x, w)
            self._gemms += 1
            keep_z = training and act.saves == "z"
            a = xp.empty_like(z) if keep_z else z  # a over z when z + b is not needed again
            self.nk.bias_activation_forward(z, b, act, a, keep_z, stream=s, **self._launch)
        if not training:
            return a, ()
        return a, (x, {"z": z, "a": a, "": None}[act.saves])

    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool,
        precision: Precision | None = None,
    ) -> Array | None:
        """dz = da * f'; dW = x^T dz (into dw); db = sum_rows dz (into db); dx = dz W^T if need_dx.
        Under a precision: the unfused kernels for dz and db, the GEMMs on rounded copies (an emulation)."""
        prec = active(precision)
        native = self._native(prec)
        if native is not None:
            with self._launching(f"a {prec.name} dense backward of shape {tuple(da.shape)}") as s:
                return native.backward(da, saved, w, act, dw, db, need_dx, prec, s)
        if prec is not None:
            return self._dense_backward_mixed(da, saved, w, act, dw, db, need_dx, prec)
        if self.fused:
            with self.context(), self._oom(f"a fused dense backward of shape {tuple(da.shape)}"):
                return self._fused.dense_backward(da, saved, w, act, dw, db, need_dx)
        xp = self.xp
        x, kept = saved
        with self._launching(f"a dense backward of shape {tuple(da.shape)}") as s:
            if act.saves == "":
                dz = da  # identity: f' = 1
            else:
                z = kept if act.saves == "z" else None
                a = kept if act.saves == "a" else None
                dz = self.nk.activation_backward(da, z, a, act, stream=s, **self._launch)
            xp.matmul(x.T, dz, out=dw)
            self._gemms += 1 + bool(need_dx)  # dW here, dx below
            work = self._scratch(self.nk.bias_grad_work_size(*dz.shape), "bias_grad")
            self.nk.bias_grad(dz, db, stream=s, work=work, **self._bias_launch)
            return xp.matmul(dz, w.T) if need_dx else None

    def _dense_backward_mixed(self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array,
                              need_dx: bool, prec: Precision) -> Array | None:
        x, kept = saved
        with self._launching(f"a mixed-precision dense backward of shape {tuple(da.shape)}") as s:
            if act.saves == "":
                dz = da
            else:
                z = kept if act.saves == "z" else None
                a = kept if act.saves == "a" else None
                dz = self.nk.activation_backward(da, z, a, act, stream=s, **self._launch)
            work = self._scratch(self.nk.bias_grad_work_size(*dz.shape), "bias_grad")
            self.nk.bias_grad(dz, db, stream=s, work=work, **self._bias_launch)
            self._gemms += 1 + bool(need_dx)
            return emulate_dense_gemms(self.xp, x, dz, w, dw, need_dx, prec)

    # -- dropout: the reference's counter-based mask, computed with this backend's array module ----

    def dropout_forward(self, x: Array, key: Any, p: float, precision: Precision | None = None) -> tuple[Array, Array]:
        with self.context(), self._oom(f"dropout over {tuple(x.shape)}"):
            if type(key) is Cell:  # a recorded step's: the key read on the device, the same mask
                key = self._cell(key, np.uint64, "one")
            keep = dropout_keep(self.xp, key, tuple(x.shape), p)
            y = x * keep * x.dtype.type(1.0 / (1.0 - p))
            prec = active(precision)
            return (y if prec is None else round_to(self.xp, y, prec.store, out=y)), keep

    def dropout_backward(self, dy: Array, keep: Array, p: float, precision: Precision | None = None) -> Array:
        with self.context(), self._oom(f"dropout backward over {tuple(dy.shape)}"):
            dx = dy * keep * dy.dtype.type(1.0 / (1.0 - p))
            prec = active(precision)
            return dx if prec is None else round_to(self.xp, dx, prec.store, out=dx)

    # -- losses: value and gradient in one call (numba_cuda.loss: the rule's kernel family) -------

    def loss(self, rule: LossRule, pred: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[Value, Array]:
        scale = self._loss_scale(scale)
        rowwise = rule.family == "softmax"
        with self._launching(f"a {rule.name} loss over {tuple(pred.shape)}") as s:
            value = self.xp.empty(1, dtype=np.float64)
            grad = self.xp.empty_like(pred)
            work = self._scratch(self.nk.loss_work_size(tuple(pred.shape), rowwise=rowwise), "loss")
            self.nk.loss(rule, pred, target, scale, value, grad, stream=s, work=work, weight=weight, **self._launch)
        return value.reshape(()), grad

    # -- optimizer updates: one launch of the rule's generic kernel over each contiguous run ----

    def update(self, rule: Rule, p: Array, g: Array, state: tuple, hp: Hyper, guard: Array | None = None) -> None:
        """``hp`` a Cell (a recorded step): the kernel reads its scalars from the device, its flags
        (compile-time constants) from ``hp.value`` (cuda_graph: a graph re-captured when they change)."""
        from gpubp.backends import cuda_update

        self._param_version += 1  # the 16-bit weight copies are made again
        with self._launching(f"a {rule.name} step") as s:
            dev = None
            if type(hp) is Cell:
                dev = self._cell(hp, p.dtype, "hyper")
                hp = hp.value
            cuda_update.update(rule, p, g, state, hp, guard, stream=s, hp_device=dev)

    def flag_nonfinite_(self, value: Value, g: Array, flag: Array, tag: Any) -> None:
        """Three Numba launches on the stream (set, scan, merge); nothing comes back to the host.
        ``tag`` a Cell (a recorded step): read on the device; ``value`` a Cell: its value now."""
        with self._launching("checking for NaN/Inf") as s:
            if type(tag) is Cell:
                tag = self._cell(tag, np.int64, "one")
            self.nbo.flag_nonfinite_(get(value).reshape(1), g.reshape(-1), flag, tag, stream=s)

    # -- reductions (two-pass, fixed order) ------------------------------------------------------

    def reduce_into(self, g: Array, out: Array, op: str, *, accumulate: bool = False) -> None:
        with self._launching(f"a {op} reduction") as s:
            self.nbo.reduce_into(g.reshape(-1), out, op, stream=s, accumulate=accumulate)

    def scale_(self, g: Array, c: float) -> None:
        with self._launching("scaling gradients") as s:
            self.nbo.scale_(g, c, stream=s)

    def clip_scale_(self, g: Array, total_sq: Array, max_norm: float) -> None:
        with self._launching("clipping gradients") as s:
            self.nbo.clip_scale_(g, total_sq, max_norm, stream=s)
