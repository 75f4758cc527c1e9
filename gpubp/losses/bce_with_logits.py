"""BCEWithLogits: the loss, its NumPy spec, its scalar term and its PyTorch twin (one row)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gpubp.activations import sigmoid
from gpubp.losses.base import Loss, LossRule, row_factor

__all__ = ["BCEWithLogits"]


def spec(logits: np.ndarray, target: np.ndarray, scale: float,
         weight: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Binary cross-entropy on logits x with targets t in [0, 1], elementwise, rows weighted by w:

        l = max(x, 0) - x t + log(1 + e^-|x|)      (stable for any finite x)
        L = scale * sum_i w_i sum_j l_ij;  dL/dx_ij = dtype(scale w_i) (sigmoid(x_ij) - t_ij)
    """
    zero = logits.dtype.type(0.0)
    elem = np.maximum(logits, zero) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    if weight is None:
        value = float(np.sum(elem, dtype=np.float64) * scale)
        return value, (sigmoid(logits) - target) * logits.dtype.type(scale)
    value = float(np.sum(elem * weight[:, None]) * scale)
    return value, (sigmoid(logits) - target) * row_factor(scale, weight, logits.dtype)


def scalar(ops: Any) -> Any:
    cst, sig, wide = ops.cst, ops.sigmoid, ops.wide

    def bce_term(x, y, gscale):
        """((sigmoid(x) - y) * dtype(scale), float64(max(x, 0) - x y + log1p(e^-|x|)))."""
        elem = max(x, cst(x, 0.0)) - x * y + math.log1p(math.exp(-abs(x)))
        return (sig(x) - y) * gscale, wide(elem)

    return bce_term


RULE = LossRule("bce_with_logits", "elementwise", spec, scalar, torch=("binary_cross_entropy_with_logits", {}))


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits, as torch.nn.BCEWithLogitsLoss.

    Per element max(x, 0) - x t + log(1 + exp(-|x|)), stable for any finite x;
    targets in [0, 1], same shape as the logits.
    """

    name = "bce_with_logits"
    rule = RULE
    classifies = True

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
