"""What every loss row shares: the :class:`LossRule` bundle a backend runs, the :class:`Loss` base
class (validation, scale, the classification helpers' defaults), and the spec's row-weight factor.

A loss is one row, in its own file (``mse.py``, ``cross_entropy.py``, ``bce_with_logits.py``):
its :class:`Loss` subclass, and the :class:`LossRule` it holds as ``rule``:

* ``spec(pred, target, scale, weight=None) -> (value, grad)``: the NumPy reference (the spec), the
  value a Python float accumulated in float64, the gradient in pred's dtype.
* ``family``: which kernel family a compiled backend runs it with. ``"elementwise"``: one generic
  chunked kernel per backend around the row's scalar term (adding such a loss is one row file);
  ``"softmax"``: the row-wise softmax kernels (cross-entropy), written for that family.
* ``scalar(ops) -> term`` (element-wise rows): ``term(p, t, g) -> (gradient element, value term)``,
  plain Python that ``numba.njit`` and ``numba.cuda.jit(device=True)`` compile too (the simulator
  runs it as it is). ``g`` is the gradient factor in the data dtype, dtype(``grad_factor`` x scale
  [x w_i]); the value term is a float64 (``ops.wide``). ``ops`` is a build of
  :mod:`gpubp.backends.scalar_math` (``ops.cst``, ``ops.sigmoid``, ``ops.wide``).
* ``torch``: the PyTorch twin, a ``torch.nn.functional`` name and its keyword arguments
  (:meth:`LossRule.torch_loss`).

A backend runs every row with its one primitive ``Backend.loss(rule, pred, target, scale, weight)``.
Every expression of a scalar term is in the order of its spec, operation by operation.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from typing import Any

import numpy as np

from gpubp import step_plan
from gpubp._validate import as_float_array, check_finite, sample_weights, weight_sum
from gpubp.backends import backend_of, host_backend
from gpubp.backends.base import Backend
from gpubp.backends.rows import FAMILIES, LossRule

__all__ = ["Loss", "LossRule", "REDUCTIONS", "FAMILIES", "row_factor"]

REDUCTIONS = ("mean", "sum")


def row_factor(g: float, weight: np.ndarray, dtype: Any) -> np.ndarray:
    """dtype(g w_i) as a column (N, 1): the spec's gradient factor of each weighted row (g in float64)."""
    return (g * weight).astype(dtype)[:, None]


