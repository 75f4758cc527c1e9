"""One optimizer step: forward, loss, backward, cross-rank reduction, guard, clip, update.

:class:`TrainStep` is the only place a training step is computed: ``fit`` calls it once per
optimizer step, ``lr_find`` runs its phases with a host read of the loss in between, and the
non-finite replay (:meth:`TrainStep.locate`) runs the same micro-batches with every layer
checked. How the step runs across processes is a :class:`Strategy` plugged into it:
:class:`LocalStrategy` (one process: every hook is the identity) or
:class:`gpubp.distributed.data_parallel.DataParallel`; the step has no branch on which.

The step, for the big batch ``rows`` (the rows of one optimizer step, ``B = k b`` of them
with ``accumulate=k`` micro-batches of ``b`` rows; the last big batch of an epoch may be
shorter, and is cut the same way)::

    for micro-batch j = rows[j b : (j + 1) b]:           (host: row indices only)
        strategy.split -> this rank's rows, their first row r0 in micro-batch j
        forward (dropout masks of rows j b + r0 .. of the big batch, keyed by (seed, epoch, step))
        loss value and gradient, scaled as rows of the whole big batch (1 / (B x per-row count),
            or 1 / (per-row count x W), W the big batch's weight sum)
        backward: writes the gradient arena (=); j < k - 1: added into the accumulator
            (j = 0: copied); j = k - 1: each layer's accumulated gradient added back into the
            arena as backward completes it, then strategy.after_layer (bucket all-reduces)
    strategy.reduce_gradients        one all-reduce of the summed arena per optimizer step
    guard: flag_nonfinite_(loss, gradients) sets a device flag (no host read)
    clip (global 2-norm, on the device), optimizer.step(guard=flag)

So the gradient is the sum over micro-batches and ranks of gradients already scaled for the
big batch: that of one batch of B rows, to rounding. Nothing in the step reads the device
except where asked (``check_finite``, ``on_nonfinite="skip"``); see ARCHITECTURE.md, "The
training step", for CUDA graph capture and mixed precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from gpubp import step_plan
from gpubp._validate import weight_sum
from gpubp.diagnostics import NonFiniteError
from gpubp.step_capture import StepCapture, graph_arg
from gpubp.step_parts import Part, StepResult, cut, rows_in


def _fill0(a: Any) -> None:
    a[...] = 0


def _copy(dst: Any, src: Any) -> None:
    dst[...] = src


def _iadd(dst: Any, src: Any) -> None:
    dst += src


class Strategy:
    """How a step runs across processes: the hooks :class:`TrainStep` and ``fit`` call.

    This base class is one process (:class:`LocalStrategy`); data parallelism overrides the
    hooks (:class:`gpubp.distributed.data_parallel.DataParallel`).
    """

    rank = 0
    size = 1
    comm: Any = None
    #: called after layer i's backward of an optimizer step's last micro-batch (None: no hook)
    after_layer: Callable[[int], None] | None = None

    def split(self, rows: Any, n: int) -> tuple[Any, int, int]:
        """``(this rank's rows, their first row in the batch, rows in the batch)``."""
        return rows, 0, rows_in(rows, n)

    def reduce_gradients(self, grad: Any) -> None:
        """Sum the gradient arena ``grad`` across ranks, in place (once per optimizer step)."""

    def guard_value(self, value: Any) -> Any:
        """The loss value the non-finite guard reads (the same on every rank)."""
        return value

    def sync(self, value: Any, hit: bool) -> Any:
        """Every READ_EVERY steps: the loss to show, and whether Ctrl-C was seen (on any rank)."""
        return value

    def interrupted(self, hit: bool) -> bool:
        """Whether training stops at this step boundary, given this process's Ctrl-C ``hit``."""
        return hit

    def sums(self, *values: Any) -> list[Any]:
        """The epoch's running sums, totalled over ranks."""
        return list(values)

    def gather_sums(self, total: Any, correct: Any, counted: Any, weighted: bool = False) -> list[list[Any]] | None:
        """Every rank's running sums (a fit that stops inside an epoch keeps them); None: one process."""
        return None

    def agree(self, run: Any, optimizer: Any, hit: bool = False) -> None:
        """After the epoch's callbacks: one stop decision and learning rate for every rank."""

    def runs_here(self, callback: Any) -> bool:
        """Whether ``callback`` runs in this process (``rank_zero_only`` ones: on rank 0 only)."""
        return self.rank == 0 or not getattr(callback, "rank_zero_only", False)

    def where(self, text: str) -> str:
        """Where the replay of a diverged step found NaN/Inf (every rank's finding, in one line)."""
        return text


class LocalStrategy(Strategy):
    """One process: every hook is the identity."""


class _Found(Exception):
    """The replay found NaN/Inf (its text)."""


class TrainStep:
    """The optimizer step of ``model`` with ``loss`` and ``optimizer``: see the module docstring.

    ``accumulate``: micro-batches per step; ``micro_rows``: rows per micro-batch (fit's
    batch_size); ``on_nonfinite``: "raise" (the update reads the guard flag), "skip" (the host
    reads it every step; a flagged step is not applied) or "ignore" (no guard).
    """

    def __init__(self, model: Any, loss: Any, optimizer: Any, strategy: Strategy | None = None, *,
                 micro_rows: int | None = None, accumulate: int = 1, clip_grad_norm: float | None = None,
                 on_nonfinite: str = "raise", loss_scaler: Any = None) -> None:
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.strategy = LocalStrategy() if strategy is None else strategy
        self.backend = backend = model.arena.backend
        self.micro_rows, self.accumulate = micro_rows, accumulate
        self.clip_grad_norm, self.on_nonfinite = clip_grad_norm, on_nonfinite
        #: fp16-mixed's dynamic loss scale (gpubp.loss_scale): dL/dout x S, the gradient / S, and a
        #: non-finite step skipped by the guard with S halved (whatever on_nonfinite says)
        self.loss_scaler = loss_scaler
        self.flag = backend.asarray(np.zeros(1, dtype=np.int64), np.int64)  # 0, or the first bad step's tag
        grad = model.arena.grad
        self.acc = backend.zeros(grad.shape, grad.dtype) if accumulate > 1 else None  # the micro-batches' sum
        self.graphs: Any = None  # a StepCapture when the step is recorded and replayed (capture())
        self._replayed = False  # the last __call__ replayed a plan (its update included)
        self.tag: int = 0  # the guard's tag and the big batch's weight sum of the step being run
        self.weight_total: float | None = None
        self.spans: dict[int, tuple[int, int]] = {}  # layer -> its parameters' [lo, hi) in the arena
        for i, layer in enumerate(model.layers):
            params = layer.parameters()
            if params:
                self.spans[i] = (min(p.offset for p in params), max(p.offset + p.size for p in params))

    def capture(self, graph: Any = True) -> TrainStep:
        """Record the step per shape and replay it (:mod:`gpubp.step_capture`; a CUDA graph on a GPU):
        ``graph`` True (say why when a step must run eagerly), "auto" (eager without a word where
        capture is known not to work) or False (eager). Returns ``self``; then ``step(...)``
        followed by ``step.update()`` runs an optimizer step, replayed after its shape's first."""
        graph = graph_arg(graph)
        self.graphs = StepCapture(self, graph) if graph is not False else None
        return self

    # -- phases (lr_find runs them with a host read between) ----------------------------------

    def forward(self, xb: Any, yb: Any, rows: int, wb: Any = None, weight: float | None = None, row0: int = 0,
                outputs: list | None = None, dropout: bool | None = True) -> tuple[Any, Any, Any]:
        """Forward (dropout on, masks of rows ``row0``.. of the big batch; ``dropout`` None: as the
        model's train()/eval() mode says) and the loss of one micro-batch scaled as rows of the
        big batch of ``rows`` rows (weight ``weight``): ``(outputs, value, dL/doutputs)``."""
        out = self.model.forward_batch(xb, training=True, dropout=dropout, outputs=outputs, row0=row0)
        value, dout = self.loss.compute(out, yb, self.backend, wb, weight, rows=rows)
        if self.loss_scaler is not None:
            step_plan.call(self.loss_scaler.scale_, dout)
        return out, value, dout

    def backward(self, dout: Any, j: int, parts: int) -> None:
        """Backward of micro-batch ``j`` of ``parts``, leaving the gradient sum so far: in the
        accumulator after micro-batches 0 .. parts - 2, in the arena after the last (see the
        module docstring); the strategy's after-layer hook runs in the last one only."""
        self.model.backward_batch(dout, input_grad=False, after_layer=self._hook(j, parts))
        self._accumulated(j, parts)

    def no_rows(self, j: int, parts: int) -> None:
        """Micro-batch ``j`` has no rows on this rank (a batch smaller than the world): zero gradients."""
        grad = self.model.arena.grad
        step_plan.call(_fill0, grad)
        if j == parts - 1 and j > 0:
            step_plan.call(_iadd, grad, self.acc)
        self._accumulated(j, parts)

    def _hook(self, j: int, parts: int) -> Callable[[int], None] | None:
        hook = self.strategy.after_layer if j == parts - 1 else None
        if j == 0 or j < parts - 1:
            return None if hook is None else (lambda i: step_plan.call(hook, i))
        grad, acc, spans = self.model.arena.grad, self.acc, self.spans

        def add_then(i: int) -> None:  # layer i's gradient is complete: add the earlier micro-batches'
            if i in spans:
                lo, hi = spans[i]
                step_plan.call(_iadd, grad[lo:hi], acc[lo:hi])
            if hook is not None:
                step_plan.call(hook, i)
        return add_then

    def _accumulated(self, j: int, parts: int) -> None:
        if j < parts - 1:
            grad = self.model.arena.grad
            step_plan.call(_copy if j == 0 else _iadd, self.acc, grad)

    def reduce_and_guard(self, value: Any, tag: int) -> None:
        """The cross-rank sum of the gradients, then the guard: the flag takes ``tag`` where the
        loss or a gradient is not finite (a device op; nothing is read)."""
        step_plan.call(self.strategy.reduce_gradients, self.model.arena.grad)
        if self.loss_scaler is not None:
            step_plan.call(self.loss_scaler.unscale_, self.model.arena.grad)
        if self.guard() is not None:
            self.backend.flag_nonfinite_(self.strategy.guard_value(value), self.model.arena.grad, self.flag, tag)

    def update(self, stats: Any = None, outputs: list | None = None) -> bool:
        """Clip and update, unless ``on_nonfinite="skip"`` and the flag is set (then it is cleared
        and False returned); ``stats`` (gradient statistics) sees the gradients and the update.
        After a recorded step (which updated, guarded by the flag) only the skip's part remains."""
        if self.loss_scaler is not None:  # (the scaler skips a non-finite step: no host read)
            if not self._replayed:
                self.apply(self.guard())
            self._replayed = False
            return True
        if self._replayed:
            self._replayed = False
            if self.on_nonfinite == "skip" and self.flagged():  # the update read the flag: put the count back
                self.backend.assign_(self.flag, np.zeros(1, dtype=np.int64))
                self.optimizer.step_count -= 1
                return False
            return True
        if self.on_nonfinite == "skip" and self.flagged():
            self.backend.assign_(self.flag, np.zeros(1, dtype=np.int64))
            return False
        if stats is not None and outputs is not None:
            stats.after_backward(outputs)
        self.apply(self.flag if self.on_nonfinite == "raise" else None)
        if stats is not None and outputs is not None:
            stats.after_step()
        return True

    def guard(self) -> Any:
        """The flag the update reads (None: no guard, ``on_nonfinite="ignore"`` without a loss scale)."""
        return self.flag if self.on_nonfinite != "ignore" or self.loss_scaler is not None else None

    def apply(self, guard: Any = None) -> None:
        """Clip (global 2-norm, on the device) and ``optimizer.step(guard=guard)``; with a loss
        scale, its end-of-step rule (which reads and clears the flag on the device)."""
        from gpubp import optim

        if self.clip_grad_norm is not None:
            optim.clip_grad_norm(self.optimizer.params, self.clip_grad_norm, sync=False)
        self.optimizer.step(guard=guard)
        if self.loss_scaler is not None:
            step_plan.call(self.loss_scaler.after_step, self.flag)

    def flagged(self) -> int:
        """The guard flag: 0, or the tag of the first non-finite step (reads the device)."""
        return int(self.backend.to_numpy(self.flag)[0])

    # -- the whole step (fit) -----------------------------------------------------------------

    def micro_batches(self, rows: Any, n: int) -> Iterator[tuple[int, int, Any, int]]:
        """``(j, parts, this rank's rows, their first row in the big batch)`` per micro-batch."""
        size = self.micro_rows or max(rows_in(rows, n), 1)
        pieces = cut(rows, n, size)
        for j, piece in enumerate(pieces):
            mine, lo, _ = self.strategy.split(piece, n)
            yield j, len(pieces), mine, j * size + lo

    def __call__(self, rows: Any, n: int, step: int, tag: int, read_x: Callable[[Any], Any], y: Any,
                 weights: np.ndarray | None = None, outputs: list | None = None, where: str = "") -> StepResult:
        """Forward, loss and backward of every micro-batch of the big batch ``rows`` (of [0, n)),
        the reduction and the guard (tagged ``tag``); the update is :meth:`update`'s.

        ``read_x(rows)``: this rank's rows of x on the backend; ``outputs``: receives the last
        micro-batch's layer outputs (gradient statistics); ``where``: names the step in errors."""
        model, backend = self.model, self.backend
        if self.graphs is not None and outputs is None:
            res = self.graphs(rows, n, step, tag, read_x, y, weights)
            if res is not None:
                self._replayed = True
                return res
        model.dropout_step = step
        nb = rows_in(rows, n)
        W = weight_sum(weights[rows]) if weights is not None else None
        value: Any = None
        parts: list[Part] = []
        for j, k, mine, row0 in self.micro_batches(rows, n):
            xb, yb = read_x(mine), backend.take_rows(y, mine)
            wb = w_rows = None
            if weights is not None:
                w_rows = weights[mine]
                wb = backend.asarray(w_rows, np.float64)
            if xb.shape[0]:
                out, v, dout = self.forward(xb, yb, nb, wb, W, row0, outputs if j == k - 1 else None)
                if model.check_finite and not np.isfinite(float(v)):  # checks every layer, waits
                    raise NonFiniteError(f"loss: {float(v)} at {where}")
                self.backward(dout, j, k)
                parts.append(Part(out, yb, mine, wb, w_rows))
            else:
                v = 0.0
                self.no_rows(j, k)
            value = v if value is None else value + v
        self.reduce_and_guard(value, tag)
        return StepResult(value, nb, W, parts)

    # -- the replay of a diverged step --------------------------------------------------------

    def locate(self, rows: Any, n: int, step: int, read_x: Callable[[Any], Any], y: Any,
               weights: np.ndarray | None = None) -> str:
        """Replay the step of big batch ``rows`` with every layer checked; where NaN/Inf first
        appears (every rank's finding). Overwrites the gradients, never the parameters."""
        model = self.model
        model.dropout_step = step
        nb = rows_in(rows, n)
        W = weight_sum(weights[rows]) if weights is not None else None
        text = "no rows on this rank"
        for j, k, mine, row0 in self.micro_batches(rows, n):
            xb = read_x(mine)
            if not xb.shape[0]:
                continue
            wb = None if weights is None else self.backend.asarray(weights[mine], np.float64)
            found = self._replay(xb, self.backend.take_rows(y, mine), nb, wb, W, row0)
            if found is not None:
                text = found if k == 1 else f"micro-batch {j + 1} of {k}: {found}"
                break
            text = "no NaN or Inf on replay (the step is not reproducible)"
        return self.strategy.where(text)

    def _replay(self, xb: Any, yb: Any, nb: int, wb: Any, W: float | None, row0: int) -> str | None:
        model, backend = self.model, self.backend
        outputs: list = []
        model.forward_batch(xb, training=True, dropout=True, outputs=outputs, row0=row0)
        for i, h in enumerate(outputs):
            if not backend.all_finite(h):
                return f"the output of layer {i} ({model.layers[i]!r}) contains NaN or Inf"
        value, dout = self.loss.compute(outputs[-1], yb, backend, wb, W, rows=nb)
        if not np.isfinite(float(value)):
            return f"the loss is {float(value)}"

        def check(i: int) -> None:
            for p in model.layers[i].parameters():
                if not backend.all_finite(p.grad):
                    raise _Found(f"the gradient of {p.name} (layer {i}, {model.layers[i]!r}) contains NaN or Inf")
        try:
            model.backward_batch(dout, input_grad=False, after_layer=check)
        except _Found as e:
            return str(e)
        return None
