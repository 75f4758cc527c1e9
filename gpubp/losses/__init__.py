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

| loss          | target                                   | mean over     | row file               | kernels     |
|---------------|------------------------------------------|---------------|------------------------|-------------|
| MSE           | same shape as pred (or (N,) for (N, 1))  | every element | ``mse.py``             | elementwise |
| CrossEntropy  | labels (N,) in [0, C), or probs (N, C)   | rows          | ``cross_entropy.py``   | softmax     |
| BCEWithLogits | same shape as pred, values in [0, 1]     | every element | ``bce_with_logits.py`` | elementwise |

Each loss is one row, in its own file: its :class:`Loss` subclass (validation, scale,
classification helpers) and its :class:`LossRule` (NumPy spec, scalar term for the element-wise
kernels, PyTorch twin); :mod:`gpubp.losses.base` has what they share. A backend runs any row
with ``Backend.loss(rule, pred, target, scale, weight)``. A new element-wise loss is a new row
file registered in ``_BY_NAME`` below: the backends' generic element-wise kernels run its term.
"""

from __future__ import annotations

from typing import Any

from gpubp.losses.base import FAMILIES, REDUCTIONS, Loss, LossRule
from gpubp.losses.bce_with_logits import BCEWithLogits
from gpubp.losses.cross_entropy import CrossEntropy
from gpubp.losses.mse import MSE

__all__ = ["Loss", "LossRule", "REDUCTIONS", "FAMILIES", "MSE", "CrossEntropy", "BCEWithLogits", "NAMES", "RULES",
           "get"]

_BY_NAME: dict[str, type[Loss]] = {
    "mse": MSE,
    "cross_entropy": CrossEntropy,
    "bce_with_logits": BCEWithLogits,
}
NAMES: tuple[str, ...] = tuple(_BY_NAME)
#: Every registered loss's rule, by name (the conformance tests and PTX checks run them all).
RULES: dict[str, LossRule] = {name: cls.rule for name, cls in _BY_NAME.items()}


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
