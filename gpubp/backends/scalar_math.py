"""The scalar maths of the Numba kernels, written once as plain Python functions.

One element's worth of each computation: the activations f and f' (by table id,
with their parameters p0/p1), the stable sigmoid, what every element-wise loss's
scalar term is made of (``cst``, ``sigmoid``, ``wide``; the terms themselves live with
their losses, in ``gpubp/losses/<name>.py``) and what every optimizer's scalar body
is made of (``mul``, ``l2``, ``lerp``; the bodies themselves live with their
optimizers, in ``gpubp/optim/<name>.py``). Loss terms and optimizer bodies are
compiled with a build of this module as their ``ops``. They take and return
scalars, in the dtype of their inputs, and use only what plain Python, ``numba.njit``
and ``numba.cuda.jit(device=True)`` all compile: ``math`` functions,
``min``/``max``/``abs``, ``np.float64()`` (see ``wide``) and ``type(x)(value)`` (a
constant in x's dtype, so float32 maths stays float32).

:func:`build` compiles them for a target, as minitorch compiles its scalar
operators::

    build()                                            # plain Python (the CUDA simulator, tests)
    build(numba.njit(inline="always"))                 # a CPU backend
    build(cuda.jit(device=True, inline="always"), mul) # the CUDA kernels (numba_cuda, numba_cuda_optim)

and returns a module-like namespace (kernels call ``dm.act_f(...)``; Numba
resolves a module attribute at compile time).

``mul`` is the one target-specific piece: a product rounded on its own, never
fused with a following add into one FMA, so a device update rounds exactly as
NumPy does. On the CPU (no fast-math) and in Python ``a * b`` is that product;
on a GPU the compiler contracts ``a * b + c`` unless the product is the
round-to-nearest intrinsic (libdevice ``fmul_rn``/``dmul_rn``), which
``numba_cuda`` supplies. The activation maths uses plain ``*`` (contraction
allowed; they are checked against the spec with a tolerance), the optimizer
maths only ``mul``.

Every expression here is in the order of the NumPy reference it mirrors
(``gpubp.activations``, ``gpubp.losses``, ``gpubp.optim.rule``), operation by
operation; the tests check the compiled functions against them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import numpy as np

# TABLE: the rows whose scalar bodies build() compiles; the GELU constants for numba_cpu's fast GELU.
from gpubp.activations import _GELU_PDF_CLIP, _INV_SQRT_2, _INV_SQRT_2PI, TABLE  # noqa: F401

__all__ = ["build", "product", "ACT_IDS", "PLAIN"]

# Activation ids, read from the table (compiled code freezes globals, so these are constants).
IDENTITY = TABLE["identity"].id
RELU = TABLE["relu"].id
LEAKY_RELU = TABLE["leaky_relu"].id
ELU = TABLE["elu"].id
SIGMOID = TABLE["sigmoid"].id
TANH = TABLE["tanh"].id
GELU = TABLE["gelu"].id
GELU_TANH = TABLE["gelu_tanh"].id
SILU = TABLE["silu"].id
SOFTPLUS = TABLE["softplus"].id
ACT_IDS = {name: spec.id for name, spec in TABLE.items()}

# The functions :func:`build` returns, by name.
FUNCTIONS = (
    "mul", "cst", "wide", "sigmoid", "act_f", "act_df", "act_grad",
    "l2", "lerp", "clip_coef",
)  # fmt: skip


def product(a: Any, b: Any) -> Any:
    """a * b, rounded once: the plain product (Python, NumPy, the CPU without fast-math)."""
    return a * b


def _dispatch(jit: Callable, act_id: int, body: Any, rest: Any, arity: int) -> Any:
    """``fn(id, *args)``: ``body(*args)`` where id == act_id, else ``rest(id, *args)`` (the first row,
    ``rest`` None, answers every id: the identity). ``arity`` counts id and args (4 for f, 5 for df);
    written out per arity because Numba compiles no ``*args`` forwarding on the GPU."""
    if rest is None:
        if arity == 4:
            def first4(i, z, p0, p1):
                return body(z, p0, p1)

            return jit(first4)

        def first5(i, z, a, p0, p1):
            return body(z, a, p0, p1)

        return jit(first5)
    if arity == 4:
        def level4(i, z, p0, p1):
            if i == act_id:
                return body(z, p0, p1)
            return rest(i, z, p0, p1)

        return jit(level4)

    def level5(i, z, a, p0, p1):
        if i == act_id:
            return body(z, a, p0, p1)
        return rest(i, z, a, p0, p1)

    return jit(level5)


def build(jit: Callable[[Callable], Any] | None = None, mul: Any = None, wide: Any = None) -> types.ModuleType:
    """The scalar functions compiled with ``jit`` (None: plain Python), as a module-like namespace.

    ``mul(a, b)``: the unfused product for the optimizer maths; None compiles :func:`product`.
    ``wide(x)``: x as a float64, for the loss value terms (the namespace's ``wide``). None: ``float``
    in plain Python (the Numba CUDA simulator passes it too: its kernels run as Python threads, where
    NumPy scalars would warn on overflow outside the caller's ``np.errstate``, unlike a GPU) and
    ``np.float64`` when compiled (Numba compiles ``float()`` of a float32 to a float32).
    """
    if wide is None:
        wide = float if jit is None else np.float64
    if jit is None:

        def jit(fn: Callable) -> Callable:
            return fn

    if mul is None:
        mul = jit(product)

    @jit
    def cst(like, value):
        """The Python number ``value`` as a scalar of like's type."""
        return type(like)(value)

    @jit
    def sigmoid(x):
        """Stable logistic: e = exp(-|x|) <= 1; 1/(1+e) for x >= 0, e/(1+e) below."""
        one = cst(x, 1.0)
        e = math.exp(-abs(x))
        if x >= cst(x, 0.0):
            return one / (one + e)
        return e / (one + e)

    # --- activations: each row's scalar bodies (gpubp.activations), compiled here and chained
    # into act_f / act_df by table id. p0, p1: the row's packed parameters in z's dtype.
    helpers = types.ModuleType("activation_helpers")  # a module: Numba reads its attributes when compiling
    helpers.cst, helpers.sigmoid = cst, sigmoid
    # The identity (the table's first row) answers any id no other row claims; the others are tested
    # in table order (relu first), each level wrapping the ones after it.
    specs = list(TABLE.values())
    act_f = act_df = None
    for spec in [specs[0], *reversed(specs[1:])]:
        f, df = spec.scalar(helpers)
        act_f = _dispatch(jit, spec.id, jit(f), act_f, 4)
        act_df = _dispatch(jit, spec.id, jit(df), act_df, 5)

    @jit
    def act_grad(act_id, g, saved, p0, p1):
        """dz = g * f'(z), with ``saved`` what the activation saves: a for sigmoid/tanh, else z.

        Identity passes g; relu passes g or 0 exactly (np.where(z > 0, da, 0): an inf or
        NaN g below zero gives 0).
        """
        if act_id == IDENTITY:
            return g
        if act_id == RELU:
            return g if saved > cst(g, 0.0) else cst(g, 0.0)
        return g * act_df(act_id, saved, saved, p0, p1)

    # --- optimizer helpers (gpubp.optim.rule's spec helpers, operation by operation; every
    # product is mul). Hyper-parameters arrive rounded to the data dtype; flags are integers.

    @jit
    def l2(d, p, wd):
        """L2 weight decay folded into the gradient: d + wd * p."""
        return mul(p, wd) + d

    @jit
    def lerp(start, end, w, one_minus_w, high):
        """gpubp.optim.rule.lerp_: start + w (end - start), or end - (1 - w)(end - start) when |w| >= 0.5."""
        diff = end - start
        if high:
            return end - mul(diff, one_minus_w)
        return start + mul(diff, w)

    @jit
    def clip_coef(total_sq, max_norm):
        """optim.clip_grad_norm's factor, in float64: max_norm / (sqrt(total) + 1e-6)."""
        return max_norm / (math.sqrt(total_sq) + 1e-6)

    namespace = locals()
    built = types.ModuleType("scalar_math_built", "scalar_math functions compiled for one target")
    for name in FUNCTIONS:
        setattr(built, name, namespace[name])
    return built


#: The plain-Python build (what the simulator's device functions amount to).
PLAIN = build()
