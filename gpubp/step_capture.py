"""The training step captured once per shape and replayed: ``fit(graph=...)`` and ``TrainStep.capture``.

:class:`StepCapture` runs a :class:`~gpubp.train_step.TrainStep` through recorded plans
(:mod:`gpubp.step_plan`): the first step of each shape (the micro-batches' row counts; a
fit has the full big batch and, at most, the epoch's shorter last one) is run while recorded,
and every later step of that shape replays the plan:

    host, outside the plan   the rows of x, y (and row weights) copied into the plan's static
                             input buffers; the step index (dropout keys), the guard's tag and
                             the big batch's weight sum set where the plan's cells read them
    plan, host part          each layer's dropout key, the optimizer's step count and packed
                             hyper-parameters (the learning rate as it is now), the loss scale
    plan, device part        forward, loss, backward (accumulation), the all-reduce, the guard,
                             clipping, the update: the recorded calls (a CUDA graph on a GPU)
    host, after              ``on_nonfinite="skip"``: the flag read; a flagged step's count put back

So the replayed step is the eager one, bit for bit (``tests/test_step_capture.py`` checks it on
every backend this machine has, with schedules, dropout, clipping, the guard firing,
accumulation, row weights and data parallelism), with no Python above the backend's calls.

What cannot be captured is run eagerly: ``check_finite=True`` and gradient statistics read the
device inside the step; a step that reads the device anywhere else raises
:class:`~gpubp.step_plan.CaptureError` while captured, and runs eagerly from then on (one
warning naming the cause). Plans are dropped when the arrays they are bound to change (the
model moved or the optimizer's state loaded).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubp import step_plan
from gpubp._validate import weight_sum
from gpubp.step_parts import Part, StepResult, rows_in
from gpubp.step_plan import CaptureError, Plan

__all__ = ["StepCapture", "Captured", "GRAPH_MODES", "graph_arg"]

#: fit's ``graph`` argument
GRAPH_MODES = ("auto", True, False)


def graph_arg(graph: Any) -> Any:
    """``graph`` checked: "auto", True or False (TypeError/ValueError naming it otherwise)."""
    if isinstance(graph, (bool, np.bool_)):
        return bool(graph)
    if isinstance(graph, str):
        if graph == "auto":
            return graph
        raise ValueError(f"graph: expected 'auto', True or False, got {graph!r}")
    raise TypeError(f"graph: expected 'auto', True or False, got {type(graph).__name__}")


def _static(backend: Any, a: Any) -> Any:
    """A buffer of ``a``'s shape and dtype owned by the plan (never a view of the data set)."""
    buf = backend.full(tuple(a.shape), 0, a.dtype)
    buf[...] = a
    return buf


@dataclass
class Captured:
    """One shape's plan: its static inputs per micro-batch ((x, y, w) or None for a micro-batch with no
    rows on this rank), the loss-value cell, each micro-batch's outputs."""

    plan: Plan
    inputs: list[tuple[Any, Any, Any] | None]
    value: Any
    outs: list[Any]


