"""MSE: the loss, its NumPy spec, its scalar term and its PyTorch twin (one row)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.losses.base import Loss, LossRule, row_factor

__all__ = ["MSE"]


def spec(pred: np.ndarray, target: np.ndarray, scale: float, weight: np.ndarray | None = None) -> tuple[float, Any]:
    """L = scale * sum_i w_i sum_j (p_ij - t_ij)^2;  dL/dp_ij = dtype(2 scale w_i) (p_ij - t_ij)  (w = 1 unweighted)."""
    diff = pred - target
    sq = np.square(diff, dtype=np.float64)
    if weight is None:
        value = float(np.sum(sq) * scale)
        return value, diff * pred.dtype.type(2.0 * scale)
    value = float(np.sum(sq * weight[:, None]) * scale)
    return value, diff * row_factor(2.0 * scale, weight, pred.dtype)


def scalar(ops: Any) -> Any:
    wide = ops.wide

    def mse_term(p, t, g2):
        """d = p - t: (d * dtype(2 scale), float64(d)^2)."""
        d = p - t
        dd = wide(d)
        return d * g2, dd * dd

    return mse_term


RULE = LossRule("mse", "elementwise", spec, scalar, grad_factor=2.0, torch=("mse_loss", {}))


class MSE(Loss):
    """Mean squared error, as torch.nn.MSELoss: mean over all elements of (pred - target)^2."""

    name = "mse"
    rule = RULE
