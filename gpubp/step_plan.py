"""The recorded step: a training step captured once and replayed, on every backend.

A :class:`Plan` is captured by running one real step (``TrainStep.capture``) while recording,
then replayed for every later step of the same shapes:

* **device work**: every call of the backend interface made inside the step (``Backend``'s
  primitives: :func:`recordable` wraps them) and the step's own in-place array work
  (:func:`call`: gradient accumulation, the all-reduce) is recorded in program order as an
  entry bound to the arrays it was given. A backend may give a primitive a *planned form*
  (``plan_<name>(*args) -> thunk``, ``thunk()`` returning what the primitive returns): the thunk, bound to static buffers and resolved
  kernels, is what the replay runs (no validation, no dispatch, no allocation; the CPU
  backend's). Otherwise the entry calls the primitive again and copies what it returns into
  the arrays it returned at capture (the reference and the simulator: bit for bit the same
  maths, through their own code).
* **per-step values** (the optimizer's packed hyper-parameters with the learning rate and the
  step count, the dropout keys, the guard's tag): the step asks for them through
  :func:`value` (``fn`` recomputes the value from host state); captured, they become
  :class:`Cell`\\ s that recorded entries read when they run, so a schedule or a callback that
  changes the learning rate needs no new capture. :func:`host` records host work the values
  depend on (the layers' dropout preparation). On replay the host part runs first, in order,
  then the device part; the host part reads nothing from the device. A CUDA graph
  (``gpubp/backends/cuda_graph.py``) is the device part captured by the stream, the cells
  being device scalars refreshed by a copy inside the graph.

What the replay never does: read a device value on the host (the instrumented
``Plan.checked`` mode raises if the backend's ``to_numpy`` is called), or allocate through
the backend (``full``, ``asarray``, ``take_rows`` only run in planned forms that fill the
captured arrays). Host reads happen between steps (``TrainStep.flagged``).

One plan is active at a time (:data:`ACTIVE`); outside capture and replay every function here
costs one global read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["Plan", "Cell", "CaptureError", "value", "device_value", "host", "call", "recordable", "get", "ACTIVE"]

#: the plan being captured or replayed ([None] outside); a list so that readers need no global statement
ACTIVE: list[Plan | None] = [None]


class CaptureError(RuntimeError):
    """The step cannot be captured (why is the message); ``fit(graph="auto")`` runs it eagerly."""


class Cell:
    """A per-step value: ``fn()`` recomputed by the replay's host part, read by the entries.

    ``device``: where a backend that reads values on the device keeps it (a 1-element array of
    that backend), set by that backend; None elsewhere."""

    __slots__ = ("fn", "value", "device", "name")

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.fn, self.name = fn, name
        self.value = fn()
        self.device: Any = None

    def refresh(self) -> None:
        self.value = self.fn()

    def __repr__(self) -> str:
        return f"Cell({self.name}={self.value!r})"


def get(v: Any) -> Any:
    """``v``'s value now (a :class:`Cell`'s, else ``v`` itself)."""
    return v.value if type(v) is Cell else v


def _resolve(args: tuple) -> tuple:
    return tuple(a.value if type(a) is Cell else a for a in args)


def value(fn: Callable[[], Any], name: str = "value") -> Any:
    """A value that changes per step: ``fn()`` now, or, while a plan is captured, a :class:`Cell`
    the replay recomputes with ``fn`` (which must read only host state)."""
    plan = ACTIVE[0]
    if plan is None or not plan.capturing:
        return fn()
    cell = Cell(fn, name)
    plan.host_part.append(cell.refresh)
    plan.cells.append(cell)
    return cell


def device_value(fn: Callable[[], Any], name: str = "value") -> Any:
    """A value computed from what the step's device work returned so far (the loss of the step's
    micro-batches, summed): ``fn()`` now, or, while captured, a :class:`Cell` the replay's device
    part recomputes at this point."""
    plan = ACTIVE[0]
    if plan is None or not plan.capturing:
        return fn()
    cell = Cell(fn, name)
    plan.device_part.append(cell.refresh)
    return cell


def host(fn: Callable[..., Any], *args: Any) -> Any:
    """Run host work ``fn(*args)`` that later :func:`value`\\ s depend on; captured, the replay's
    host part runs it again at the same place."""
    out = fn(*args)
    plan = ACTIVE[0]
    if plan is not None and plan.capturing:
        plan.host_part.append(functools.partial(fn, *args))
    return out


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run device work of the step that is not a backend primitive (in-place array arithmetic, an
    all-reduce) as ``fn(*args)``; captured, the replay runs it again on the same arrays."""
    plan = ACTIVE[0]
    if plan is None or plan.depth:
        return fn(*args)
    if plan.capturing:
        plan.depth += 1
        try:
            out = fn(*_resolve(args))
        finally:
            plan.depth -= 1
        plan.device_part.append(_Entry(fn, args, {}, None, copy=False))
        return out
    return fn(*_resolve(args))


