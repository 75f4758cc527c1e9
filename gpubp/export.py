"""ONNX export of a Sequential model, for inference in ONNX Runtime or any other ONNX runtime.

    import gpubp as gp
    gp.export.to_onnx(model, "model.onnx")          # opset 17 unless asked
    proto = gp.export.to_onnx_model(model)          # the onnx.ModelProto, nothing written

The graph computes ``model.predict``: input ``"input"`` (batch, in_features), output
``"output"`` (batch, out_features), both of the model's dtype (float32 or float64), the batch
axis dynamic (``"batch"``). Each Dense layer is one Gemm, Y = X @ W + b with W as gpubp keeps
it, (in, out) (transB = 0), named ``"<layer>.weight"`` and ``"<layer>.bias"`` like the model's
parameters; its activation follows as ONNX operators with the layer's own parameters. Dropout
is the identity at inference and has no node. The model's ``config()`` is kept in the file's
metadata (``"gpubp.config"``, JSON).

Activations, z the Gemm output (N, out); constants are scalars of the model's dtype:

| gpubp      | float32 graph                           | float64 graph                                      |
|------------|-----------------------------------------|----------------------------------------------------|
| identity   | (no node)                               | (no node)                                          |
| relu       | Relu                                    | Relu                                               |
| leaky_relu | LeakyRelu(alpha = slope)                | Where(z > 0, z, z slope)                           |
| elu        | Elu(alpha)                              | Where(z > 0, z, alpha expm1(min(z, 0)))            |
| sigmoid    | Sigmoid                                 | Sigmoid                                            |
| tanh       | Tanh                                    | Tanh                                               |
| gelu       | Gelu (opset >= 20), else z/2 (1 + Erf(z/sqrt 2)) | z/2 (1 + erf(z/sqrt 2)), erf from Chebyshev series |
| gelu_tanh  | Gelu(approximate="tanh") (opset >= 20), else z/2 (1 + Tanh(k (z + c z^3))) | z/2 (1 + Tanh(k (z + c z^3)))  |
| silu       | z Sigmoid(z)                            | z / (1 + Exp(-z))                                  |
| softplus   | Where(beta z > threshold, z, (Relu(beta z) + log1p(Exp(-|beta z|))) / beta) | the same          |

Why the float64 column differs: an ONNX attribute is a float32 (a float64 slope or alpha
would be rounded), and ONNX Runtime's CPU provider has no float64 kernel for LeakyRelu, Elu,
Erf (so none for Gelu either) or Softplus (onnxruntime 1.20 to 1.32), and up to 1.26 at
least it fuses z Sigmoid(z) into a QuickGelu that has none either. The float64 graph
therefore uses only operators that have one (Gemm, Relu, Sigmoid, Tanh, Exp, Log, Abs, Neg,
Add, Sub, Mul, Div, Min, Max, Equal, Less, Greater, Where), every constant a float64 scalar.
expm1 and log1p, which ONNX lacks, are built from Exp and Log with the usual compensation
(see :meth:`_Graph.expm1`, :meth:`_Graph.log1p`), so they keep their relative accuracy near 0.

Opsets: :data:`MIN_OPSET` (13) up to the installed onnx package's newest; ``None`` means
:data:`DEFAULT_OPSET` (17, of ONNX 1.12: ONNX Runtime reads it from 1.13 on, and so do most other
runtimes). The file's IR version is the oldest that carries the opset, so older runtimes read it too.

A model on a GPU is exported from a host copy of its parameters, made by the model's backend.
Protobuf limits a file without external data to 2 GiB: a model with more parameter bytes
than :data:`MAX_PARAMETER_BYTES` is refused.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp.layers import Dense, Dropout
from gpubp.model import Sequential

if TYPE_CHECKING:  # onnx is an optional dependency: imported when a graph is built
    import onnx

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "MAX_PARAMETER_BYTES", "to_onnx", "to_onnx_model"]

DEFAULT_OPSET = 17
MIN_OPSET = 13
# Protobuf's hard limit is 2 GiB for the whole message; leave room for the graph itself.
MAX_PARAMETER_BYTES = 2**31 - 2**24

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_AXIS = "batch"

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # the same constants as gpubp.activations
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_GELU_C = 0.044715


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError("gpubp.export needs the onnx package: pip install 'gpubp[onnx]' (or pip install onnx)") from e
    return onnx


def _check_opset(opset: Any, newest: int) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"opset: expected an int or None, got {type(opset).__name__}")
    if not MIN_OPSET <= int(opset) <= newest:
        raise ValueError(f"opset: expected {MIN_OPSET} to {newest} (the installed onnx package's newest), got {opset}")
    return int(opset)


# --- erf in float64 from elementwise operators --------------------------------------------
# erf(x) = x S(x^2) for |x| < 1, S(u) = erf(sqrt u) / sqrt u;
# erf(x) = sign(x) (1 - e^(-x^2) w F(w)) for |x| >= 1, w = 1/|x|, F(w) = x e^(x^2) erfc(x),
# with |x| clamped to 6: erfc(6) = 2.2e-17 is below half an ulp of 1, so 1 - erfc rounds to 1
# in float64 from there on (as math.erf gives). S on u in [0, 1] and F on w in [1/6, 1] are
# smooth; their Chebyshev interpolants of degree 10 and 20 (through math.erf / math.erfc at
# the Chebyshev points, computed once when first needed) are within ~1e-15 of them, and the
# erf they give is within ~1e-15 of math.erf everywhere (absolute; gelu needs no better:
# gpubp's own 1 + erf(x) has that absolute error too).
_ERF_SPLIT = 1.0
_ERF_CLAMP = 6.0
_ERF_DEGREES = (10, 20)


@functools.cache
def _erf_series() -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev coefficients of S(u), u = (t + 1)/2, and of F(w), w = 1/6 + (t + 1) 5/12, t in [-1, 1]."""
    cheb = np.polynomial.chebyshev
    lo = 1.0 / _ERF_CLAMP

    def s(t: np.ndarray) -> np.ndarray:  # Chebyshev points are interior: u > 0
        r = np.sqrt((t + 1.0) / 2.0)
        return np.array([math.erf(v) / v for v in r])

    def f(t: np.ndarray) -> np.ndarray:
        x = 1.0 / (lo + (t + 1.0) * (1.0 - lo) / 2.0)
        return np.array([v * math.exp(v * v) * math.erfc(v) for v in x])

    return cheb.chebinterpolate(s, _ERF_DEGREES[0]), cheb.chebinterpolate(f, _ERF_DEGREES[1])


