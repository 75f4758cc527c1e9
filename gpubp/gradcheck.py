"""Gradient checks: analytic backward passes against float64 central differences.

For a function y = f(inputs) (a layer's output, a loss value, or a model's
loss), two checks compare the backward pass with finite differences taken on a
float64 copy of the same computation:

- ``"full"``: the whole Jacobian dy/d(input), one central difference
  (f(p + eps e_j) - f(p - eps e_j)) / 2 eps per input element against one
  backward pass per output element. Exact coverage; for small shapes.
- ``"directional"``: one random direction u over all inputs at once and one
  random output weighting v: v^T J u from the backward pass (sum over inputs of
  <dL/dinput, u>, with L = <v, y>) against v . (f(p + eps u) - f(p - eps u)) / 2 eps.
  Cheap at any size and catches most errors.

A third check, :func:`check_precision`, compares a float32 Dense layer's backward under a mixed
precision (gpubp.precision) with the exact float64 gradient, element by element, against the
bound the accuracy contract derives for that layer (gpubp.accuracy: mixed_dot_error_bound,
store_error_bound).

The backward pass runs in the checked dtype (float32 or float64); the finite
differences always run in float64, so a float32 check measures the float32
backward against the exact derivative. An element passes when
|got - want| <= atol + rtol * |want|, with (atol, rtol) from :data:`TOLERANCES`
for the checked dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubp import losses as losses_mod
from gpubp import precision as precision_mod
from gpubp.accuracy import (
    GRADCHECK,
    Tolerance,
    activation_bound,
    dot_error_bound,
    mixed_dot_error_bound,
    store_error_bound,
)
from gpubp.backends import backend_of
from gpubp.layers import Dense
from gpubp.model import Sequential

EPS = 1e-6  # central-difference step, in float64: truncation O(eps^2), rounding O(1e-16 / eps)


# The tolerances are the accuracy contract's (gpubp.accuracy.GRADCHECK): float64 far above
# the finite-difference error itself (~1e-10 at eps 1e-6); float32 covering the rounding of a
# backward pass over dot products of length up to a few hundred.
TOLERANCES: dict[str, Tolerance] = GRADCHECK


@dataclass
class Check:
    """The comparison of one input's derivatives (or of one directional derivative)."""

    name: str
    mode: str
    max_abs_err: float
    max_rel_err: float
    worst_index: tuple[int, ...]
    got: float
    want: float
    passed: bool