class _Entry:
    """A recorded call: ``fn(*args, **kw)`` (cells read when it runs); with ``copy``, what it
    returns is copied into the arrays it returned at capture (``template``)."""

    __slots__ = ("fn", "args", "kw", "template", "copy", "result")

    def __init__(self, fn: Callable, args: tuple, kw: dict, template: Any, copy: bool) -> None:
        self.fn, self.args, self.kw, self.template, self.copy = fn, args, kw, template, copy
        self.result = template

    def __call__(self) -> None:
        out = self.fn(*_resolve(self.args), **self.kw)
        self.result = _into(self.template, out) if self.copy else out


def _into(template: Any, fresh: Any) -> Any:
    """Copy ``fresh`` into the arrays of ``template`` (same structure); scalars come back as they are."""
    if template is fresh:
        return fresh
    if isinstance(template, tuple):
        return tuple(_into(t, f) for t, f in zip(template, fresh, strict=True))
    if hasattr(template, "shape") and getattr(template, "ndim", 0) > 0:
        np.copyto(template, fresh) if isinstance(template, np.ndarray) else template.__setitem__(Ellipsis, fresh)
        return template
    return fresh


class Plan:
    """A captured step: its host part (cells and host work, in order) and its device part (the
    recorded entries, in order). ``backend``: the backend it was captured on."""

    def __init__(self, backend: Any, label: str = "") -> None:
        self.backend, self.label = backend, label
        self.host_part: list[Callable[[], Any]] = []
        self.device_part: list[Callable[[], Any]] = []
        self.cells: list[Cell] = []
        self.capturing = False
        #: replay refuses host reads (``Backend.to_numpy`` raises CaptureError): the instrumented mode
        self.checked = False
        self.depth = 0
        #: planned entries by primitive name, generic ones likewise (what the capture found)
        self.planned: dict[str, int] = {}
        self.generic: dict[str, int] = {}
        self.graph: Any = None  # a backend's own replay of the device part (a CUDA graph)
        self.last_primitive: _Entry | None = None  # the entry of the last primitive recorded

    # -- capture --------------------------------------------------------------------------------

    def __enter__(self) -> Plan:
        if ACTIVE[0] is not None:
            raise CaptureError("a step is already being captured or replayed")
        ACTIVE[0] = self
        self.capturing = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.capturing = False
        ACTIVE[0] = None

    def record(self, backend: Any, fn: Callable, args: tuple, kw: dict) -> Any:
        """Run and record the primitive ``fn`` of ``backend`` (see the module docstring)."""
        name = fn.__name__
        self.depth += 1
        try:
            planned = getattr(backend, "plan_" + name, None)
            thunk = None if planned is None else planned(*args, **kw)
            if thunk is not None:  # (a form may decline: None)
                entry = _Entry(thunk, (), {}, None, copy=False)
                entry()
                self.device_part.append(entry)
                self.last_primitive = entry
                self.planned[name] = self.planned.get(name, 0) + 1
                return entry.result
            # a backend that reads cells on the device takes them as they are
            out = fn(backend, *(args if getattr(backend, "reads_cells", False) else _resolve(args)), **kw)
        finally:
            self.depth -= 1
        self.last_primitive = _Entry(functools.partial(fn, backend), args, kw, out, copy=True)
        self.device_part.append(self.last_primitive)
        self.generic[name] = self.generic.get(name, 0) + 1
        return out

    def result(self, index: int | None = None) -> Callable[[], Any]:
        """A reader of what the device part's entry ``index`` (default: the last backend primitive
        recorded) returns when replayed: the loss value of the step, say."""
        entry = self.last_primitive if index is None else self.device_part[index]
        if not isinstance(entry, _Entry):
            raise TypeError(f"device entry {index} is not a recorded call")
        return lambda: entry.result

    # -- replay ---------------------------------------------------------------------------------

    def replay(self) -> None:
        """The host part, then the device part (or the backend's graph of it)."""
        ACTIVE[0] = self
        try:
            for fn in self.host_part:
                fn()
            if self.graph is not None:
                self.graph()
            else:
                for entry in self.device_part:
                    entry()
        finally:
            ACTIVE[0] = None

    def __len__(self) -> int:
        return len(self.device_part)

    def __repr__(self) -> str:
        return (f"Plan({self.label or 'step'}: {len(self.host_part)} host, {len(self.device_part)} device entries, "
                f"planned {sum(self.planned.values())}, generic {sum(self.generic.values())})")


def recordable(fn: Callable) -> Callable:
    """Wrap a backend primitive so that a plan being captured records it (see the module docstring);
    outside capture (and inside another recorded call) it is ``fn`` plus one global read."""

    @functools.wraps(fn)
    def primitive(self: Any, *args: Any, **kw: Any) -> Any:
        plan = ACTIVE[0]
        if plan is None or plan.depth or not plan.capturing:
            return fn(self, *args, **kw)
        return plan.record(self, fn, args, kw)

    primitive.__wrapped_primitive__ = fn  # type: ignore[attr-defined]
    return primitive
