"""Losses: value and gradient in one call.

``loss(pred, target) -> (value, dL/dpred)``. ``value`` is a Python float
(accumulated in float64); the gradient has pred's shape and dtype. With
``reduction="mean"`` (default) the loss is averaged as PyTorch does; with
``"sum"`` it is summed.

Row weights (``sample_weight``, or ``weight`` in :meth:`Loss.compute`): row i's terms count
w_i times, and the mean is scikit-learn's weighted average over rows,
L = sum_i w_i l_i / sum_i w_i, with l_i the row's loss (for MSE and BCEWithLogits the mean of
its C elements); ``"sum"`` gives sum_i w_i l_i (l_i the sum of the row's elements). With
every w_i = 1 the value and gradient are the unweighted ones, bit for bit.

| loss          | target                                   | mean over            |
|---------------|------------------------------------------|----------------------|
| MSE           | same shape as pred (or (N,) for (N, 1))  | every element        |
| CrossEntropy  | labels (N,) in [0, C), or probs (N, C)   | rows (samples)       |
| BCEWithLogits | same shape as pred, values in [0, 1]     | every element        |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gpubp._validate import as_float_array, check_finite, sample_weights, weight_sum
from gpubp.activations import sigmoid
from gpubp.backends import backend_of, host_backend
from gpubp.backends.base import Backend

REDUCTIONS = ("mean", "sum")


class Loss(ABC):
    """Base class: validates inputs, then calls the backend's fused value+gradient.

    A subclass names itself (``name``), says whether it classifies (then
    :meth:`correct` counts right predictions) and calls its backend method in
    :meth:`_value_and_grad`.
    """

    name = ""
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
        all zero): the weighted loss of the module docstring.
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
            return self._value_and_grad(backend, pred, target, self.scale(pred, rows))
        return self._value_and_grad(backend, pred, target, self.weighted_scale(pred, weight_total), weight)

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

    @abstractmethod
    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float,
                        weight: Any = None) -> tuple[Any, Any]:
        """The backend's one-pass value and gradient of this loss (rows weighted by ``weight``)."""

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


class MSE(Loss):
    """Mean squared error, as torch.nn.MSELoss: mean over all elements of (pred - target)^2."""

    name = "mse"

    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float,
                        weight: Any = None) -> tuple[Any, Any]:
        return backend.mse(pred, target, scale, weight)


class CrossEntropy(Loss):
    """Softmax cross-entropy over logits (N, C), as torch.nn.CrossEntropyLoss.

    Targets are integer class labels (N,) in [0, C) or class probabilities
    (N, C). Computed through log-sum-exp, so finite for logits of any finite size.
    The mean is over the N samples.
    """

    name = "cross_entropy"
    classifies = True

    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float,
                        weight: Any = None) -> tuple[Any, Any]:
        return backend.cross_entropy(pred, target, scale, weight)

    def correct(self, pred: Any, target: Any, weight: Any = None) -> tuple[Any, Any]:
        """argmax of each row against the label (or the most probable class)."""
        labels = target if target.ndim == 1 else target.argmax(axis=1)
        hits = pred.argmax(axis=1) == labels
        if weight is None:
            return hits.sum(), pred.shape[0]
        return (hits * weight).sum(), weight.sum()

    def labels(self, target: np.ndarray, hard: bool = False) -> np.ndarray:
        """The label, or the most probable class of a probability target (first of ties)."""
        if hard and target.ndim != 1:
            raise ValueError("needs integer class labels (N,) as y; probability targets (N, C) have no single class")
        return np.asarray(target if target.ndim == 1 else target.argmax(axis=1), dtype=np.int64)

    def predicted_labels(self, pred: np.ndarray) -> np.ndarray:
        return np.asarray(pred.argmax(axis=1), dtype=np.int64)

    def probabilities(self, pred: np.ndarray) -> np.ndarray:
        """softmax over each row, in float64: e^(z - max) / sum e^(z - max)."""
        z = np.asarray(pred, dtype=np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def _count(self, pred: np.ndarray) -> int:
        return pred.shape[0]

    def check_target(self, target: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        arr = np.asarray(target)
        if arr.ndim == 1:
            if arr.dtype.kind not in "iu":
                raise TypeError(
                    f"target: expected integer class labels (N,) or probabilities (N, C), got a 1-D {arr.dtype} array"
                )
            if arr.shape[0] != shape[0]:
                raise ValueError(f"target: expected {shape[0]} labels to match pred, got {arr.shape[0]}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= shape[1]:
                bad = lo if lo < 0 else hi
                raise ValueError(f"target: class labels must lie in [0, {shape[1]}), got {bad}")
            return np.ascontiguousarray(arr, dtype=np.int64)
        return super().check_target(target, shape, dtype)


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits, as torch.nn.BCEWithLogitsLoss.

    Per element max(x, 0) - x t + log(1 + exp(-|x|)), stable for any finite x;
    targets in [0, 1], same shape as the logits.
    """

    name = "bce_with_logits"
    classifies = True

    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float,
                        weight: Any = None) -> tuple[Any, Any]:
        return backend.bce_with_logits(pred, target, scale, weight)

    def correct(self, pred: Any, target: Any, weight: Any = None) -> tuple[Any, Any]:
        """Each element: logit > 0 against target >= 0.5."""
        hits = (pred > 0) == (target >= 0.5)
        if weight is None:
            return hits.sum(), pred.size
        return (hits * weight[:, None]).sum(), weight.sum() * pred.shape[1]

    def labels(self, target: np.ndarray, hard: bool = False) -> np.ndarray:
        """target >= 0.5 as 0/1, for one output column (binary); several columns are several labels per row.
        ``hard``: the targets must be exactly 0 or 1."""
        self._one_column(target.shape, "the targets")
        if hard and not ((target == 0) | (target == 1)).all():
            raise ValueError("needs targets of exactly 0 or 1 (binary labels); soft targets have no single class")
        return (target[:, 0] >= 0.5).astype(np.int64)

    def predicted_labels(self, pred: np.ndarray) -> np.ndarray:
        self._one_column(pred.shape, "the outputs")
        return (pred[:, 0] > 0).astype(np.int64)

    def probabilities(self, pred: np.ndarray) -> np.ndarray:
        """sigmoid of each output, in float64 (the probability of label 1 in each column)."""
        return sigmoid(np.asarray(pred, dtype=np.float64))

    @staticmethod
    def _one_column(shape: tuple[int, ...], what: str) -> None:
        if len(shape) != 2 or shape[1] != 1:
            raise ValueError(f"{what}: class labels of BCEWithLogits need one output column (binary), got shape "
                             f"{tuple(shape)} (several columns are independent labels)")

    def check_target(self, target: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        t = super().check_target(target, shape, dtype)
        if t.min() < 0 or t.max() > 1:
            raise ValueError(f"target: expected values in [0, 1], got range [{t.min()}, {t.max()}]")
        return t


_BY_NAME: dict[str, type[Loss]] = {
    "mse": MSE,
    "cross_entropy": CrossEntropy,
    "bce_with_logits": BCEWithLogits,
}
NAMES: tuple[str, ...] = tuple(_BY_NAME)


def get(loss: str | Loss, **kwargs: Any) -> Loss:
    """Resolve a loss name (``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"``) or instance."""
    if isinstance(loss, Loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss: expected a name or a Loss, got {type(loss).__name__}")
    key = loss.strip().lower().replace("-", "_")
    if key not in _BY_NAME:
        raise ValueError(f"loss: unknown name {loss!r}; expected one of {', '.join(NAMES)}")
    return _BY_NAME[key](**kwargs)
