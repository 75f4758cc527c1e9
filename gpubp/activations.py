"""The activation table: name -> id, formula, reference f(z) and f'(z).

Each activation is a pair: ``forward(z) -> a`` and ``backward(da, z, a) -> dz``
with ``dz = da * f'(z)``. What backward needs from the forward pass is explicit
in ``Activation.saves``: ``"z"`` (the pre-activation), ``"a"`` (the output,
enough for sigmoid and tanh), or nothing (identity). A dense layer keeps exactly
that for its backward pass, and the CUDA kernels mirror this table by ``id``.

All formulas are written to stay finite for any finite z (|z| up to 1e4 and
beyond): exponentials only ever see non-positive arguments.

| name       | f(z)                                          | f'(z)                                   |
|------------|-----------------------------------------------|-----------------------------------------|
| identity   | z                                             | 1                                       |
| relu       | max(z, 0)                                     | 1 if z > 0 else 0                       |
| leaky_relu | z if z > 0 else slope*z        (slope 0.01)   | 1 if z > 0 else slope                   |
| elu        | z if z > 0 else alpha*(e^z - 1) (alpha 1.0)   | 1 if z > 0 else alpha*e^z               |
| sigmoid    | 1 / (1 + e^-z)                                | a (1 - a)                               |
| tanh       | tanh z                                        | 1 - a^2                                 |
| gelu       | z Phi(z) = z/2 (1 + erf(z/sqrt 2))            | Phi(z) + z phi(z)                       |
| gelu_tanh  | z/2 (1 + tanh(k (z + c z^3))), k=sqrt(2/pi), c=0.044715 | 1/2 (1+t) + z/2 (1-t^2) k (1 + 3c z^2) |
| silu       | z sigmoid(z)                                  | s (1 + z (1 - s)), s = sigmoid(z)       |
| softplus   | log(1 + e^(beta z))/beta, z where beta z > threshold (beta 1, threshold 20) | sigmoid(beta z), 1 where beta z > threshold |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubp._special import erf

Array = Any

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = 0.044715


def sigmoid(z: Array) -> Array:
    """Stable logistic: e = exp(-|z|) <= 1, s = 1/(1+e) for z >= 0 and e/(1+e) below."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def _c(z: Array, v: float) -> Any:
    """A Python constant as a scalar of z's dtype (keeps float32 maths in float32)."""
    return z.dtype.type(v)


# --- forward / backward pairs -------------------------------------------------------------
# Each backward gets (da, z, a, params) and returns dz = da * f'(z).


def _identity_f(z, p):
    return z.copy()


def _identity_b(da, z, a, p):
    return da.copy()


def _relu_f(z, p):
    return np.maximum(z, _c(z, 0.0))


def _relu_b(da, z, a, p):
    return np.where(z > 0, da, _c(da, 0.0))


def _leaky_relu_f(z, p):
    return np.where(z > 0, z, z * _c(z, p["slope"]))


def _leaky_relu_b(da, z, a, p):
    return np.where(z > 0, da, da * _c(da, p["slope"]))


def _elu_f(z, p):
    # expm1 of min(z, 0): exact near 0, never overflows.
    return np.where(z > 0, z, _c(z, p["alpha"]) * np.expm1(np.minimum(z, _c(z, 0.0))))


def _elu_b(da, z, a, p):
    return np.where(z > 0, da, da * _c(z, p["alpha"]) * np.exp(np.minimum(z, _c(z, 0.0))))


def _sigmoid_f(z, p):
    return sigmoid(z)


def _sigmoid_b(da, z, a, p):
    return da * a * (_c(a, 1.0) - a)


def _tanh_f(z, p):
    return np.tanh(z)


def _tanh_b(da, z, a, p):
    return da * (_c(a, 1.0) - a * a)


def _gelu_f(z, p):
    return _c(z, 0.5) * z * (_c(z, 1.0) + erf(z * _c(z, _INV_SQRT_2)))


def _gelu_b(da, z, a, p):
    cdf = _c(z, 0.5) * (_c(z, 1.0) + erf(z * _c(z, _INV_SQRT_2)))
    zc = np.clip(z, _c(z, -40.0), _c(z, 40.0))  # phi(40) = 0 in float64 already; z*z cannot overflow
    pdf = _c(z, _INV_SQRT_2PI) * np.exp(_c(z, -0.5) * zc * zc)
    return da * (cdf + z * pdf)


