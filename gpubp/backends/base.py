"""The backend interface: everything a layer, a loss, an optimizer or the model may ask of a device.

Layers, losses, optimizers and the model are written once against :class:`Backend`;
a backend decides where arrays live and which code runs the maths. The
implementations:

| backend                          | arrays            | dense layers                     | memory-bound work        |
|----------------------------------|-------------------|----------------------------------|--------------------------|
| ``numpy_ref.NumpyBackend``       | NumPy (host)      | numpy.matmul (the spec)          | NumPy (the spec)         |
| ``cpu.CpuBackend``               | NumPy (host)      | BLAS + fused Numba epilogues     | Numba CPU kernels        |
| ``cuda.CudaBackend``             | CuPy (one GPU)    | cuBLAS + Numba, or fused CUDA C  | Numba CUDA kernels       |
| ``cudasim.SimulatedCudaBackend`` | NumPy (host)      | numpy.matmul + Numba simulator   | Numba CUDA simulator     |

Shapes: x (N, in), W (in, out), b (out,), z = x @ W + b and a = f(z) (N, out).
Arrays passed in are the backend's own (C-contiguous, float32 or float64) unless a
method says otherwise. ``tests/test_conformance.py`` runs every method of every
available backend against the float64 spec.

The abstract methods, by group (everything else is derived from them in this class):

| group                 | abstract methods                                               | derived here                    |
|-----------------------|----------------------------------------------------------------|---------------------------------|
| arrays                | ``is_device_array``, ``asarray``, ``to_numpy``, ``full``,      | ``zeros``                       |
|                       | ``assign_``, ``take_rows``                                     |                                 |
| dense layer           | ``dense_forward``, ``dense_backward``                          |                                 |
| dropout               | ``dropout_forward``, ``dropout_backward``                      |                                 |
| losses                | ``loss`` (any :class:`gpubp.losses.LossRule`)                  |                                 |
| optimizer updates     | ``update`` (any :class:`gpubp.optim.rule.Rule`),               |                                 |
|                       | ``flag_nonfinite_``                                            |                                 |
| reductions, clipping  | ``reduce_into`` ("sumsq", "maxabs"), ``scale_``, ``clip_scale_`` | ``sum_of_squares_into``,      |
|                       |                                                                | ``sum_of_squares``, ``max_abs``,|
|                       |                                                                | ``all_finite``                  |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp import step_plan
from gpubp.activations import Activation

if TYPE_CHECKING:  # the optimizer and loss rows import this module
    from gpubp.backends.rows import Hyper, LossRule, Rule
    from gpubp.precision import Precision

Array = Any  # an array of the backend's array module (numpy.ndarray, cupy.ndarray)
Value = Any  # a loss value: a float on the host, a 0-d float64 device array on a GPU


#: The primitives a step plan records (gpubp.step_plan): every abstract method that computes or
#: writes; ``to_numpy`` (a host read) is refused while a step is captured.
RECORDED = ("asarray", "full", "assign_", "take_rows", "dense_forward", "dense_backward", "dropout_forward",
            "dropout_backward", "loss", "update", "flag_nonfinite_", "reduce_into", "scale_", "clip_scale_")


def _no_host_read(fn: Any) -> Any:
    def to_numpy(self: Any, x: Any) -> np.ndarray:
        plan = step_plan.ACTIVE[0]
        if plan is not None and not plan.depth and (plan.capturing or plan.checked):
            raise step_plan.CaptureError("the step reads a device value on the host (to_numpy)")
        return fn(self, x)

    to_numpy.__doc__, to_numpy.__wrapped_primitive__ = fn.__doc__, fn
    return to_numpy


class Backend(ABC):
    """One device's arrays and maths. Every method below is implemented by every backend."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in RECORDED:  # each implementation, wherever a subclass defines one
            fn = cls.__dict__.get(name)
            if fn is not None and not hasattr(fn, "__wrapped_primitive__"):
                setattr(cls, name, step_plan.recordable(fn))
        fn = cls.__dict__.get("to_numpy")
        if fn is not None and not hasattr(fn, "__wrapped_primitive__"):
            cls.to_numpy = _no_host_read(fn)

    #: short name: "numpy", "cuda", "cudasim"
    name: str = ""
    #: the array module of this backend's arrays (numpy or cupy)
    xp: Any = np

    # --- array helpers ------------------------------------------------------------------

    @abstractmethod
    def is_device_array(self, x: Any) -> bool:
        """Whether ``x`` already lives on this backend's device, away from the host
        (validated there, taken without a copy when dtype and layout fit). Never for NumPy."""

    @abstractmethod
    def asarray(self, x: Any, dtype: Any) -> Array:
        """``x`` as a C-contiguous array of ``dtype`` on this backend (copies only when needed)."""

    @abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """A host copy of ``x`` (waits for the device); never a view of the backend's array."""

    @abstractmethod
    def full(self, shape: Any, value: float, dtype: Any) -> Array:
        """A new array of ``shape`` (an int for 1-D, or a tuple), each element ``value``."""

    @abstractmethod
    def assign_(self, dst: Array, src: np.ndarray) -> None:
        """Copy the host array ``src`` (``dst.size`` elements, any shape) into ``dst``."""

    @abstractmethod
    def take_rows(self, data: Array, index: slice | np.ndarray) -> Array:
        """Rows ``index`` (a slice, or a host int64 array) of ``data`` (an array of this backend, or a
        host array that is then copied in), as a C-contiguous array of this backend."""

    # --- dense layer: forward and backward as a pair --------------------------------------

    # ``precision``: None (or fp32: the float32 code path, bit for bit), or a
    # gpubp.precision.Precision of a float32 model, whose rounding points (R_g: GEMM inputs to
    # ``precision.gemm``, R_s: stored values to ``precision.store``, gpubp.precision.round_to)
    # numpy_ref defines; every backend rounds at the same points.

    @abstractmethod
    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool,
                      precision: Precision | None = None) -> tuple[Array, tuple]:
        """a = f(x @ W + b) (N, out). Returns ``(a, saved)``: what :meth:`dense_backward`
        needs, ``(x, z or a or a mask)``, or ``()`` when not training. Under a precision:
        z = R_g(x) @ R_g(W) (float32 accumulation), a = f(z + b) in float32, returned as R_s(a),
        saved (R_g(x), R_s(z or a or a mask))."""

    @abstractmethod
    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool,
        precision: Precision | None = None,
    ) -> Array | None:
        """Given da = dL/da (N, out): dz = da * f'; dW = x^T dz written into ``dw`` (=, not +=);
        db = sum_rows dz written into ``db``; returns dx = dz W^T (N, in) when ``need_dx``, else None.
        Under a precision: dz, db in float32; dW = R_g(x)^T @ R_g(dz) (float32 accumulation, into the
        float32 ``dw``); dx = R_s(R_g(dz) @ R_g(W)^T)."""

    # --- dropout (gpubp.layers.Dropout): the mask is gpubp._random.dropout_keep's, bit for bit ---

    @abstractmethod
    def dropout_forward(self, x: Array, key: int, p: float,
                        precision: Precision | None = None) -> tuple[Array, Array]:
        """y = x * keep / (1 - p) with keep = gpubp._random.dropout_keep(xp, key, x.shape, p); returns (y, keep).
        Under a precision: y = R_s(x * keep / (1 - p))."""

    @abstractmethod
    def dropout_backward(self, dy: Array, keep: Array, p: float, precision: Precision | None = None) -> Array:
        """dx = dy * keep / (1 - p); under a precision R_s of it."""

    # --- losses: value and gradient in one call, any loss row (gpubp.losses) --------------------
    # ``scale`` is 1/count for reduction="mean" and 1 for "sum"; the value is reduced in float64.
    # ``weight``: None (the unweighted kernels), or per-row weights w (N,), a float64 array of this
    # backend (w_i >= 0, finite). Row i's value terms count w_i times (w_i l_i, in float64) and its
    # gradient is scaled by dtype(g w_i), g the unweighted gradient factor (``rule.grad_factor``
    # x scale: 2 scale for MSE, scale otherwise), computed in float64 and rounded once: with every
    # w_i = 1 the value and gradient are those of weight=None, bit for bit. The caller picks
    # ``scale`` (gpubp.losses: the weighted mean has scale = 1 / (per-row count x sum_i w_i)).

    @abstractmethod
    def loss(self, rule: LossRule, pred: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[Value, Array]:
        """``(value, dL/dpred)`` of the loss ``rule`` (rows weighted by ``weight``): ``rule.spec``'s maths.
        ``target`` as the loss's ``check_target`` left it (int64 labels (N,) for cross-entropy, else
        pred's shape and dtype). Compiled backends run ``rule.family``'s kernel: an element-wise
        row's scalar term in one generic chunked kernel, or the softmax rows."""

    # --- optimizer updates over flat 1-D runs of the arena (the maths: gpubp.optim's rules) ----
    # ``guard``: None, or a 1-element int64 array of this backend; while guard[0] != 0 an update
    # changes nothing (parameters and state), and the host does not wait to find out.

    @abstractmethod
    def update(self, rule: Rule, p: Array, g: Array, state: tuple, hp: Hyper, guard: Array | None = None) -> None:
        """One step of optimizer ``rule`` in place over a flat run: parameters ``p``, gradients ``g``
        (only read), ``state`` the rule's buffers in ``rule.state`` order (None where ``rule.uses``
        says unused), ``hp`` the step's packed hyper-parameters (``rule.pack``). The spec is
        ``rule.spec``; compiled backends run ``rule.scalar`` per element, bit for bit the same."""

    @abstractmethod
    def flag_nonfinite_(self, value: Value, g: Array, flag: Array, tag: int) -> None:
        """flag[0] = tag where flag[0] == 0 and the loss ``value`` or any element of ``g`` is not
        finite (``flag`` a 1-element int64 array of this backend); no wait."""

    # --- reductions over flat runs (fixed order: same bits every run) -------------------------

    @abstractmethod
    def reduce_into(self, g: Array, out: Array, op: str, *, accumulate: bool = False) -> None:
        """out[0] (a float64 array of this backend) = the reduction ``op`` of g, combined with out[0]
        when ``accumulate`` (sum for "sumsq", NaN-propagating max for "maxabs"); no wait.
        ``op``: "sumsq" (sum g_i^2 in float64) or "maxabs" (max |g_i|, NaN if any is NaN; 0 when empty)."""

    @abstractmethod
    def scale_(self, g: Array, c: float) -> None:
        """g *= c in place."""

    @abstractmethod
    def clip_scale_(self, g: Array, total_sq: Array, max_norm: float) -> None:
        """g *= c where c = max_norm / (sqrt(total_sq[0]) + 1e-6) when c < 1; no wait."""

    # --- derived: written once here from the methods above ------------------------------------

    def zeros(self, shape: Any, dtype: Any) -> Array:
        """A new array of zeros (:meth:`full`)."""
        return self.full(shape, 0.0, dtype)

    def sum_of_squares_into(self, g: Array, out: Array, *, accumulate: bool = False) -> None:
        """out[0] (a float64 array of this backend) = (out[0] if accumulate else 0) + sum g_i^2; no wait."""
        self.reduce_into(g, out, "sumsq", accumulate=accumulate)

    def _reduce(self, g: Array, op: str) -> float:
        out = self.full(1, 0.0, np.float64)
        self.reduce_into(g.reshape(-1), out, op)
        return float(self.to_numpy(out)[0])

    def sum_of_squares(self, g: Array) -> float:
        """sum g_i^2 in float64, on the host (waits)."""
        return self._reduce(g, "sumsq")

    def max_abs(self, g: Array) -> float:
        """max |g_i| (0.0 for an empty array, NaN if any is NaN), on the host (waits)."""
        return self._reduce(g, "maxabs")

    def all_finite(self, x: Array) -> bool:
        """Whether every element of ``x`` is finite (waits): max |x_i| is finite."""
        return bool(np.isfinite(self.max_abs(x)))
