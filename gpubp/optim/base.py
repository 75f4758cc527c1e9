"""The optimizer base class, the registry behind :func:`get`, and gradient-norm clipping.

The update equations, argument names and defaults are those of torch.optim.
An optimizer holds a list of :class:`~gpubp.parameter.Parameter` and updates
them with one in-place operation per contiguous run of arena storage (all of a
model's parameters, in order, form one run). Its state buffers are flat arrays
laid out like the runs. Each optimizer's maths is its :class:`~gpubp.optim.rule.Rule`
(in its own file: NumPy spec, scalar body, hyper-parameter packing), which the
arena's backend runs with its one ``update`` primitive; this module checks
arguments, owns the state and dispatches.

One step counter is kept per optimizer (``step_count``); ``lr`` may be changed
between steps, which is what the schedules in :mod:`gpubp.schedules` do.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import numpy as np

from gpubp import step_plan
from gpubp._validate import real
from gpubp.backends.base import Backend
from gpubp.optim.rule import Rule
from gpubp.parameter import Arena, Parameter, contiguous_runs

__all__ = ["Optimizer", "OPTIMIZERS", "get", "clip_grad_norm"]

#: name for :func:`get` (lower case) -> optimizer class; a subclass with a ``key`` registers itself.
OPTIMIZERS: dict[str, type[Optimizer]] = {}


def _ops(arena: Arena) -> Backend:
    """The backend that runs the update maths for ``arena``'s arrays."""
    return arena.backend


def _check_params(params: Iterable[Parameter]) -> list[Parameter]:
    if isinstance(params, Parameter):
        raise TypeError("params: expected an iterable of Parameter, got a single Parameter (wrap it in a list)")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params: expected an iterable of Parameter, got {type(params).__name__}") from None
    if not items:
        raise ValueError("params: expected at least one Parameter, got an empty sequence")
    for i, p in enumerate(items):
        if not isinstance(p, Parameter):
            raise TypeError(f"params: expected Parameter items, got {type(p).__name__} at index {i}")
    dtypes = sorted({str(p.arena.dtype) for p in items})
    if len(dtypes) > 1:
        raise ValueError(f"params: expected parameters of one dtype, got a mix of {', '.join(dtypes)}")
    names = [p.name for p in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"params: expected distinct parameter names, got duplicates {dup}")
    spans = sorted((id(p.arena), p.offset, p.offset + p.size, p.name) for p in items if p.size)
    for a, b in pairwise(spans):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"params: parameters {a[3]!r} and {b[3]!r} share storage")
    return items


def flag_arg(v: Any, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__}")
    return bool(v)


def beta_arg(v: Any, name: str) -> float:
    b = real(v, name, min=0.0)
    if b >= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
    return b