def _gelu_tanh_inner(z):
    # u = k (z + c z^3); clip z so z^3 cannot overflow (tanh is +-1 long before |z| = 1e6).
    zc = np.clip(z, _c(z, -1e6), _c(z, 1e6))
    return _c(z, _SQRT_2_OVER_PI) * (zc + _c(z, _GELU_C) * zc * zc * zc), zc


def _gelu_tanh_f(z, p):
    u, _ = _gelu_tanh_inner(z)
    return _c(z, 0.5) * z * (_c(z, 1.0) + np.tanh(u))


def _gelu_tanh_b(da, z, a, p):
    u, zc = _gelu_tanh_inner(z)
    t = np.tanh(u)
    du = _c(z, _SQRT_2_OVER_PI) * (_c(z, 1.0) + _c(z, 3.0 * _GELU_C) * zc * zc)
    return da * (_c(z, 0.5) * (_c(z, 1.0) + t) + _c(z, 0.5) * z * (_c(z, 1.0) - t * t) * du)


def _silu_f(z, p):
    return z * sigmoid(z)


def _silu_b(da, z, a, p):
    s = sigmoid(z)
    return da * s * (_c(z, 1.0) + z * (_c(z, 1.0) - s))


def _softplus_f(z, p):
    beta, thr = _c(z, p["beta"]), _c(z, p["threshold"])
    bz = beta * z
    # log(1 + e^bz) = max(bz, 0) + log1p(e^-|bz|): no overflow for any bz.
    soft = (np.maximum(bz, _c(z, 0.0)) + np.log1p(np.exp(-np.abs(bz)))) / beta
    return np.where(bz > thr, z, soft)


def _softplus_b(da, z, a, p):
    bz = _c(z, p["beta"]) * z
    return np.where(bz > _c(z, p["threshold"]), da, da * sigmoid(bz))


# --- scalar bodies: one element's f and f' for the compiled kernels --------------------------
# Each maker takes ``k``, the compiled helpers of gpubp.backends.scalar_math (``k.cst(like, v)``:
# the constant v in like's dtype; ``k.sigmoid``: the stable logistic), and returns plain Python
# ``f(z, p0, p1) -> a`` and ``df(z, a, p0, p1) -> f'(z)``, which scalar_math compiles with
# numba.njit (CPU), numba.cuda.jit (GPU) or leaves as Python (the CUDA simulator). p0, p1 are
# ``Spec.packs`` in z's dtype. Operation by operation the NumPy pair above; sigmoid and tanh's
# df read only a, the others only z. Exponentials only see non-positive arguments.
_GELU_CLIP = 1e6  # z^3 stays finite; tanh(u) is +-1 long before
_GELU_PDF_CLIP = 40.0  # phi(40) is 0 already; z^2 cannot overflow


def _identity_s(k):
    def f(z, p0, p1):
        return z

    def df(z, a, p0, p1):
        return k.cst(z, 1.0)

    return f, df


def _relu_s(k):
    def f(z, p0, p1):
        zero = k.cst(z, 0.0)
        return zero if z < zero else z  # max(z, 0), NaN passes through

    def df(z, a, p0, p1):
        return k.cst(z, 1.0) if z > k.cst(z, 0.0) else k.cst(z, 0.0)

    return f, df


def _leaky_relu_s(k):
    def f(z, p0, p1):
        return z if z > k.cst(z, 0.0) else z * p0

    def df(z, a, p0, p1):
        return k.cst(z, 1.0) if z > k.cst(z, 0.0) else p0

    return f, df


def _elu_s(k):
    def f(z, p0, p1):
        zero = k.cst(z, 0.0)
        return z if z > zero else p0 * math.expm1(min(z, zero))

    def df(z, a, p0, p1):
        zero = k.cst(z, 0.0)
        return k.cst(z, 1.0) if z > zero else p0 * math.exp(min(z, zero))

    return f, df


def _sigmoid_s(k):
    def f(z, p0, p1):
        return k.sigmoid(z)

    def df(z, a, p0, p1):
        return a * (k.cst(a, 1.0) - a)

    return f, df


def _tanh_s(k):
    def f(z, p0, p1):
        return math.tanh(z)

    def df(z, a, p0, p1):
        return k.cst(a, 1.0) - a * a

    return f, df