class StepCapture:
    """Runs ``train_step`` (a TrainStep) through recorded plans, one per shape (module docstring).

    ``mode``: "auto" (capture where it works; where it is known not to, eager without a word) or
    True (likewise, but say why when running eagerly). ``reason``: why the step runs eagerly (None
    while it is captured)."""

    def __init__(self, train_step: Any, mode: Any = "auto") -> None:
        self.step, self.mode = train_step, mode
        self.plans: dict[Any, Captured] = {}
        self.reason: str | None = None
        self.captures = self.replays = 0
        from gpubp.losses.base import Loss
        from gpubp.optim.base import Optimizer

        opt, loss = type(train_step.optimizer), type(train_step.loss)
        replaced = [f"{type(o).__name__}.{name}" for o, name in ((train_step.optimizer, "step"),
                    (train_step.optimizer, "advance"), (train_step.loss, "compute")) if name in vars(o)]
        if opt.step is not Optimizer.step or opt.advance is not Optimizer.advance:
            self.refuse(f"{opt.__name__}.step runs its own host code per step, which a replay would not repeat")
        elif loss.compute is not Loss.compute:
            self.refuse(f"{loss.__name__}.compute runs its own host code per step, which a replay would not repeat")
        elif replaced:
            self.refuse(f"{replaced[0]} is replaced on the object: a replay would not call it")
        elif mode == "auto" and getattr(train_step.backend, "graph_capture", None) is not None:
            # as dense_impl="auto" keeps the fused kernels off: the CUDA graph path has not yet run on
            # a GPU, so "auto" leaves it off there and graph=True opts in
            self.refuse("CUDA graphs are opt-in (graph=True) until verified on a GPU")

    def refuse(self, reason: str, attempted: bool = False) -> None:
        """Run eagerly from now on because of ``reason`` (a warning when asked for, or when a capture failed)."""
        if self.reason is None and (attempted or self.mode is True):
            warnings.warn(f"graph: the training step runs eagerly: {reason}", RuntimeWarning, stacklevel=3)
        self.reason = self.reason or reason
        self.plans.clear()

    def _state_key(self) -> tuple:
        st = self.step
        arena = st.model.arena
        return (id(arena.data), id(arena.grad), id(st.acc), *(id(b) for b in st.optimizer.buffers()))

    def __call__(self, rows: Any, n: int, step: int, tag: int, read_x: Callable[[Any], Any], y: Any,
                 weights: np.ndarray | None = None) -> Any:
        """The step of big batch ``rows`` (TrainStep.__call__'s arguments), its update included; None
        when it must run eagerly (then nothing of it has run)."""
        if self.reason is not None:
            return None
        st, backend = self.step, self.step.backend
        if st.model.check_finite:
            self.refuse("check_finite=True reads every layer's output on the host inside the step")
            return None
        st.model.dropout_step = step
        pieces = list(st.micro_batches(rows, n))
        nb = rows_in(rows, n)
        W = weight_sum(weights[rows]) if weights is not None else None
        st.tag, st.weight_total = tag, W
        # The plan binds the big batch's row count (the unweighted loss scale) and each micro-batch's first
        # row (its dropout masks), not only this rank's row counts: with data parallelism a rank's share of
        # the epoch's short last batch can have as many rows as its share of a full one (7 rows over 2
        # ranks: 3 and 4; 8 rows: 4 and 4).
        key = (tuple((rows_in(mine, n), row0) for _, _, mine, row0 in pieces), nb, weights is not None,
               self._state_key())
        got = self.plans.get(key)
        if got is None:
            got = self._capture(key, pieces, nb, read_x, y, weights)
            if got is None:
                return None
        else:
            for (_, _, mine, _), inp in zip(pieces, got.inputs, strict=True):
                if inp is not None:
                    xs, ys, ws = inp
                    xs[...] = read_x(mine)
                    ys[...] = backend.take_rows(y, mine)
                    if ws is not None:
                        backend.assign_(ws, weights[mine])
            got.plan.replay()
            self.replays += 1
        # The outputs (and staged targets, weights) are the plan's buffers, which the next replay
        # writes again: what the loop keeps past the step it copies (metrics.Tracker's gathered outputs).
        parts = [Part(out, inp[1], mine, inp[2], None if weights is None else weights[mine])
                 for (_, _, mine, _), inp, out in zip(pieces, got.inputs, got.outs, strict=True) if inp is not None]
        return StepResult(step_plan.get(got.value), nb, W, parts)

    def _capture(self, key: Any, pieces: list, nb: int, read_x: Callable, y: Any,
                 weights: np.ndarray | None) -> Captured | None:
        st, backend = self.step, self.step.backend
        inputs: list[tuple[Any, Any, Any] | None] = []
        for _, _, mine, _ in pieces:
            xb = read_x(mine)
            if not xb.shape[0]:
                inputs.append(None)
                continue
            ws = None if weights is None else _static(backend, backend.asarray(weights[mine], np.float64))
            inputs.append((_static(backend, xb), _static(backend, backend.take_rows(y, mine)), ws))
        plan = Plan(backend, label=f"micro-batches of {key[0]} rows")
        graph = getattr(backend, "graph_capture", None)
        outs: list[Any] = []
        applying = False
        try:
            with (graph(plan) if graph is not None else contextlib.nullcontext()), plan:
                tag = step_plan.value(lambda: st.tag, "tag")
                W = None if weights is None else step_plan.value(lambda: st.weight_total, "weight sum")
                terms: list[Callable[[], Any] | None] = []
                for (j, k, _, row0), inp in zip(pieces, inputs, strict=True):
                    if inp is None:
                        st.no_rows(j, k)
                        terms.append(None)
                        outs.append(None)
                        continue
                    xs, ys, ws = inp
                    out, _, dout = st.forward(xs, ys, nb, ws, W, row0)
                    terms.append(plan.result())  # the loss is the last primitive recorded
                    outs.append(out)
                    st.backward(dout, j, k)
                value = step_plan.device_value(lambda: _total(terms), "loss")
                st.reduce_and_guard(value, tag)
                applying = True
                st.apply(st.guard())
        except CaptureError as e:
            if applying:
                raise  # the update may have run: the step cannot be run again
            self.refuse(str(e), attempted=True)
            return None
        got = Captured(plan, inputs, value, outs)
        self.plans[key] = got
        self.captures += 1
        return got


def _total(terms: list[Callable[[], Any] | None]) -> Any:
    """The step's loss: the micro-batches' values summed in order (0.0 for one with no rows here), as
    TrainStep.__call__ sums them."""
    value: Any = None
    for t in terms:
        v = 0.0 if t is None else t()[0]
        value = v if value is None else value + v
    return value