# --- the graph builder ------------------------------------------------------------------------


class _Graph:
    """Nodes and initialisers of one graph; every op makes one node with one fresh output name."""

    def __init__(self, onnx: Any, dtype: np.dtype, opset: int) -> None:
        self.onnx = onnx
        self.dtype = dtype
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.scope = ""  # prefix of node names: the layer being built
        self._consts: dict[bytes, str] = {}
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{self.scope}{op_type}_{self._count}"
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def tensor(self, name: str, value: np.ndarray) -> str:
        arr = np.ascontiguousarray(value, dtype=self.dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def const(self, value: float) -> str:
        """A scalar initialiser of the graph's dtype (one per distinct value)."""
        v = np.asarray(value, dtype=self.dtype)
        key = v.tobytes()
        if key not in self._consts:
            self._consts[key] = self.tensor(f"const_{len(self._consts)}", v)
        return self._consts[key]

    # Arithmetic helpers; a Python float operand becomes a constant of the graph's dtype.
    def _in(self, x: str | float) -> str:
        return x if isinstance(x, str) else self.const(x)

    def add(self, a: str | float, b: str | float) -> str:
        return self.op("Add", self._in(a), self._in(b))

    def sub(self, a: str | float, b: str | float) -> str:
        return self.op("Sub", self._in(a), self._in(b))

    def mul(self, a: str | float, b: str | float) -> str:
        return self.op("Mul", self._in(a), self._in(b))

    def div(self, a: str | float, b: str | float) -> str:
        return self.op("Div", self._in(a), self._in(b))

    def where(self, cond: str, a: str | float, b: str | float) -> str:
        return self.op("Where", cond, self._in(a), self._in(b))

    def gt(self, a: str, b: str | float) -> str:
        return self.op("Greater", a, self._in(b))

    def lt(self, a: str, b: str | float) -> str:
        return self.op("Less", a, self._in(b))

    def expm1(self, x: str) -> str:
        """e^x - 1 for x <= 0 (Kahan): u = e^x; x where u == 1, else (u - 1) x / log u.

        Exact to a few ulp near 0, where e^x - 1 cancels. x is clamped to -40 first:
        e^-40 = 4e-18 rounds -1 + e^x to -1 in float32 and float64 alike, and log u
        stays finite (u = 0 below -745 would give (0 - 1) x / -inf = -0).
        """
        x = self.op("Max", x, self.const(-40.0))
        u = self.op("Exp", x)
        d = self.sub(u, 1.0)
        return self.where(self.op("Equal", u, self.const(1.0)), x, self.div(self.mul(d, x), self.op("Log", u)))

    def log1p(self, e: str) -> str:
        """log(1 + e) for e >= 0 (Goldberg): u = 1 + e; e where u == 1, else log(u) e / (u - 1).

        Exact to a few ulp near 0, where log(1 + e) loses the low bits of e.
        """
        u = self.add(e, 1.0)
        d = self.sub(u, 1.0)
        return self.where(self.gt(d, 0.0), self.div(self.mul(self.op("Log", u), e), d), e)

    def chebyshev(self, t: str, coeffs: np.ndarray) -> str:
        """sum_k c_k T_k(t) by Clenshaw: b_k = c_k + 2t b_(k+1) - b_(k+2); the sum is c_0 + t b_1 - b_2."""
        two_t = self.add(t, t)
        b1: str | None = None  # b_(k+1)
        b2: str | None = None  # b_(k+2)
        for c in coeffs[:0:-1]:  # c_n, ..., c_1
            b = self.const(float(c))
            if b1 is not None:
                b = self.add(b, self.mul(two_t, b1))
            if b2 is not None:
                b = self.sub(b, b2)
            b1, b2 = b, b1
        assert b1 is not None and b2 is not None  # degree >= 2
        return self.sub(self.add(self.const(float(coeffs[0])), self.mul(t, b1)), b2)

    def erf(self, x: str) -> str:
        """erf from elementwise operators (see the comment above _erf_series), for float64."""
        small_c, large_c = _erf_series()
        a = self.op("Abs", x)
        # |x| < 1: x S(x^2), t = 2 x^2 - 1 (x^2 clamped to 1: the other branch takes the rest).
        u = self.op("Min", self.mul(x, x), self.const(_ERF_SPLIT * _ERF_SPLIT))
        small = self.mul(x, self.chebyshev(self.sub(self.add(u, u), 1.0), small_c))
        # |x| >= 1: 1 - e^(-x^2) w F(w), w = 1/|x| with |x| in [1, 6], t = (w - 1/6) 12/5 - 1.
        ac = self.op("Min", self.op("Max", a, self.const(_ERF_SPLIT)), self.const(_ERF_CLAMP))
        w = self.div(1.0, ac)
        lo = 1.0 / _ERF_CLAMP
        t = self.sub(self.mul(w, 2.0 / (1.0 - lo)), 2.0 * lo / (1.0 - lo) + 1.0)
        tail = self.mul(self.mul(self.op("Exp", self.op("Neg", self.mul(ac, ac))), w), self.chebyshev(t, large_c))
        large = self.sub(1.0, tail)
        large = self.where(self.lt(x, 0.0), self.op("Neg", large), large)
        return self.where(self.lt(a, _ERF_SPLIT), small, large)


# --- activations: (graph, z, params) -> a ---------------------------------------------------


def _identity(g: _Graph, z: str, p: dict[str, float]) -> str:
    return z


def _relu(g: _Graph, z: str, p: dict[str, float]) -> str:
    return g.op("Relu", z)


def _leaky_relu(g: _Graph, z: str, p: dict[str, float]) -> str:
    if g.dtype == np.float32:  # the attribute is a float32: exactly the slope gpubp's float32 maths uses
        return g.op("LeakyRelu", z, alpha=float(np.float32(p["slope"])))
    return g.where(g.gt(z, 0.0), z, g.mul(z, p["slope"]))


def _elu(g: _Graph, z: str, p: dict[str, float]) -> str:
    if g.dtype == np.float32:
        return g.op("Elu", z, alpha=float(np.float32(p["alpha"])))
    return g.where(g.gt(z, 0.0), z, g.mul(p["alpha"], g.expm1(g.op("Min", z, g.const(0.0)))))


def _sigmoid(g: _Graph, z: str, p: dict[str, float]) -> str:
    return g.op("Sigmoid", z)


def _tanh(g: _Graph, z: str, p: dict[str, float]) -> str:
    return g.op("Tanh", z)


def _gelu(g: _Graph, z: str, p: dict[str, float]) -> str:
    if g.dtype == np.float32 and g.opset >= 20:
        return g.op("Gelu", z)
    x = g.mul(z, _INV_SQRT_2)
    erf = g.op("Erf", x) if g.dtype == np.float32 else g.erf(x)
    return g.mul(g.mul(0.5, z), g.add(1.0, erf))


def _gelu_tanh(g: _Graph, z: str, p: dict[str, float]) -> str:
    if g.dtype == np.float32 and g.opset >= 20:
        return g.op("Gelu", z, approximate="tanh")
    # u = k (z + c z^3). gpubp clips z to 1e6 before cubing only to keep NumPy from warning about
    # overflow; here z^3 = +-inf makes u = +-inf and tanh u = +-1, the same value.
    u = g.mul(_SQRT_2_OVER_PI, g.add(z, g.mul(g.mul(g.mul(_GELU_C, z), z), z)))
    return g.mul(g.mul(0.5, z), g.add(1.0, g.op("Tanh", u)))


def _silu(g: _Graph, z: str, p: dict[str, float]) -> str:
    if g.dtype == np.float32:
        return g.mul(z, g.op("Sigmoid", z))
    # z / (1 + e^-z), the same function (e^-z = inf gives -0 as z sigmoid(z) does). Not
    # z Sigmoid(z): onnxruntime 1.20 to 1.26 fuses that into its QuickGelu, which has no
    # float64 kernel, and refuses the model.
    return g.div(z, g.add(1.0, g.op("Exp", g.op("Neg", z))))


def _softplus(g: _Graph, z: str, p: dict[str, float]) -> str:
    # log(1 + e^bz) / beta = (max(bz, 0) + log1p(e^-|bz|)) / beta, z itself where bz > threshold.
    bz = g.mul(z, p["beta"])
    soft = g.div(g.add(g.op("Relu", bz), g.log1p(g.op("Exp", g.op("Neg", g.op("Abs", bz))))), p["beta"])
    return g.where(g.gt(bz, p["threshold"]), z, soft)


ACTIVATIONS: dict[str, Callable[[_Graph, str, dict[str, float]], str]] = {
    "identity": _identity,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "sigmoid": _sigmoid,
    "tanh": _tanh,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": _silu,
    "softplus": _softplus,
}


# --- the model ------------------------------------------------------------------------------


def to_onnx_model(model: Sequential, opset: int | None = None) -> onnx.ModelProto:
    """The ONNX model of ``model``'s inference graph (see the module's docstring); nothing written.

    Args:
        model: a :class:`gpubp.Sequential` of Dense and Dropout layers, on any device.
        opset: the ONNX opset, :data:`MIN_OPSET` to the installed onnx's newest;
            None for :data:`DEFAULT_OPSET`.

    Raises:
        TypeError: ``model`` is not a Sequential, or ``opset`` not an int.
        ValueError: ``opset`` out of range, a layer or activation that cannot be
            exported (named), or parameters too large for one protobuf file.
        ImportError: the onnx package is not installed.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    onnx = _onnx()
    opset = _check_opset(opset, onnx.defs.onnx_opset_version())
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Dense):
            if layer.activation.name not in ACTIVATIONS:
                raise ValueError(f"layers[{i}] ({layer!r}): activation {layer.activation.name!r} has no ONNX export; "
                                 f"exportable: {', '.join(ACTIVATIONS)}")
        elif not isinstance(layer, Dropout):
            raise ValueError(f"layers[{i}] ({layer!r}): cannot be exported to ONNX; expected Dense or Dropout layers")
    nbytes = model.num_parameters * model.dtype.itemsize
    if nbytes > MAX_PARAMETER_BYTES:
        raise ValueError(f"model: {nbytes:,} bytes of parameters exceed what one ONNX file without external data "
                         f"holds ({MAX_PARAMETER_BYTES:,} bytes)")

    from gpubp import __version__

    helper = onnx.helper
    host = model.arena.backend.to_numpy(model.arena.data)  # one host copy, wherever the arena lives
    g = _Graph(onnx, model.dtype, opset)
    h = INPUT_NAME
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, Dense):
            continue  # Dropout: the identity at inference
        g.scope = f"{i}/"
        w, b = layer.parameters()
        weight = g.tensor(w.name, host[w.offset : w.offset + w.size].reshape(w.shape))
        bias = g.tensor(b.name, host[b.offset : b.offset + b.size].reshape(b.shape))
        z = g.op("Gemm", h, weight, bias)  # Y = X @ W + b: W is (in, out), so no transB
        h = ACTIVATIONS[layer.activation.name](g, z, layer.activation.params)
    # The graph's output is the last node's output, renamed.
    for node in g.nodes:
        for k, name in enumerate(node.output):
            if name == h:
                node.output[k] = OUTPUT_NAME

    elem = helper.np_dtype_to_tensor_dtype(model.dtype)
    graph = helper.make_graph(
        g.nodes,
        "gpubp.Sequential",
        [helper.make_tensor_value_info(INPUT_NAME, elem, [BATCH_AXIS, model.in_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem, [BATCH_AXIS, model.out_features])],
        initializer=g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="gpubp", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets))
    proto.doc_string = repr(model)
    helper.set_model_props(proto, {"gpubp.config": json.dumps(model.config())})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def to_onnx(model: Sequential, path: str | os.PathLike[str], opset: int | None = None) -> str:
    """Write ``model``'s inference graph to ``path`` as an ONNX file and return ``path`` (a str).

    The file is written atomically (a temporary file in the same folder, then renamed), so a
    failure leaves any previous file in place. See :func:`to_onnx_model` for ``opset`` and what
    is refused, and the module's docstring for the graph.

    Raises:
        TypeError: ``path`` is not a str or os.PathLike (and see :func:`to_onnx_model`).
        FileNotFoundError: ``path``'s folder does not exist.
    """
    from gpubp.checkpoint_file import as_path

    p = as_path(path)
    if not p or os.path.isdir(p):
        raise ValueError(f"path: expected a file name, got {p!r}")
    folder = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path: the folder {folder!r} does not exist (create it first)")
    proto = to_onnx_model(model, opset)
    from gpubp.checkpoint_file import _write_atomic

    _write_atomic(p, proto.SerializeToString())
    return p