def _gelu_s(k):
    def f(z, p0, p1):
        return k.cst(z, 0.5) * z * (k.cst(z, 1.0) + math.erf(z * k.cst(z, _INV_SQRT_2)))

    def df(z, a, p0, p1):
        # Phi(z) + z phi(z); phi on z clipped to +-40
        half = k.cst(z, 0.5)
        cdf = half * (k.cst(z, 1.0) + math.erf(z * k.cst(z, _INV_SQRT_2)))
        zc = min(max(z, k.cst(z, -_GELU_PDF_CLIP)), k.cst(z, _GELU_PDF_CLIP))
        pdf = k.cst(z, _INV_SQRT_2PI) * math.exp(-half * zc * zc)
        return cdf + z * pdf

    return f, df


def _gelu_tanh_s(k):
    def f(z, p0, p1):
        # u = k (z + c z^3) on z clipped to +-1e6
        zc = min(max(z, k.cst(z, -_GELU_CLIP)), k.cst(z, _GELU_CLIP))
        u = k.cst(z, _SQRT_2_OVER_PI) * (zc + k.cst(z, _GELU_C) * zc * zc * zc)
        return k.cst(z, 0.5) * z * (k.cst(z, 1.0) + math.tanh(u))

    def df(z, a, p0, p1):
        # 1/2 (1 + t) + z/2 (1 - t^2) k (1 + 3c z^2), t = tanh(u)
        one = k.cst(z, 1.0)
        half = k.cst(z, 0.5)
        zc = min(max(z, k.cst(z, -_GELU_CLIP)), k.cst(z, _GELU_CLIP))
        u = k.cst(z, _SQRT_2_OVER_PI) * (zc + k.cst(z, _GELU_C) * zc * zc * zc)
        t = math.tanh(u)
        du = k.cst(z, _SQRT_2_OVER_PI) * (one + k.cst(z, 3.0 * _GELU_C) * zc * zc)
        return half * (one + t) + half * z * (one - t * t) * du

    return f, df


def _silu_s(k):
    def f(z, p0, p1):
        return z * k.sigmoid(z)

    def df(z, a, p0, p1):
        one = k.cst(z, 1.0)
        s = k.sigmoid(z)
        return s * (one + z * (one - s))

    return f, df


def _softplus_s(k):
    def f(z, p0, p1):
        # log(1 + e^bz)/beta = (max(bz, 0) + log1p(e^-|bz|))/beta; z itself above the threshold
        bz = p0 * z
        if bz > p1:
            return z
        return (max(bz, k.cst(z, 0.0)) + math.log1p(math.exp(-abs(bz)))) / p0

    def df(z, a, p0, p1):
        bz = p0 * z
        return k.cst(z, 1.0) if bz > p1 else k.sigmoid(bz)

    return f, df


# --- the PyTorch twins (torch.nn modules; the benchmark and gpubp.torch_interop use them) ------


def _torch(name: str, **fixed: Any) -> Callable[[Any, dict[str, float]], Any]:
    """A factory ``(nn, params) -> nn.<name>(...)``: ``fixed`` keyword values, plus the parameters
    renamed ``{torch_kwarg: gpubp_param}`` (given as ``_from={...}``)."""
    renamed = fixed.pop("_from", {})

    def make(nn: Any, params: dict[str, float]) -> Any:
        return getattr(nn, name)(**fixed, **{k: params[v] for k, v in renamed.items()})

    return make


@dataclass(frozen=True)
class Spec:
    """One row of the table (the activation kind, before parameters are chosen).

    ``packs``: the parameters the compiled kernels take, in order, as (p0, p1) (scalar_math's
    activation maths and the CUDA C header read slope / alpha / beta as p0, threshold as p1).
    ``scalar``: ``(helpers) -> (f, df)``, the scalar bodies the Numba kernels compile.
    ``torch``: ``(torch.nn, params) -> module``, the PyTorch twin; None for the identity."""

    id: int
    saves: str  # "z", "a" or "" (what backward needs from forward)
    init: str  # "he" (ReLU family) or "glorot"
    defaults: dict[str, float]
    forward: Callable[..., Array]
    backward: Callable[..., Array]
    scalar: Callable[[Any], tuple[Callable, Callable]] = _identity_s
    packs: tuple[str, ...] = ()
    torch: Callable[[Any, dict[str, float]], Any] | None = None


