"""The CUDA backend's native mixed precision: tensor-core GEMMs through cuBLAS gemmEx, 16-bit
working copies, the Numba 16-bit epilogue (gpubp.backends.numba_cuda.precision).

Semantics are the spec's (gpubp.precision, numpy_ref): equal to the emulation up to the GEMMs'
accumulation order (fp32 accumulation inside cuBLAS).

GEMMs. ``cublasGemmEx`` called directly (``cupy_backends.cuda.libs.cublas.gemmEx``), never
``cupy.matmul``: CuPy picks the compute type from a process-wide setting (``CUPY_TF32`` /
``_core.set_compute_type``: a global, not thread-safe to flip around one call), and its matmul on
float16 arrays writes a float16 result (the spec wants the fp32 GEMM output before bias and
activation). Per call here: tf32 -> A, B, C CUDA_R_32F with CUBLAS_COMPUTE_32F_FAST_TF32; bf16 /
fp16 -> A, B CUDA_R_16BF / CUDA_R_16F, C CUDA_R_32F, CUBLAS_COMPUTE_32F. TF32 inputs are rounded
to tf32 (RNE, round_to's rounding) before the call, so cuBLAS's own fp32 -> tf32 conversion
(truncation or round-away on the hardware) has nothing left to round.

Row-major arrays vs cuBLAS's column-major: a C-contiguous (r, c) array is the column-major
(c, r) matrix with leading dimension c, so C = op(A) @ op(B) is computed as
C^T = op(B)^T @ op(A)^T: cuBLAS's A is our B, its B our A, m = C's columns, n = C's rows.

Storage. 16-bit values live in uint16 arrays (bf16 bits: CuPy 14 has no bfloat16 dtype) presented
as float16 for fp16 and as :class:`Bf16` (a marker subclass of the array type, so ``to_numpy``
decodes them) for bf16. What leaves a layer is float32 (the boundary: losses, metrics, dropout,
predict and the recorded step's buffers all take float32): the epilogue writes the returned a as
float32 R_s values and the saved z / a as 16-bit in the same pass; the saved x is the 16-bit copy
of the layer's input (the GEMM's operand). Weights: 16-bit (or tf32-rounded) working copies of the
fp32 master, kept until the parameters change (the backend's ``_param_version``, bumped by every
update and assign_), made afresh inside a CUDA graph capture (so a replay re-reads the master).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.activations import Activation
from gpubp.precision import Precision

# CUDA / cuBLAS enum values (library_types.h, cublas_api.h); read from CuPy's bindings when present.
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1

_IN_TYPE = {"tf32": CUDA_R_32F, "bf16": CUDA_R_16BF, "fp16": CUDA_R_16F}
_COMPUTE = {"tf32": CUBLAS_COMPUTE_32F_FAST_TF32, "bf16": CUBLAS_COMPUTE_32F, "fp16": CUBLAS_COMPUTE_32F}
_ONE = np.ones(1, np.float32)  # alpha, beta: host scalars (the handle's default pointer mode), float
_ZERO = np.zeros(1, np.float32)  # as the compute type 32F takes them


def pointer(a: Any) -> int:
    """The device (CuPy) or host (NumPy, for tests) address of ``a``'s first element."""
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)
    return int(ptr) if ptr is not None else int(a.ctypes.data)


def gemm(cublas: Any, handle: Any, a: Any, b: Any, c: Any, kind: str, trans_a: bool = False,
         trans_b: bool = False) -> Any:
    """c = op(a) @ op(b) for C-contiguous row-major a, b (``kind``'s storage: float32 for tf32,
    16-bit for bf16 / fp16) and c float32 (M, N); op(x) = x.T where ``trans_x``. One gemmEx call."""
    if kind not in _IN_TYPE:
        raise ValueError(f"kind: expected tf32, bf16 or fp16, got {kind!r}")
    size = 4 if kind == "tf32" else 2
    for name, x, s in (("a", a, size), ("b", b, size), ("c", c, 4)):
        if x.ndim != 2 or np.dtype(x.dtype).itemsize != s or not x.flags.c_contiguous:
            raise ValueError(f"gemm {name}: expected a C-contiguous 2-D array of {s}-byte elements")
    if np.dtype(c.dtype) != np.float32:
        raise TypeError("gemm c: expected float32")
    m_rows, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k_b, n_cols = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k_b or tuple(c.shape) != (m_rows, n_cols):
        raise ValueError(f"gemm: shapes {a.shape}{'^T' if trans_a else ''} @ {b.shape}{'^T' if trans_b else ''} "
                         f"-> {c.shape} do not match")
    if m_rows == 0 or n_cols == 0:
        return c
    t = _IN_TYPE[kind]
    cublas.gemmEx(
        handle,
        CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
        n_cols, m_rows, k,
        int(_ONE.ctypes.data),
        pointer(b), t, max(1, b.shape[1]),
        pointer(a), t, max(1, a.shape[1]),
        int(_ZERO.ctypes.data),
        pointer(c), CUDA_R_32F, max(1, n_cols),
        _COMPUTE[kind], CUBLAS_GEMM_DEFAULT,
    )
    return c


# --- storage ---------------------------------------------------------------------------------------

_BF16_TYPES: dict[type, type] = {}


