"""Losses: value and gradient in one call.

``loss(pred, target) -> (value, dL/dpred)``. ``value`` is a Python float
(accumulated in float64); the gradient has pred's shape and dtype. With
``reduction="mean"`` (default) the loss is averaged as PyTorch does; with
``"sum"`` it is summed.

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

from gpubp._validate import as_float_array, check_finite
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

    def __call__(self, pred: Any, target: Any) -> tuple[float, Any]:
        """Validate, then return ``(value, dL/dpred)``; ``value`` is a Python float.

        ``pred`` may be a NumPy array or an array of a device backend (then the
        gradient lives there too, and reading ``value`` waits for the device).
        """
        backend = backend_of(pred)
        if backend is None or not backend.is_device_array(pred):
            backend = host_backend()
            pred = self._check_pred(pred)
        elif pred.ndim != 2 or pred.shape[0] == 0:
            raise ValueError(f"pred: expected a non-empty 2-D array (N, outputs), got shape {pred.shape}")
        target = self.check_target(backend.to_numpy(target), pred.shape, pred.dtype)
        value, grad = self.compute(pred, backend.asarray(target, target.dtype), backend)
        return float(value), grad

    def compute(self, pred: Any, target: Any, backend: Backend) -> tuple[Any, Any]:
        """``(value, grad)`` from ``backend`` without validation or waiting (for the training loop).

        ``target`` must already have passed :meth:`check_target` and live on the
        backend. ``value`` is whatever the backend returns: a float on the host,
        a one-element device array on a GPU.
        """
        scale = 1.0 / self._count(pred) if self.reduction == "mean" else 1.0
        return self._value_and_grad(backend, pred, target, scale)

    @abstractmethod
    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float) -> tuple[Any, Any]:
        """The backend's one-pass value and gradient of this loss."""

    def correct(self, pred: Any, target: Any) -> tuple[Any, int]:
        """(right predictions, predictions made) for a classifying loss; ``pred`` and
        ``target`` are arrays of one backend and the count stays there until read."""
        raise TypeError(f"{type(self).__name__} does not classify: it has no accuracy")

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

    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float) -> tuple[Any, Any]:
        return backend.mse(pred, target, scale)


class CrossEntropy(Loss):
    """Softmax cross-entropy over logits (N, C), as torch.nn.CrossEntropyLoss.

    Targets are integer class labels (N,) in [0, C) or class probabilities
    (N, C). Computed through log-sum-exp, so finite for logits of any finite size.
    The mean is over the N samples.
    """

    name = "cross_entropy"
    classifies = True

    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float) -> tuple[Any, Any]:
        return backend.cross_entropy(pred, target, scale)

    def correct(self, pred: Any, target: Any) -> tuple[Any, int]:
        """argmax of each row against the label (or the most probable class)."""
        labels = target if target.ndim == 1 else target.argmax(axis=1)
        return (pred.argmax(axis=1) == labels).sum(), pred.shape[0]

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

    def _value_and_grad(self, backend: Backend, pred: Any, target: Any, scale: float) -> tuple[Any, Any]:
        return backend.bce_with_logits(pred, target, scale)

    def correct(self, pred: Any, target: Any) -> tuple[Any, int]:
        """Each element: logit > 0 against target >= 0.5."""
        return ((pred > 0) == (target >= 0.5)).sum(), pred.size

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