@dataclass
class Report:
    """Every :class:`Check` of one case; ``passed`` when all passed."""

    case: str
    dtype: str
    tolerance: Tolerance
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_abs_err(self) -> float:
        return max((c.max_abs_err for c in self.checks), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((c.max_rel_err for c in self.checks), default=0.0)

    def worst(self) -> Check:
        return max(self.checks, key=lambda c: (not c.passed, c.max_abs_err))

    def __str__(self) -> str:
        tol = self.tolerance
        lines = [f"gradcheck {self.case} [{self.dtype}, atol={tol.atol:g}, rtol={tol.rtol:g}]: "
                 f"{'pass' if self.passed else 'FAIL'}"]
        for c in self.checks:
            lines.append(
                f"  {c.name:<14} {c.mode:<11} max abs {c.max_abs_err:.3e}  max rel {c.max_rel_err:.3e}  "
                f"worst at {c.worst_index}: got {c.got:.9g} want {c.want:.9g}  {'ok' if c.passed else 'FAIL'}"
            )
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GradcheckError(str(self))


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with finite differences."""


def _compare(name: str, mode: str, got: np.ndarray, want: np.ndarray, tol: Tolerance,
             index_of: Callable[[int], tuple[int, ...]], scale: np.ndarray | None = None) -> Check:
    """Elementwise |got - want| <= atol + rtol * scale, scale = |want| unless given."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    err = np.abs(got - want)
    bound = tol.atol + tol.rtol * (np.abs(want) if scale is None else np.asarray(scale).reshape(-1))
    ok = (err <= bound) & np.isfinite(got)  # a NaN or Inf gradient fails
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = np.where(ok, err / bound, np.inf)
        rel = err / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
    k = int(np.argmax(ratio))
    return Check(
        name=name,
        mode=mode,
        max_abs_err=float(np.max(err)),  # NaN when any element is NaN
        max_rel_err=float(np.max(rel)),
        worst_index=index_of(k),
        got=float(got[k]),
        want=float(want[k]),
        passed=bool(ok.all()),
    )


def check_function(
    forward64: Callable[[], np.ndarray],
    inputs64: dict[str, np.ndarray],
    backward: Callable[[np.ndarray], dict[str, np.ndarray]],
    out_shape: tuple[int, ...],
    *,
    case: str,
    dtype: str,
    mode: str = "both",
    eps: float = EPS,
    seed: int = 0,
    tolerance: Tolerance | None = None,
) -> Report:
    """Check ``backward`` against central differences of ``forward64``.

    Args:
        forward64: evaluates y (``out_shape``) in float64 from the current
            contents of ``inputs64`` (which this function perturbs in place and restores).
        inputs64: name -> float64 array, the differentiated inputs.
        backward: given v (``out_shape``), returns name -> dL/d(input) for
            L = <v, y>, computed by the code under test in ``dtype``.
        mode: ``"full"``, ``"directional"`` or ``"both"``.
    """
    if mode not in ("full", "directional", "both"):
        raise ValueError(f"mode: expected 'full', 'directional' or 'both', got {mode!r}")
    if not eps > 0:
        raise ValueError(f"eps: expected a number > 0, got {eps!r}")
    for name, x in inputs64.items():
        if x.dtype != np.float64 or not x.flags.c_contiguous or not x.flags.writeable:
            raise ValueError(f"inputs64[{name!r}]: expected a writeable C-contiguous float64 array")
    tol = tolerance or TOLERANCES[dtype]
    report = Report(case=case, dtype=dtype, tolerance=tol)
    n_out = int(np.prod(out_shape, dtype=np.int64))
    if mode in ("full", "both"):
        analytic = {name: np.empty((n_out, x.size)) for name, x in inputs64.items()}
        for k in range(n_out):
            v = np.zeros(n_out)
            v[k] = 1.0
            grads = backward(v.reshape(out_shape))
            for name in inputs64:
                analytic[name][k] = np.asarray(grads[name], dtype=np.float64).reshape(-1)
        for name, x in inputs64.items():
            flat = x.reshape(-1)  # a view: perturbing it perturbs the input
            numeric = np.empty((n_out, x.size))
            for j in range(x.size):
                orig = flat[j]
                flat[j] = orig + eps
                plus = np.asarray(forward64(), dtype=np.float64).reshape(-1)
                flat[j] = orig - eps
                minus = np.asarray(forward64(), dtype=np.float64).reshape(-1)
                flat[j] = orig
                numeric[:, j] = (plus - minus) / (2 * eps)
            shape = x.shape

            def index_of(i: int, shape=shape) -> tuple[int, ...]:
                out_k, in_j = divmod(i, int(np.prod(shape, dtype=np.int64)))
                idx = tuple(int(t) for t in np.unravel_index(in_j, shape))
                return tuple(int(t) for t in np.unravel_index(out_k, out_shape)) + idx if n_out > 1 else idx

            report.checks.append(_compare(name, "full", analytic[name], numeric, tol, index_of))
    if mode in ("directional", "both"):
        rng = np.random.default_rng(seed)
        v = rng.standard_normal(out_shape)
        u = {name: rng.standard_normal(x.shape) for name, x in inputs64.items()}
        grads = backward(v)
        terms = [np.asarray(grads[n], dtype=np.float64) * u[n] for n in inputs64]
        got = float(sum(np.sum(t) for t in terms))
        # The sum may cancel: its rounding error scales with sum |g_i u_i|, not with |v^T J u|.
        magnitude = float(sum(np.sum(np.abs(t)) for t in terms))
        saved = {name: x.copy() for name, x in inputs64.items()}
        for name, x in inputs64.items():
            x += eps * u[name]
        plus = float(np.sum(v * forward64()))
        for name, x in inputs64.items():
            x[...] = saved[name] - eps * u[name]
        minus = float(np.sum(v * forward64()))
        for name, x in inputs64.items():
            x[...] = saved[name]
        want = (plus - minus) / (2 * eps)
        report.checks.append(_compare("v^T J u", "directional", np.array([got]), np.array([want]), tol,
                                      lambda i: (), scale=np.array([max(abs(want), magnitude)])))
    return report


def _host(a: Any) -> np.ndarray:
    """A host (NumPy) copy of an array of any backend."""
    backend = backend_of(a)
    return np.array(backend.to_numpy(a) if backend is not None else a, dtype=np.float64)


def _random_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def check_layer(layer: Dense, x: Any = None, *, batch: int = 3, mode: str = "both", eps: float = EPS,
                seed: int = 0, dtype: str = "float64") -> Report:
    """Check one Dense layer's backward (dx, dW, db) against finite differences of its forward.

    A layer that is not yet part of a model is placed in a one-layer model of
    ``dtype`` (initialised from ``seed``); a layer inside a model is checked in
    its model's dtype, and its gradients are overwritten. ``x`` defaults to a
    standard-normal (batch, in_features) array drawn from ``seed``.
    """
    if not isinstance(layer, Dense):
        raise TypeError(f"layer: expected a Dense layer, got {type(layer).__name__}")
    if layer.weight is None:
        Sequential(layer, dtype=dtype, seed=seed)
    dt = layer.weight.data.dtype
    x64 = np.array(_random_input((batch, layer.in_features), seed + 1) if x is None else x, dtype=np.float64, order="C")
    twin = Dense.from_config(layer.config())
    Sequential(twin, dtype="float64", seed=seed)
    inputs64 = {"x": x64, "weight": twin.weight.data, "bias": twin.bias.data}
    twin.weight.data[...] = _host(layer.weight.data)
    twin.bias.data[...] = _host(layer.bias.data)
    x_dt = x64.astype(dt)

    def forward64() -> np.ndarray:
        return twin.forward(inputs64["x"], training=False)

    def backward(v: np.ndarray) -> dict[str, np.ndarray]:
        layer.forward(x_dt, training=True)
        dx = layer.backward(v.astype(dt), need_dx=True)
        return {"x": _host(dx), "weight": _host(layer.weight.grad), "bias": _host(layer.bias.grad)}

    return check_function(forward64, inputs64, backward, (x64.shape[0], layer.out_features),
                          case=f"{layer!r} batch {x64.shape[0]}", dtype=dt.name, mode=mode, eps=eps, seed=seed)


def check_loss(loss: str | losses_mod.Loss, pred: Any, target: Any, *, mode: str = "both", eps: float = EPS,
               seed: int = 0, dtype: str = "float64", sample_weight: Any = None) -> Report:
    """Check a loss's gradient dL/dpred against finite differences of its value (with row weights
    ``sample_weight``, the weighted loss)."""
    loss = losses_mod.get(loss)
    pred64 = np.array(pred, dtype=np.float64, order="C")
    inputs64 = {"pred": pred64}

    def forward64() -> np.ndarray:
        return np.array(loss(inputs64["pred"], target, sample_weight)[0])

    def backward(v: np.ndarray) -> dict[str, np.ndarray]:
        _, g = loss(pred64.astype(dtype), target, sample_weight)
        return {"pred": g * float(v)}

    weighted = "" if sample_weight is None else ", weighted"
    return check_function(forward64, inputs64, backward, (), case=f"{loss!r} pred {pred64.shape}{weighted}",
                          dtype=np.dtype(dtype).name, mode=mode, eps=eps, seed=seed)


def check_model(model: Sequential, loss: str | losses_mod.Loss, x: Any, y: Any, *, mode: str = "both",
                eps: float = EPS, seed: int = 0, input_grad: bool = True) -> Report:
    """Check a whole model + loss: dL/d(every parameter) (and dL/dx) against finite differences.

    The backward pass runs in the model's dtype, on the model's device, and
    overwrites its gradients; the finite differences run on a float64 clone on the CPU.
    """
    loss = losses_mod.get(loss)
    twin = model.clone("float64", device="cpu")
    x64 = np.array(x, dtype=np.float64, order="C")
    inputs64 = {p.name: p.data for p in twin.parameters()}
    if input_grad:
        inputs64["x"] = x64

    def forward64() -> np.ndarray:
        # training=True: the twin applies the model's dropout masks (fixed outside fit) too.
        return np.array(loss(twin.forward(x64, training=True), y)[0])

    def backward(v: np.ndarray) -> dict[str, np.ndarray]:
        _, dout = loss(model.forward(x64.astype(model.dtype)), y)
        dx = model.backward(dout * model.dtype.type(float(v)), input_grad=input_grad)
        grads = {p.name: _host(p.grad) for p in model.parameters()}
        if input_grad:
            grads["x"] = _host(dx)
        return grads

    acts = "-".join(layer.activation.name if hasattr(layer, "activation") else repr(layer) for layer in model.layers)
    return check_function(forward64, inputs64, backward, (),
                          case=f"model[{acts}] + {loss.name} x {x64.shape}", dtype=model.dtype.name,
                          mode=mode, eps=eps, seed=seed)


def _variation(act: Any, saved: np.ndarray, delta: np.ndarray, saves: str) -> np.ndarray:
    """max |f'(s +- delta) - f'(s)| in float64, f' read from the saved z or a as the activation does."""
    def fprime(v: np.ndarray) -> np.ndarray:
        return np.asarray(act.backward(np.ones_like(v), v if saves == "z" else None, v if saves == "a" else None))
    base = fprime(saved)
    return np.maximum(np.abs(fprime(saved + delta) - base), np.abs(fprime(saved - delta) - base))


def precision_bounds(layer: Dense, x: np.ndarray, da: np.ndarray, precision: Any) -> dict[str, np.ndarray]:
    """The contract's per-element bounds on |gradient under ``precision`` - exact float64 gradient| of
    a Dense layer at x (float64), da (float64) and the layer's weights: name -> bound ("x", "weight",
    "bias"). Forward: z = R_g(x) R_g(W) + b errs by mixed_dot_error_bound, the saved z or a by that
    plus one store rounding; dz by |da| times f' 's variation over that interval (a kink inside it
    counts whole) plus float32 libm; then the backward GEMMs' own mixed_dot_error_bound and dx's
    store rounding."""
    p = precision_mod.get(precision)
    w, b = _host(layer.weight.data), _host(layer.bias.data)
    act = layer.activation
    n, k = x.shape
    m = w.shape[1]
    ax, aw = np.abs(x), np.abs(w)
    z = x @ w + b
    z_err = mixed_dot_error_bound(ax @ aw + np.abs(b), k + 1, p.gemm,
                                  ax.sum(axis=1, keepdims=True) + aw.sum(axis=0) + np.abs(b))
    a = act.forward(z)
    if act.saves == "z":
        var = _variation(act, z, z_err + store_error_bound(np.abs(z) + z_err, p.store), "z")
    elif act.saves == "a":
        slope = np.abs(act.backward(np.ones_like(z), z, a)) + 1.0
        a_err = slope * z_err + activation_bound(a, z) + store_error_bound(np.abs(a) + slope * z_err, p.store)
        var = _variation(act, a, a_err, "a")
    else:
        var = np.zeros_like(z)
    dz = act.backward(da, z, a)
    dz_allow = np.abs(da) * var + activation_bound(dz, z, da)
    dz_big = np.abs(dz) + dz_allow
    dw = mixed_dot_error_bound(ax.T @ dz_big, n, p.gemm, ax.sum(axis=0)[:, None] + dz_big.sum(axis=0)) + ax.T @ dz_allow
    db = dot_error_bound(dz_big.sum(axis=0), n) + dz_allow.sum(axis=0)
    dx_pre = (mixed_dot_error_bound(dz_big @ aw.T, m, p.gemm, dz_big.sum(axis=1, keepdims=True) + aw.sum(axis=1))
              + dz_allow @ aw.T)
    dx = dx_pre + store_error_bound(np.abs(dz @ w.T) + dx_pre, p.store)
    return {"x": dx, "weight": dw, "bias": db}


def check_precision(layer: Dense, precision: Any = None, x: Any = None, *, batch: int = 3, seed: int = 0) -> Report:
    """Check a float32 Dense layer's backward (dx, dW, db) under ``precision`` (default: the layer's
    own ``precision``) against the exact float64 gradient of the same layer at the same x, W, b and
    da, element by element within :func:`precision_bounds`. x (float32-representable) and da are
    standard normal, drawn from ``seed`` unless x is given; da is rounded to the store type (it
    would arrive rounded from the next layer). A layer outside a model is placed in a float32 one."""
    if not isinstance(layer, Dense):
        raise TypeError(f"layer: expected a Dense layer, got {type(layer).__name__}")
    if layer.weight is None:
        Sequential(layer, dtype="float32", seed=seed)
    p = precision_mod.check_dtype(layer.precision if precision is None else precision, layer.weight.data.dtype)
    rng = np.random.default_rng(seed + 1)
    x32 = np.array(rng.standard_normal((batch, layer.in_features)) if x is None else x, dtype=np.float32, order="C")
    da32 = precision_mod.round_to(np, rng.standard_normal((x32.shape[0], layer.out_features)).astype(np.float32),
                                  p.store)
    x64, da64 = x32.astype(np.float64), da32.astype(np.float64)
    w64, b64 = _host(layer.weight.data), _host(layer.bias.data)
    act = layer.activation
    z = x64 @ w64 + b64
    dz = act.backward(da64, z, act.forward(z))
    want = {"x": dz @ w64.T, "weight": x64.T @ dz, "bias": dz.sum(axis=0)}
    bounds = precision_bounds(layer, x64, da64, p)
    before = layer.precision
    layer.precision = p
    try:
        backend = layer.weight.arena.backend  # the backend the layer's parameters live on
        layer.forward(backend.asarray(x32, np.float32), training=True)
        dx = layer.backward(backend.asarray(da32, np.float32), need_dx=True)
    finally:
        layer.precision = before
    got = {"x": _host(dx), "weight": _host(layer.weight.grad), "bias": _host(layer.bias.grad)}
    report = Report(case=f"{layer!r} batch {x32.shape[0]} {p.name}", dtype="float32", tolerance=Tolerance(0.0, 1.0))
    for name in ("x", "weight", "bias"):
        shape = want[name].shape
        report.checks.append(_compare(name, p.name, got[name], want[name], report.tolerance,
                                      lambda i, shape=shape: tuple(int(t) for t in np.unravel_index(i, shape)),
                                      scale=bounds[name]))
    return report
