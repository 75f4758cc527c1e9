"""The backend interface: everything a layer, a loss, an optimizer or the model may ask of a device.

Layers, losses, optimizers and the model are written once against :class:`Backend`;
a backend decides where arrays live and which code runs the maths. The
implementations:

| backend                          | arrays            | dense layers                     | memory-bound work        |
|----------------------------------|-------------------|----------------------------------|--------------------------|
| ``numpy_ref.NumpyBackend``       | NumPy (host)      | numpy.matmul (the spec)          | NumPy (the spec)         |
| ``cuda.CudaBackend``             | CuPy (one GPU)    | cuBLAS + Numba, or fused CUDA C  | Numba CUDA kernels       |
| ``cudasim.SimulatedCudaBackend`` | NumPy (host)      | numpy.matmul + Numba simulator   | Numba CUDA simulator     |

Shapes: x (N, in), W (in, out), b (out,), z = x @ W + b and a = f(z) (N, out).
Arrays passed in are the backend's own (C-contiguous, float32 or float64) unless a
method says otherwise. ``tests/test_conformance.py`` runs every method of every
available backend against the float64 spec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gpubp.activations import Activation

Array = Any  # an array of the backend's array module (numpy.ndarray, cupy.ndarray)
Value = Any  # a loss value: a float on the host, a 0-d float64 device array on a GPU


class Backend(ABC):
    """One device's arrays and maths. Every method below is implemented by every backend."""

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
    def zeros(self, shape: Any, dtype: Any) -> Array:
        """A new array of zeros."""

    @abstractmethod
    def full(self, n: int, value: float, dtype: Any) -> Array:
        """A new 1-D array of ``n`` elements, each ``value``."""

    @abstractmethod
    def assign_(self, dst: Array, src: np.ndarray) -> None:
        """Copy the host array ``src`` (``dst.size`` elements, any shape) into ``dst``."""

    @abstractmethod
    def take_rows(self, data: Array, index: slice | np.ndarray) -> Array:
        """Rows ``index`` (a slice, or a host int64 array) of ``data`` (an array of this backend, or a
        host array that is then copied in), as a C-contiguous array of this backend."""

    @abstractmethod
    def all_finite(self, x: Array) -> bool:
        """Whether every element of ``x`` is finite (waits for the answer)."""

    # --- dense layer: forward and backward as a pair --------------------------------------

    @abstractmethod
    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool) -> tuple[Array, tuple]:
        """a = f(x @ W + b) (N, out). Returns ``(a, saved)``: what :meth:`dense_backward`
        needs, ``(x, z or a or a mask)``, or ``()`` when not training."""

    @abstractmethod
    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool
    ) -> Array | None:
        """Given da = dL/da (N, out): dz = da * f'; dW = x^T dz written into ``dw`` (=, not +=);
        db = sum_rows dz written into ``db``; returns dx = dz W^T (N, in) when ``need_dx``, else None."""

    # --- dropout (gpubp.layers.Dropout): the mask is gpubp._random.dropout_keep's, bit for bit ---

    @abstractmethod
    def dropout_forward(self, x: Array, key: int, p: float) -> tuple[Array, Array]:
        """y = x * keep / (1 - p) with keep = gpubp._random.dropout_keep(xp, key, x.shape, p); returns (y, keep)."""

    @abstractmethod
    def dropout_backward(self, dy: Array, keep: Array, p: float) -> Array:
        """dx = dy * keep / (1 - p)."""

    # --- losses: value and gradient in one call --------------------------------------------
    # ``scale`` is 1/count for reduction="mean" and 1 for "sum"; the value is reduced in float64.
    # ``weight``: None (the unweighted kernels), or per-row weights w (N,), a float64 array of this
    # backend (w_i >= 0, finite). Row i's value terms count w_i times (w_i l_i, in float64) and its
    # gradient is scaled by dtype(g w_i), g the unweighted gradient factor (2 scale for MSE, scale
    # otherwise), computed in float64 and rounded once: with every w_i = 1 the value and gradient
    # are those of weight=None, bit for bit. The caller picks ``scale`` (gpubp.losses: the weighted
    # mean has scale = 1 / (per-row count x sum_i w_i)).

    @abstractmethod
    def mse(self, pred: Array, target: Array, scale: float, weight: Array | None = None) -> tuple[Value, Array]:
        """L = scale * sum_i w_i sum_j (p_ij - t_ij)^2;  dL/dp_ij = 2 scale w_i (p_ij - t_ij)."""

    @abstractmethod
    def cross_entropy(self, logits: Array, target: Array, scale: float,
                      weight: Array | None = None) -> tuple[Value, Array]:
        """Softmax cross-entropy over rows, row i weighted by w_i; ``target`` int64 labels (N,) or
        probabilities (N, C)."""

    @abstractmethod
    def bce_with_logits(self, logits: Array, target: Array, scale: float,
                        weight: Array | None = None) -> tuple[Value, Array]:
        """Elementwise max(x, 0) - x t + log(1 + e^-|x|), row i weighted by w_i;
        dL/dx_ij = scale w_i (sigmoid(x_ij) - t_ij)."""

    # --- optimizer updates over flat 1-D runs of the arena (see numpy_optim for the maths) ----
    # ``guard``: None, or a 1-element int64 array of this backend; while guard[0] != 0 an update
    # changes nothing (parameters and state), and the host does not wait to find out.

    @abstractmethod
    def sgd_update(self, p: Array, g: Array, momentum_buf: Array | None, *, lr: float, momentum: float,
                   dampening: float, nesterov: bool, weight_decay: float, first_step: bool, guard: Array | None = None) -> None:
        """SGD with momentum, dampening, Nesterov and L2 weight decay, in place on ``p``."""

    @abstractmethod
    def adam_update(self, p: Array, g: Array, exp_avg: Array, exp_avg_sq: Array, max_exp_avg_sq: Array | None, *,
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
                    amsgrad: bool, step: int, guard: Array | None = None) -> None:
        """Adam (decoupled=False) or AdamW (decoupled=True), optionally AMSGrad, in place."""

    @abstractmethod
    def rmsprop_update(self, p: Array, g: Array, square_avg: Array, grad_avg: Array | None,
                       momentum_buf: Array | None, *, lr: float, alpha: float, eps: float, weight_decay: float,
                       momentum: float, centered: bool, guard: Array | None = None) -> None:
        """RMSprop, optionally centred and with momentum, in place."""

    @abstractmethod
    def adagrad_update(self, p: Array, g: Array, state_sum: Array, *, lr: float, lr_decay: float,
                       weight_decay: float, eps: float, step: int, guard: Array | None = None) -> None:
        """Adagrad with lr decay and L2 weight decay, in place."""

    @abstractmethod
    def flag_nonfinite_(self, value: Value, g: Array, flag: Array, tag: int) -> None:
        """flag[0] = tag where flag[0] == 0 and the loss ``value`` or any element of ``g`` is not
        finite (``flag`` a 1-element int64 array of this backend); no wait."""

    # --- reductions over flat runs (fixed order: same bits every run) -------------------------

    @abstractmethod
    def sum_of_squares(self, g: Array) -> float:
        """sum g_i^2 in float64, on the host (waits)."""

    @abstractmethod
    def max_abs(self, g: Array) -> float:
        """max |g_i| (waits)."""

    @abstractmethod
    def scale_(self, g: Array, c: float) -> None:
        """g *= c in place."""

    @abstractmethod
    def sum_of_squares_into(self, g: Array, out: Array, *, accumulate: bool = False) -> None:
        """out[0] (a float64 array of this backend) = (out[0] if accumulate else 0) + sum g_i^2; no wait."""

    @abstractmethod
    def clip_scale_(self, g: Array, total_sq: Array, max_norm: float) -> None:
        """g *= c where c = max_norm / (sqrt(total_sq[0]) + 1e-6) when c < 1; no wait."""
