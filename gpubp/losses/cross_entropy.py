"""CrossEntropy: the loss, its NumPy spec and its PyTorch twin (one row). Compiled backends run it
with their row-wise softmax kernels (the ``"softmax"`` family), not a scalar term."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.losses.base import Loss, LossRule, row_factor

__all__ = ["CrossEntropy"]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax(z) row-wise via log-sum-exp: z - max - log sum e^(z - max); finite for any finite z."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def spec(logits: np.ndarray, target: np.ndarray, scale: float,
         weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Softmax + negative log-likelihood over rows of logits (N, C), rows weighted by w (w = 1 unweighted).

    Integer labels y (N,):       L = scale * sum_n w_n (logsumexp(z_n) - z_n[y_n])
                                 dL/dz_n = dtype(scale w_n) (softmax(z_n) - onehot(y_n))
    Probability targets t (N, C): L = -scale * sum_n w_n sum_c t_nc log softmax(z)_nc
                                 dL/dz_n = dtype(scale w_n) (softmax(z_n) sum_c t_nc - t_n)
    """
    logp = _log_softmax(logits)
    p = np.exp(logp)
    if target.ndim == 1:
        rows = np.arange(logits.shape[0])
        picked = logp[rows, target]
        if weight is None:
            value = -float(np.sum(picked, dtype=np.float64) * scale)
        else:
            value = -float(np.sum(picked * weight) * scale)
        grad = p
        grad[rows, target] -= 1
    else:
        terms = target * logp
        if weight is None:
            value = -float(np.sum(terms, dtype=np.float64) * scale)
        else:
            value = -float(np.sum(terms * weight[:, None]) * scale)
        grad = p * target.sum(axis=1, keepdims=True) - target
    if weight is None:
        grad *= logits.dtype.type(scale)
    else:
        grad *= row_factor(scale, weight, logits.dtype)
    return value, grad


RULE = LossRule("cross_entropy", "softmax", spec, torch=("cross_entropy", {}))


class CrossEntropy(Loss):
    """Softmax cross-entropy over logits (N, C), as torch.nn.CrossEntropyLoss.

    Targets are integer class labels (N,) in [0, C) or class probabilities
    (N, C). Computed through log-sum-exp, so finite for logits of any finite size.
    The mean is over the N samples.
    """

    name = "cross_entropy"
    rule = RULE
    classifies = True

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
