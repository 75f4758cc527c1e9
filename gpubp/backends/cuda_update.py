"""The CUDA backends' one optimizer update: a generic Numba CUDA kernel around a rule's scalar body.

:func:`kernel` builds, once per (rule, flags, written buffers), a grid-stride element-wise
kernel (``numba_cuda.elementwise``) that loads an element of p, g and the rule's state buffers
(:data:`~gpubp.optim.rule.MAX_STATE` of them; an absent one is ``g``, read and never written),
calls the rule's scalar body and stores the results: one launch per flat run of the arena.
The body is ``rule.scalar`` built with ``numba_cuda.dm``, whose ``mul`` is libdevice's
round-to-nearest product, so no product is fused with an add into an FMA (checked on the PTX
by ``python -m gpubp.tools.numba_ptx`` for every rule, see :func:`ptx_targets`): the update
rounds as the NumPy spec does. The flags are closure constants of the kernel.

The scalars come as a tuple argument (``hp.scalars``), or, in a recorded step, as a device array
of the data dtype (``hp_device``: the step's cell, refreshed by a copy before the launch, so a new
learning rate needs no new kernel or graph): the same kernel, specialised for an array argument
(the scalar bodies unpack ``hp`` as a tuple or as an array alike); the same values, the same bits.

``guard`` (a 1-element int64 array) is read on the device: while guard[0] != 0 the kernel
writes nothing, and the host never waits to find out. Under the simulator the same body runs
as plain Python. Launches are counted with ``numba_cuda_optim``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numba import cuda

from gpubp.backends import numba_cuda_optim as nbo
from gpubp.backends.cuda_arrays import FLOAT_DTYPES, _arr, _check, _one
from gpubp.backends.numba_cuda import dm, elementwise, launch_stream
from gpubp.backends.rows import MAX_STATE

__all__ = ["kernel", "update", "ptx_targets"]

_BODIES: dict[str, Any] = {}


def _body(rule: Any) -> Any:
    fn = _BODIES.get(rule.name)
    if fn is None:
        fn = _BODIES[rule.name] = cuda.jit(device=True, inline="always")(rule.scalar(dm))
    return fn


@functools.cache
def _kernel(rule: Any, flags: tuple, live: tuple) -> Any:
    step = _body(rule)
    w0, w1, w2 = live

    def update(i, args):
        p, g, s0, s1, s2, hp, guard = args
        if guard[0] != 0:
            return
        pi, a, b, c = step(p[i], g[i], s0[i], s1[i], s2[i], hp, flags)
        if w0:
            s0[i] = a
        if w1:
            s1[i] = b
        if w2:
            s2[i] = c
        p[i] = pi

    update.__name__ = update.__qualname__ = f"update_{rule.name}"
    return elementwise(update)


def kernel(rule: Any, flags: tuple, live: tuple) -> Any:
    """The kernel ``kernel(n, (p, g, s0, s1, s2, hp, guard))`` of ``rule`` under ``flags``, writing
    the state buffers ``live`` says (three booleans)."""
    return _kernel(rule, tuple(int(f) for f in flags), tuple(bool(x) for x in live))


_NO_GUARD: dict[int, Any] = {}


def _guard(guard: Any, like: Any) -> Any:
    """The guard a kernel reads: ``guard`` itself, or a 1-element zero (never written) on
    ``like``'s side when there is none (one per device, made once)."""
    if guard is not None:
        return _one(guard, "guard", np.dtype(np.int64))
    if isinstance(like, np.ndarray):
        return np.zeros(1, np.int64)
    dev = int(cuda.get_current_device().id)
    z = _NO_GUARD.get(dev)
    if z is None:
        z = _NO_GUARD[dev] = cuda.to_device(np.zeros(1, np.int64))
    return z


def update(rule: Any, p: Any, g: Any, state: tuple, hp: Any, guard: Any = None, *, stream: Any = 0,
           threads: int | None = None, max_blocks: int | None = None, hp_device: Any = None) -> None:
    """One step of ``rule`` over flat device arrays, in place (one launch; none for an empty run).

    ``state``: the rule's buffers in ``rule.state`` order (None where unused); ``hp``: the
    step's ``rule.pack`` (its scalars already in the arrays' dtype). Arrays are checked: 1-D,
    contiguous, one float dtype and one length. ``hp_device``: the scalars of ``hp`` as a 1-D
    array of the data dtype on the device, read by the kernel instead of ``hp.scalars`` (whose
    flags still choose the kernel)."""
    pa, ga = _arr(p, "p"), _arr(g, "g")
    live_state = rule.live(state, hp)
    arrays = {"p": pa, "g": ga}
    for name, a, used in zip(rule.state, state, live_state, strict=True):
        if used:
            arrays[name] = _arr(a, name)
    n, dt = _check(arrays)
    slots, live = rule.slots(tuple(arrays.get(k) for k in rule.state), hp, ga)
    if hp_device is None:
        scalars, key = tuple(dt.type(x) for x in hp.scalars), dt
    else:
        scalars, key = _arr(hp_device, "hp_device"), (dt, "hp on the device")
        if np.dtype(scalars.dtype) != dt or tuple(scalars.shape) != (len(hp.scalars),):
            raise ValueError(f"hp_device: expected {len(hp.scalars)} elements of {dt}, got "
                             f"{tuple(scalars.shape)} {scalars.dtype}")
    if n:
        t, b = nbo._shape(threads, max_blocks)
        args = (pa, ga, *slots, scalars, _guard(guard, pa))
        nbo._launch(kernel(rule, hp.flags, live), key, max(1, min(-(-n // t), b)), t, launch_stream(stream), n, args)


def ptx_targets(update_rules: Iterable[Any] = ()) -> list[tuple[str, Callable, tuple]]:
    """The update kernel of each rule of ``update_rules`` (gpubp.tools.numba_ptx passes every
    registered optimizer's), for each of its example flag sets and each float dtype, with the
    signatures it is launched with (see numba_cuda_optim.ptx_targets): the scalars as a tuple, and
    as a device array (``[<dtype>, hp on the device]``, a recorded step's)."""
    from numba import types

    rules = {rule.name: rule for rule in update_rules}
    out: list[tuple[str, Callable, tuple]] = []
    for dt in FLOAT_DTYPES:
        t = getattr(types, dt.name)
        arr = types.Array(t, 1, "C")
        for name, rule in rules.items():
            for k, example in enumerate(rule.examples):
                hp = rule.pack(example, 2, dt)
                live = _live3(rule, hp)
                fn = kernel(rule, hp.flags, live).py_func
                for how, scalars in (("", types.UniTuple(t, len(hp.scalars))), (", hp on the device", arr)):
                    sig = (types.int64, types.Tuple((arr,) * 5 + (scalars, types.Array(types.int64, 1, "C"))))
                    out.append((f"update_{name}{k}[{dt.name}{how}]", fn, sig))
    return out


def _live3(rule: Any, hp: Any) -> tuple[bool, ...]:
    used = tuple(bool(u) for u in rule.uses(hp.flags))
    return used + (False,) * (MAX_STATE - len(used))
