"""What a training step works on and leaves: its rows cut into micro-batches, its parts and result.

Shared by :mod:`gpubp.train_step` (the eager step) and :mod:`gpubp.step_capture` (the recorded one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["rows_in", "cut", "Part", "StepResult"]


def rows_in(rows: Any, n: int) -> int:
    """The number of rows of ``rows`` (a slice of [0, n) or a host index array)."""
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(n)
        return max(stop - start, 0)
    return len(rows)


def cut(rows: Any, n: int, size: int) -> list[Any]:
    """``rows`` (a slice of [0, n) or a host index array) cut into parts of ``size`` rows, in order
    (the last part holds the remainder)."""
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(n)
        return [slice(i, min(i + size, stop)) for i in range(start, stop, size)] or [slice(start, start)]
    return [rows[i : i + size] for i in range(0, len(rows), size)] or [rows]


@dataclass
class Part:
    """One micro-batch on this rank, as the epoch's sums and metrics need it."""

    out: Any  # the model's outputs (n, out)
    yb: Any  # targets on the backend
    rows: Any  # the rows of y (host index or slice)
    wb: Any = None  # row weights on the backend
    w_rows: Any = None  # row weights on the host


@dataclass
class StepResult:
    """What one optimizer step leaves for the loop: the loss of this rank's rows (scaled for the big
    batch: summed over ranks it is the big batch's loss), the big batch's rows and weight, the parts."""

    value: Any
    rows: int
    weight: float | None
    parts: list[Part] = field(default_factory=list)