class Loss(ABC):
    """Base class: validates inputs, then calls the backend's fused value+gradient (``Backend.loss``).

    A subclass names itself (``name``), holds its maths (``rule``, a :class:`LossRule`) and
    says whether it classifies (then :meth:`correct` counts right predictions).
    """

    name = ""
    rule: LossRule
    classifies = False

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def __call__(self, pred: Any, target: Any, sample_weight: Any = None) -> tuple[float, Any]:
        """Validate, then return ``(value, dL/dpred)``; ``value`` is a Python float.

        ``pred`` may be a NumPy array or an array of a device backend (then the
        gradient lives there too, and reading ``value`` waits for the device).
        ``sample_weight``: None, or one weight per row (1-D, length N, finite, >= 0, not
        all zero): the weighted loss of :mod:`gpubp.losses`' docstring.
        """
        backend = backend_of(pred)
        if backend is None or not backend.is_device_array(pred):
            backend = host_backend()
            pred = self._check_pred(pred)
        elif pred.ndim != 2 or pred.shape[0] == 0:
            raise ValueError(f"pred: expected a non-empty 2-D array (N, outputs), got shape {pred.shape}")
        target = self.check_target(backend.to_numpy(target), pred.shape, pred.dtype)
        weight, total = None, None
        if sample_weight is not None:
            w = sample_weights(backend.to_numpy(sample_weight), pred.shape[0])
            weight, total = backend.asarray(w, np.float64), weight_sum(w)
        value, grad = self.compute(pred, backend.asarray(target, target.dtype), backend, weight, total)
        return float(value), grad

    def compute(self, pred: Any, target: Any, backend: Backend, weight: Any = None,
                weight_total: float | None = None, rows: int | None = None) -> tuple[Any, Any]:
        """``(value, grad)`` from ``backend`` without validation or waiting (for the training loop).

        ``target`` must already have passed :meth:`check_target` and live on the
        backend. ``value`` is whatever the backend returns: a float on the host,
        a one-element device array on a GPU. ``weight``: None (the unweighted kernels), or
        row weights (N,) as a float64 array of the backend, with ``weight_total`` their sum
        (the caller's, on the host): see :meth:`weighted_scale`. ``rows``: pred holds some of
        the rows of a batch of ``rows`` rows (a rank's share, a micro-batch), whose mean the
        unweighted loss is a part of (see :meth:`scale`); None: pred's own rows.
        """
        if weight is None:
            return backend.loss(self.rule, pred, target, self.scale(pred, rows))
        # the weight sum changes per step: a recorded step recomputes the scale per replay
        scale = step_plan.value(lambda: self.weighted_scale(pred, step_plan.get(weight_total)), "loss scale")
        return backend.loss(self.rule, pred, target, scale, weight)

    def scale(self, pred: Any, rows: int | None = None) -> float:
        """The factor of the unweighted loss of ``pred``'s rows as part of a batch of ``rows`` rows
        (None: pred's own): 1 / (elements per row x rows) for "mean", 1 for "sum". The same
        float for any split of the batch, so parts summed give the whole batch's loss."""
        if self.reduction != "mean":
            return 1.0
        if rows is None:
            return 1.0 / self._count(pred)
        return 1.0 / (self._count(pred) // pred.shape[0] * rows)  # the same float as 1 / count for pred's rows

    def weighted_scale(self, pred: Any, weight_total: float) -> float:
        """The scale of the weighted loss of rows whose weights sum to ``weight_total``:
        1 / (elements per row x weight_total) for "mean" (0 when the weights sum to 0: such
        rows count for nothing), 1 for "sum". Weights of 1 give the unweighted scale exactly."""
        if self.reduction == "sum":
            return 1.0
        if not weight_total > 0:
            return 0.0
        return 1.0 / (self._count(pred) // pred.shape[0] * weight_total)

    def torch_loss(self) -> Callable:
        """This loss in PyTorch (its rule's twin, with this reduction): ``fn(input, target)``."""
        return self.rule.torch_loss(self.reduction)

    def correct(self, pred: Any, target: Any, weight: Any = None) -> tuple[Any, Any]:
        """(right predictions, predictions made) for a classifying loss; ``pred`` and
        ``target`` are arrays of one backend and the count stays there until read.
        ``weight`` (row weights of that backend, float64): each prediction of row i counts
        w_i; the second number is then the weight of the predictions made (a float)."""
        raise TypeError(f"{type(self).__name__} does not classify: it has no accuracy")

    def labels(self, target: np.ndarray, hard: bool = False) -> np.ndarray:
        """The class of each row (N,) int64, from validated targets on the host (metrics); ``hard``:
        only where the target is one class, not a distribution over classes (class_weight)."""
        raise TypeError(f"{type(self).__name__} does not classify: its targets have no classes")

    def predicted_labels(self, pred: np.ndarray) -> np.ndarray:
        """The class each row of outputs (N, C) predicts, (N,) int64, on the host."""
        raise TypeError(f"{type(self).__name__} does not classify: its outputs predict no classes")

    def probabilities(self, pred: np.ndarray) -> np.ndarray:
        """Class probabilities from outputs (N, C) on the host, in float64 (predict_proba)."""
        raise ValueError(f"{type(self).__name__} does not classify: its outputs are values, not probabilities "
                         f"(a model for regression has no predict_proba)")

    def _check_pred(self, pred: Any) -> np.ndarray:
        if not isinstance(pred, np.ndarray) or pred.dtype.kind != "f":
            pred = as_float_array(pred, "pred", np.float64)
        if pred.ndim != 2 or pred.shape[0] == 0:
            raise ValueError(f"pred: expected a non-empty 2-D array (N, outputs), got shape {pred.shape}")
        return np.ascontiguousarray(pred)

    def _count(self, pred: np.ndarray) -> int:
        return pred.size

    def check_target(self, target: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Validate ``target`` for predictions of ``shape`` and return it ready for the kernel."""
        t = as_float_array(target, "target", dtype)
        if t.ndim == 1 and len(shape) == 2 and shape[1] == 1:
            t = t.reshape(-1, 1)  # (N,) targets for a single output: made explicit, no broadcasting
        if t.shape != tuple(shape):
            raise ValueError(f"target: expected shape {tuple(shape)} to match pred, got {t.shape}")
        check_finite(t, "target")
        return t

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"