def bf16_type(base: type) -> type:
    """The marker subclass of ``base`` (numpy.ndarray or cupy.ndarray) for bf16 bit arrays."""
    t = _BF16_TYPES.get(base)
    if t is None:
        t = _BF16_TYPES[base] = type("Bf16", (base,), {"__doc__": "bfloat16 values as uint16 bit patterns"})
    return t


def is_bf16(x: Any) -> bool:
    return type(x) in _BF16_TYPES.values()


def empty16(xp: Any, shape: tuple, kind: str) -> Any:
    """An uninitialised 16-bit array of ``kind``: float16, or uint16 bits viewed as a :func:`bf16_type`."""
    if kind == "fp16":
        return xp.empty(shape, dtype=np.float16)
    return xp.empty(shape, dtype=np.uint16).view(type=bf16_type(xp.ndarray))


def bf16_to_float32(host: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (a host uint16 array) as float32 values (exact)."""
    return (np.asarray(host).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --- the dense layer ---------------------------------------------------------------------------------


class NativeDense:
    """The native mixed-precision dense layer of one backend (``be``: a CudaBackend, or the simulated
    one in tests): its array module, Numba kernels, launch shape and cuBLAS (``be._blas()``)."""

    def __init__(self, be: Any) -> None:
        from gpubp.backends.numba_cuda import precision as kernels

        self.be = be
        self.k = kernels
        self._copies: dict[Any, tuple[Any, Any]] = {}
        self._version = -1

    # working copies of the weights
    def weights(self, w: Any, kind: str, stream: Any) -> Any:
        """R_g(W) in ``kind``'s storage, from the cache while the parameters are unchanged."""
        be = self.be
        capturing = be._capture is not None
        if self._version != be._param_version:
            self._copies.clear()
            self._version = be._param_version
        key = (id(w), kind)
        hit = self._copies.get(key)
        if hit is not None and hit[0] is w and not capturing:
            return hit[1]
        copy = self.convert(w, kind, stream)
        if not capturing:
            self._copies[key] = (w, copy)
        return copy

    def convert(self, x: Any, kind: str, stream: Any) -> Any:
        """R_g(x) in ``kind``'s storage: tf32-rounded float32, or 16-bit."""
        xp, launch = self.be.xp, self.be._launch
        if kind == "tf32":
            return self.k.round_into(x, xp.empty(x.shape, np.float32), "tf32", stream=stream, **launch)
        return self.k.to16_into(x, empty16(xp, tuple(x.shape), kind), kind, stream=stream, **launch)

    def _gemm(self, a: Any, b: Any, c: Any, kind: str, **kw: Any) -> Any:
        cublas, handle = self.be._blas()
        self.be._gemms += 1
        return gemm(cublas, handle, a, b, c, kind, **kw)

    def forward(self, x: Any, w: Any, b: Any, act: Activation, training: bool, p: Precision,
                stream: Any) -> tuple[Any, tuple]:
        xp, launch, kind = self.be.xp, self.be._launch, p.gemm
        xg = self.convert(x, kind, stream)
        z = xp.empty((x.shape[0], w.shape[1]), dtype=np.float32)
        self._gemm(xg, self.weights(w, kind, stream), z, kind)
        if p.store is None:  # tf32: the float32 epilogue
            keep_z = training and act.saves == "z"
            a = xp.empty_like(z) if keep_z else z
            self.be.nk.bias_activation_forward(z, b, act, a, keep_z, stream=stream, **launch)
            if not training:
                return a, ()
            return a, (xg, {"z": z, "a": a, "": None}[act.saves])
        saves = act.saves if training else ""
        kept = empty16(xp, tuple(z.shape), p.store) if saves else None
        a = self.k.bias_activation_store(z, b, act, z, kept, saves, p.store, stream=stream, **launch)
        return (a, (xg, kept)) if training else (a, ())

    def backward(self, da: Any, saved: tuple, w: Any, act: Activation, dw: Any, db: Any, need_dx: bool,
                 p: Precision, stream: Any) -> Any:
        be, kind = self.be, p.gemm
        xp, launch = be.xp, be._launch
        xg, kept = saved
        if p.store is not None and act.saves:
            dz = xp.empty(da.shape, dtype=np.float32)
            dzg = empty16(xp, tuple(da.shape), kind)
            self.k.activation_backward_store(da, kept, act, dz, dzg, kind, stream=stream, **launch)
        else:
            if act.saves:  # tf32: saved z / a are float32
                z = kept if act.saves == "z" else None
                a = kept if act.saves == "a" else None
                dz = be.nk.activation_backward(da, z, a, act, stream=stream, **launch)
            else:
                dz = da
            dzg = self.convert(dz, kind, stream)
        work = be._scratch(be.nk.bias_grad_work_size(*dz.shape), "bias_grad")
        be.nk.bias_grad(dz, db, stream=stream, work=work, **be._bias_launch)
        self._gemm(xg, dzg, dw, kind, trans_a=True)
        if not need_dx:
            return None
        dx = xp.empty((da.shape[0], w.shape[0]), dtype=np.float32)
        self._gemm(dzg, self.weights(w, kind, stream), dx, kind, trans_b=True)
        if p.store is not None:
            self.k.round_into(dx, dx, p.store, stream=stream, **launch)
        return dx