def _split_state(state_dict: Any, tensors: Any) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """``(meta, tensors, name of meta, name of tensors)`` from any accepted form of
    :meth:`Optimizer.load_state_dict`'s arguments; TypeError naming the argument otherwise."""
    if tensors is not None:  # load_state_dict(meta, tensors), as in earlier releases
        meta, mname, tname = state_dict, "meta", "tensors"
    elif isinstance(state_dict, dict):
        if set(state_dict) != {"meta", "state"}:
            raise TypeError(
                f"state_dict: expected optimizer.state_dict()'s dict with keys 'meta' and 'state', "
                f"got keys {sorted(map(str, state_dict))}"
            )
        meta, tensors = state_dict["meta"], state_dict["state"]
        mname, tname = "state_dict['meta']", "state_dict['state']"
    elif isinstance(state_dict, (tuple, list)) and len(state_dict) == 2:  # the (meta, tensors) pair
        (meta, tensors), mname, tname = state_dict, "state_dict[0]", "state_dict[1]"
    else:
        raise TypeError(f"state_dict: expected optimizer.state_dict()'s dict, got {type(state_dict).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"{mname}: expected a dict, got {type(meta).__name__}")
    if not isinstance(tensors, dict):
        raise TypeError(f"{tname}: expected a dict, got {type(tensors).__name__}")
    return meta, tensors, mname, tname


class Optimizer(ABC):
    """Base class: parameters, contiguous runs, state buffers, ``step`` dispatch and checkpoints.

    A subclass lists its hyper-parameters in ``_hparam_names``, normalises and
    checks them in :meth:`_check`, names its state buffers (and their initial
    value) in :meth:`_buffers` and gives its update maths as ``rule`` (a
    :class:`~gpubp.optim.rule.Rule`, whose ``pack`` reads :meth:`_rule_hparams`).
    ``key`` registers it for :func:`get`; ``torch_name`` names its torch.optim twin,
    whose keyword arguments are :meth:`torch_kwargs`.
    """

    _hparam_names: tuple[str, ...] = ("lr",)
    rule: Rule
    #: the name :func:`get` knows it by ("" for none)
    key: str = ""
    #: the torch.optim class with the same maths and hyper-parameters ("" for none)
    torch_name: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("key"):
            OPTIMIZERS[cls.key] = cls

    @classmethod
    def torch_kwargs(cls, hp: dict[str, Any]) -> dict[str, Any]:
        """torch.optim's keyword arguments for gpubp hyper-parameters ``hp`` (the same names; pairs as tuples)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in hp.items() if k in cls._hparam_names}

    def __init__(self, params: Iterable[Parameter], **hparams: Any) -> None:
        self.params: list[Parameter] = _check_params(params)
        if real(hparams["lr"], "lr") <= 0:
            raise ValueError(f"lr: expected a number > 0, got {hparams['lr']!r}")
        self._runs = contiguous_runs(self.params)
        self._where = [self._locate(p) for p in self.params]
        self._set_hparams(self._check(hparams))
        self.step_count: int = 0
        self._state = self._new_state()

    # --- hyper-parameters and state -------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate of the next step (a number >= 0; schedules set it)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = real(value, "lr", min=0.0)

    def _check(self, hp: dict[str, Any]) -> dict[str, Any]:
        """Checked, normalised hyper-parameters (JSON-friendly Python values)."""
        return {"lr": real(hp["lr"], "lr", min=0.0)}

    def _buffers(self, hp: dict[str, Any]) -> dict[str, float]:
        """State buffer names, in order, with the value each starts at."""
        return {}

    def _rule_hparams(self) -> dict[str, Any]:
        """What ``rule.pack`` reads: the hyper-parameters as attributes (tuples stay tuples)."""
        return {k: getattr(self, k) for k in self._hparam_names}

    def _hparams(self) -> dict[str, Any]:
        """The hyper-parameters as JSON-friendly values (tuples become lists)."""
        hp = {k: getattr(self, k) for k in self._hparam_names}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}

    def _set_hparams(self, hp: dict[str, Any]) -> None:
        for k, v in hp.items():
            setattr(self, k, v)

    def _locate(self, p: Parameter) -> tuple[int, int]:
        """(run index, offset of ``p`` inside that run)."""
        for i, (arena, lo, hi) in enumerate(self._runs):
            if arena is p.arena and lo <= p.offset and p.offset + p.size <= hi:
                return i, p.offset - lo
        raise AssertionError(f"parameter {p.name!r} is in no run")  # contiguous_runs covers every parameter

    def _new_state(self) -> list[dict[str, Any]]:
        bufs = self._buffers(self._hparams())
        return [
            {name: _ops(arena).full(hi - lo, fill, arena.dtype) for name, fill in bufs.items()}
            for arena, lo, hi in self._runs
        ]

    # --- public API -------------------------------------------------------------------

    def step(self, guard: Any = None) -> None:
        """Update every parameter once from its current gradient.

        ``guard``: a 1-element int64 array of the parameters' backend (fit's non-finite
        flag); where it holds a non-zero value the update leaves parameters and state as
        they are, without the host reading it (on a GPU the kernels read it).
        """
        rule = self.rule
        hp = step_plan.value(self.advance, "hyper-parameters")  # a recorded step re-packs them per replay
        for (arena, lo, hi), state in zip(self._runs, self._state, strict=True):
            bufs = tuple(state.get(name) for name in rule.state)
            _ops(arena).update(rule, arena.data[lo:hi], arena.grad[lo:hi], bufs, hp, guard)

    def advance(self) -> Any:
        """Count one more step and pack the hyper-parameters of it (``rule.pack``: the learning rate
        as it is now, the step count's bias corrections): the host part of :meth:`step`."""
        self.step_count += 1
        return self.rule.pack(self._rule_hparams(), self.step_count, self.params[0].arena.dtype)  # one dtype

    def buffers(self) -> list[Any]:
        """The state buffers (flat arrays of the backend, one set per run), as the update writes them."""
        return [arr for state in self._state for arr in state.values()]

    def zero_grad(self) -> None:
        """Set the gradients of this optimizer's parameters to 0."""
        for arena, lo, hi in self._runs:
            arena.grad[lo:hi].fill(0)

    def state_dict(self) -> dict[str, Any]:
        """``{"meta": meta, "state": tensors}``: a JSON-serialisable description and host copies of the state.

        As torch.optim's, a dict; :meth:`load_state_dict` takes it back. ``meta`` holds
        ``"type"`` (the class name), every hyper-parameter, ``"step"`` and
        ``"param_names"``. ``state`` maps ``"{param name}.{buffer}"`` to an array shaped
        like the parameter, e.g. ``"0.weight.exp_avg"`` (in, out).
        """
        meta: dict[str, Any] = {"type": type(self).__name__, **self._hparams()}
        meta["step"] = self.step_count
        meta["param_names"] = [p.name for p in self.params]
        tensors: dict[str, np.ndarray] = {}
        for p, (r, off) in zip(self.params, self._where, strict=True):
            ops = _ops(p.arena)
            for buf, arr in self._state[r].items():
                tensors[f"{p.name}.{buf}"] = ops.to_numpy(arr[off : off + p.size]).reshape(p.shape)
        return {"meta": meta, "state": tensors}

    def load_state_dict(self, state_dict: Any, tensors: dict[str, np.ndarray] | None = None) -> None:
        """Restore hyper-parameters, step count and state from :meth:`state_dict`'s output.

        ``state_dict`` is that dict, ``{"meta": ..., "state": ...}``. The form of earlier
        releases is accepted too: ``load_state_dict(meta, tensors)``, or the pair
        ``(meta, tensors)`` as one argument.

        Everything is checked before anything changes; a mismatch in type,
        parameter names, hyper-parameters or tensor names, shapes or dtypes
        raises ValueError naming it.
        """
        meta, tensors, mname, tname = _split_state(state_dict, tensors)
        kind = type(self).__name__
        if meta.get("type") != kind:
            raise ValueError(f"{mname}['type']: state is for optimizer {meta.get('type')!r}, this is {kind!r}")
        names = [p.name for p in self.params]
        saved = meta.get("param_names")
        if saved != names:
            if not isinstance(saved, list):
                raise ValueError(f"{mname}['param_names']: expected a list of names, got {saved!r}")
            missing = [n for n in names if n not in saved]
            extra = [n for n in saved if n not in names]
            why = f"missing {missing}, unexpected {extra}" if missing or extra else "different order"
            raise ValueError(f"{mname}['param_names']: do not match this optimizer's parameters ({why})")
        absent = [k for k in (*self._hparam_names, "step") if k not in meta]
        if absent:
            raise ValueError(f"{mname}: missing keys {absent}")
        hp = self._check({k: meta[k] for k in self._hparam_names})
        step = meta["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{mname}['step']: expected an integer >= 0, got {step!r}")

        bufs = self._buffers(hp)
        want = {f"{p.name}.{b}": p for p in self.params for b in bufs}
        missing = [k for k in want if k not in tensors]
        extra = sorted(k for k in tensors if k not in want)
        if missing or extra:
            raise ValueError(f"{tname}: missing {missing}, unexpected {extra}")
        for key, p in want.items():
            t = tensors[key]
            shape = tuple(getattr(t, "shape", ()))
            if shape != p.shape:
                raise ValueError(f"{tname}[{key!r}]: expected shape {p.shape}, got {shape}")
            if np.dtype(getattr(t, "dtype", object)) != p.arena.dtype:
                raise ValueError(f"{tname}[{key!r}]: expected dtype {p.arena.dtype}, got {getattr(t, 'dtype', None)}")

        self._set_hparams(hp)
        self.step_count = int(step)
        self._state = self._new_state()
        for p, (r, off) in zip(self.params, self._where, strict=True):
            ops = _ops(p.arena)
            for buf, arr in self._state[r].items():
                ops.assign_(arr[off : off + p.size], tensors[f"{p.name}.{buf}"])

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {hp}, step_count={self.step_count})"