TABLE: dict[str, Spec] = {
    "identity": Spec(0, "", "glorot", {}, _identity_f, _identity_b),
    "relu": Spec(1, "z", "he", {}, _relu_f, _relu_b, _relu_s, (), _torch("ReLU")),
    "leaky_relu": Spec(2, "z", "he", {"slope": 0.01}, _leaky_relu_f, _leaky_relu_b, _leaky_relu_s, ("slope",),
                       _torch("LeakyReLU", _from={"negative_slope": "slope"})),
    "elu": Spec(3, "z", "he", {"alpha": 1.0}, _elu_f, _elu_b, _elu_s, ("alpha",), _torch("ELU", _from={"alpha": "alpha"})),
    "sigmoid": Spec(4, "a", "glorot", {}, _sigmoid_f, _sigmoid_b, _sigmoid_s, (), _torch("Sigmoid")),
    "tanh": Spec(5, "a", "glorot", {}, _tanh_f, _tanh_b, _tanh_s, (), _torch("Tanh")),
    "gelu": Spec(6, "z", "he", {}, _gelu_f, _gelu_b, _gelu_s, (), _torch("GELU", approximate="none")),
    "gelu_tanh": Spec(7, "z", "he", {}, _gelu_tanh_f, _gelu_tanh_b, _gelu_tanh_s, (), _torch("GELU", approximate="tanh")),
    "silu": Spec(8, "z", "he", {}, _silu_f, _silu_b, _silu_s, (), _torch("SiLU")),
    "softplus": Spec(9, "z", "he", {"beta": 1.0, "threshold": 20.0}, _softplus_f, _softplus_b, _softplus_s, ("beta", "threshold"),
                     _torch("Softplus", _from={"beta": "beta", "threshold": "threshold"})),
}

NAMES: tuple[str, ...] = tuple(TABLE)


@dataclass(frozen=True)
class Activation:
    """An activation function with its parameters, e.g. ``Activation("leaky_relu", slope=0.1)``.

    ``forward(z)`` returns a = f(z); ``backward(da, z, a)`` returns dz = da * f'(z),
    reading only what ``saves`` names (the other argument may be None).
    """

    name: str
    params: dict[str, float] = field(default_factory=dict)

    def __init__(self, name: str = "identity", **params: float) -> None:
        if not isinstance(name, str):
            raise TypeError(f"activation: expected a name (str) or Activation, got {type(name).__name__}")
        key = name.strip().lower()
        if key not in TABLE:
            raise ValueError(f"activation: unknown name {name!r}; expected one of {', '.join(NAMES)}")
        spec = TABLE[key]
        unknown = set(params) - set(spec.defaults)
        if unknown:
            allowed = ", ".join(spec.defaults) or "none"
            raise ValueError(f"activation {key!r}: unknown parameter(s) {sorted(unknown)}; allowed: {allowed}")
        merged = dict(spec.defaults)
        for k, v in params.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"activation {key!r}: {k} must be a finite number, got {v!r}")
            merged[k] = float(v)
        if key == "softplus" and merged["beta"] <= 0:
            raise ValueError(f"activation 'softplus': beta must be > 0, got {merged['beta']}")
        if key == "elu" and merged["alpha"] < 0:
            raise ValueError(f"activation 'elu': alpha must be >= 0, got {merged['alpha']}")
        object.__setattr__(self, "name", key)
        object.__setattr__(self, "params", merged)

    @property
    def spec(self) -> Spec:
        return TABLE[self.name]

    @property
    def id(self) -> int:
        return self.spec.id

    @property
    def saves(self) -> str:
        return self.spec.saves

    def forward(self, z: Array) -> Array:
        return self.spec.forward(z, self.params)

    def backward(self, da: Array, z: Array | None, a: Array | None) -> Array:
        return self.spec.backward(da, z, a, self.params)

    def packed(self) -> tuple[float, float]:
        """(p0, p1): the parameters as the compiled kernels take them (see ``Spec.packs``), 0.0 where unused."""
        vals = [self.params[k] for k in self.spec.packs]
        return (vals + [0.0, 0.0])[0], (vals + [0.0, 0.0])[1]

    def to_torch(self, nn: Any) -> Any:
        """The ``torch.nn`` module computing this activation (``nn`` is torch.nn); None for the identity."""
        make = self.spec.torch
        return None if make is None else make(nn, self.params)

    def gain(self) -> float:
        """He gain sqrt(2 / (1 + slope^2)) for the ReLU family (slope 0 but for leaky_relu), 1 otherwise."""
        if self.spec.init != "he":
            return 1.0
        slope = self.params.get("slope", 0.0)
        return math.sqrt(2.0 / (1.0 + slope * slope))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items() if v != self.spec.defaults[k])
        return f"Activation({self.name!r}{extra})"


def get(activation: str | Activation | None) -> Activation:
    """Resolve ``None`` (identity), a name, or an :class:`Activation`."""
    if activation is None:
        return Activation("identity")
    if isinstance(activation, Activation):
        return activation
    return Activation(activation)