def get(name: str, params: Iterable[Parameter], **kwargs: Any) -> Optimizer:
    """Build the optimizer called ``name`` (case-insensitive) over ``params``."""
    key = name.lower() if isinstance(name, str) else None
    if key not in OPTIMIZERS:
        raise ValueError(f"name: expected one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")
    return OPTIMIZERS[key](params, **kwargs)


def clip_grad_norm(
    params: Iterable[Parameter], max_norm: float, norm_type: float = 2.0, *, sync: bool = True
) -> float | None:
    """Scale the gradients so that their joint norm is at most ``max_norm``; return the norm.

    The norm is that of all the gradients laid end to end as one vector,
    computed in float64 in a fixed order; ``norm_type`` is 2.0 or ``inf``.
    When ``max_norm / (norm + 1e-6) < 1`` every gradient is multiplied by that
    factor; otherwise the gradients are left alone. The norm returned is the
    one before scaling.

    With ``sync=False`` the 2-norm is reduced and applied by the backend without
    the host waiting for it (on a GPU: on the device), and None is returned; the
    training loop clips that way.
    """
    items = _check_params(params)
    max_norm = real(max_norm, "max_norm", min=0.0, min_open=True)
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float, np.integer, np.floating)):
        raise TypeError(f"norm_type: expected 2.0 or float('inf'), got {type(norm_type).__name__}")
    kind = float(norm_type)
    if kind not in (2.0, math.inf):
        raise ValueError(f"norm_type: expected 2.0 or float('inf'), got {norm_type!r}")
    runs = contiguous_runs(items)
    ops = _ops(runs[0][0])
    if not sync and kind == 2.0:
        # total_sq = sum over runs, in run order (the same order as the host path below).
        total_sq = ops.full(1, 0.0, np.float64)
        for a, lo, hi in runs:
            _ops(a).sum_of_squares_into(a.grad[lo:hi], total_sq, accumulate=True)
        for a, lo, hi in runs:
            _ops(a).clip_scale_(a.grad[lo:hi], total_sq, max_norm)
        return None
    if kind == 2.0:
        total = math.sqrt(sum(_ops(a).sum_of_squares(a.grad[lo:hi]) for a, lo, hi in runs))
    else:
        total = max(_ops(a).max_abs(a.grad[lo:hi]) for a, lo, hi in runs)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for a, lo, hi in runs:
            _ops(a).scale_(a.grad[lo:hi], coef)
    return total
