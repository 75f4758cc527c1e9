"""gpubp.export: the ONNX graph, run by ONNX Runtime's CPU provider, against the model itself.

Two kinds of check, each for float32 and float64:

* one activation on a grid of z (a Dense(1, 1) layer with W = 1, b = 0, so z = x exactly):
  ONNX Runtime's a against the float64 spec f(z), within the accuracy contract's bound for
  one elementwise kernel (:func:`gpubp.accuracy.activation_bound` in float32,
  ``ELEMENTWISE["float64"]``), and against ``model.predict`` within ``MODEL``;
* whole models with random weights (every activation and several parameter values, batch
  sizes 1 and 7 on one session, several layers, Dropout) against ``model.predict`` within
  ``MODEL`` for the dtype.

The worst disagreement over all cases, per dtype, is printed when the module finishes
(``pytest -s``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="gpubp.export needs onnx (pip install 'gpubp[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the exported graphs are run with onnxruntime (pip install 'gpubp[onnx]')")

import gpubp as gp  # noqa: E402
from gpubp import accuracy, export  # noqa: E402
from gpubp.activations import NAMES, Activation  # noqa: E402
from gpubp.layers import Layer  # noqa: E402
from tests import conftest  # noqa: E402

DTYPES = ("float32", "float64")

# Every activation with its defaults, and several values of each parameter: slopes and alphas
# on both sides of 1 (and 0, and a negative slope), softplus thresholds that the grid and the
# random z cross, and a small beta (where log1p matters).
CASES = [Activation(n) for n in NAMES] + [
    Activation("leaky_relu", slope=0.2),
    Activation("leaky_relu", slope=1.5),
    Activation("leaky_relu", slope=-0.3),
    Activation("elu", alpha=0.3),
    Activation("elu", alpha=2.5),
    Activation("elu", alpha=0.0),
    Activation("softplus", beta=2.0, threshold=1.0),
    Activation("softplus", beta=0.5, threshold=3.0),
    Activation("softplus", beta=1.0, threshold=-1.5),
    Activation("softplus", beta=0.05, threshold=0.2),
]
GELUS = [Activation("gelu"), Activation("gelu_tanh")]
# Only gelu and gelu_tanh depend on the opset (native Gelu from 20): they run at each of these.
OPSETS = (export.MIN_OPSET, export.DEFAULT_OPSET, 20, 21)

# z for the grid: dense over [-12, 12], both sides of 0 near it, and far out (where exp and
# the cube in gelu_tanh overflow, and softplus's threshold 20 is crossed).
GRID = np.concatenate([
    np.linspace(-12.0, 12.0, 1201),
    [0.0, 1e-30, -1e-30, 1e-8, -1e-8, 1e-4, -1e-4, 19.9, 20.1, 40.0, -40.0, 100.0, -100.0, 1e4, -1e4, 1e8, -1e8],
])

# The worst disagreement seen, per (reference, dtype): max |diff|, max over cases of
# max |diff| / max |want| (accuracy.rel_err), and max |diff| / allowed.
WORST: dict[tuple[str, str], dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    for (ref, dt), w in sorted(WORST.items()):
        print(f"\nONNX Runtime vs {ref}, {dt}: max |diff| {w['abs']:.3g}, max |diff| / max |want| {w['rel']:.3g}, "
              f"max |diff| / allowed {w['of_bound']:.3g}")


def _session(proto_or_path):
    src = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else proto_or_path
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _check(got, want, dtype: str, allowed, ref: str = "model.predict") -> None:
    """|got - want| <= allowed elementwise; records the worst disagreement with ``ref`` for the dtype."""
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype) and got.shape == np.shape(want)
    g, w = got.astype(np.float64), np.asarray(want, dtype=np.float64)
    err = np.abs(g - w)
    allowed = np.broadcast_to(allowed, err.shape)
    worst = WORST.setdefault((ref, dtype), {"abs": 0.0, "rel": 0.0, "of_bound": 0.0})
    worst["abs"] = max(worst["abs"], float(err.max()))
    worst["rel"] = max(worst["rel"], accuracy.rel_err(g, w))
    with np.errstate(divide="ignore", invalid="ignore"):  # allowed 0 where want is 0: err must be too
        worst["of_bound"] = max(worst["of_bound"], float(np.max(np.where(err > 0, err / allowed, 0.0))))
    bad = ~(err <= allowed)  # NaN fails
    if bad.any():
        i = np.unravel_index(int(np.argmax(np.where(bad, err - allowed, -np.inf))), err.shape)
        raise AssertionError(f"{int(bad.sum())} of {err.size} elements off; worst at {i}: got {g[i]!r}, "
                             f"want {w[i]!r}, allowed {allowed[i]:.3g}")


def _model_tol(want, dtype: str):
    tol = accuracy.MODEL[dtype]
    return tol.atol + tol.rtol * np.abs(np.asarray(want, dtype=np.float64))


def _unit_model(act: Activation, dtype: str) -> gp.Sequential:
    """Dense(1, 1, act) with W = 1, b = 0: the model's output is act(x), z = x exactly."""
    model = gp.Sequential(gp.Dense(1, 1, act), dtype=dtype)
    w, b = model.parameters()
    w.data[...] = 1.0
    b.data[...] = 0.0
    return model


def _run_grid(act: Activation, dtype: str, opset: int | None) -> None:
    model = _unit_model(act, dtype)
    x = GRID.astype(dtype)[:, None]
    got = _session(export.to_onnx_model(model, opset)).run(None, {"input": x})[0]
    spec = act.forward(x.astype(np.float64))  # the float64 spec at the same z
    if dtype == "float32":
        allowed = accuracy.activation_bound(spec, x)
    else:
        tol = accuracy.ELEMENTWISE["float64"]
        allowed = tol.atol + tol.rtol * np.abs(spec)
    _check(got, spec, dtype, allowed, ref="the float64 spec")
    want = model.predict(x)
    _check(got, want, dtype, _model_tol(want, dtype))


def _id(case) -> str:
    return repr(case).removeprefix("Activation(").removesuffix(")").replace("'", "").replace(" ", "")


def test_every_activation_has_an_export():
    assert set(export.ACTIVATIONS) == set(NAMES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", CASES, ids=_id)
def test_activation_on_a_grid(act, dtype):
    if act.name == "softplus":  # the grid crosses the threshold: both branches are checked
        bz = GRID.astype(dtype) * np.dtype(dtype).type(act.params["beta"])
        assert (bz > act.params["threshold"]).any() and (bz <= act.params["threshold"]).any()
    _run_grid(act, dtype, None)


@pytest.mark.parametrize("opset", [o for o in OPSETS if o != export.DEFAULT_OPSET])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", GELUS, ids=_id)
def test_gelu_at_each_opset(act, dtype, opset):
    proto = export.to_onnx_model(_unit_model(act, dtype), opset)
    native = dtype == "float32" and opset >= 20
    assert ("Gelu" in {n.op_type for n in proto.graph.node}) is native
    _run_grid(act, dtype, opset)


def _switch_allowance(act: Activation, x: np.ndarray, model: gp.Sequential, dtype: str) -> np.ndarray | float:
    """Softplus jumps by log1p(e^-threshold) / beta where beta z crosses the threshold: where rounding
    may put z on either side (as accuracy.near_kink marks a kink), that jump is allowed."""
    if act.name != "softplus":
        return 0.0
    w, b = (p.data.astype(np.float64) for p in model.parameters())
    h = x.astype(np.float64)
    beta, thr = act.params["beta"], act.params["threshold"]
    radius = accuracy.KINK_C * accuracy.unit_roundoff(dtype) * beta * (np.abs(h) @ np.abs(w) + np.abs(b))
    near = np.abs(beta * (h @ w + b) - thr) <= radius
    return near * (math.log1p(math.exp(-thr)) / beta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", CASES, ids=_id)
def test_random_layer_batches_1_and_7(act, dtype):
    """One session, batch 1 then batch 7: the batch axis is dynamic."""
    model = gp.Sequential(gp.Dense(6, 5, act), dtype=dtype, seed=3)
    b = model.parameters()[1]
    b.data[...] = np.linspace(-0.5, 0.5, 5)  # a non-zero bias, so the Gemm's C input is checked
    rng = np.random.default_rng(7)
    session = _session(export.to_onnx_model(model))
    for n in (1, 7):
        x = (2.0 * rng.standard_normal((n, 6))).astype(dtype)
        got = session.run(None, {"input": x})[0]
        want = model.predict(x)
        _check(got, want, dtype, _model_tol(want, dtype) + _switch_allowance(act, x, model, dtype))


def _deep_model(dtype: str, seed: int = 0) -> gp.Sequential:
    return gp.Sequential(
        gp.Dense(8, 16, "relu"),
        gp.Dropout(0.5),
        gp.Dense(16, 16, Activation("elu", alpha=0.7)),
        gp.Dense(16, 12, "gelu"),
        gp.Dropout(0.2),
        gp.Dense(12, 12, Activation("leaky_relu", slope=0.1)),
        gp.Dense(12, 10, "silu"),
        gp.Dense(10, 8, "tanh"),
        gp.Dense(8, 6, "gelu_tanh"),
        gp.Dense(6, 6, "sigmoid"),
        gp.Dense(6, 3),
        dtype=dtype,
        seed=seed,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_model_with_dropout(dtype, tmp_path):
    """Eleven layers, two of them Dropout (no node in the graph), trained a few steps first."""
    model = _deep_model(dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(dtype)
    y = rng.integers(0, 3, 64)
    model.fit(x, y, "cross_entropy", "adam", epochs=2, batch_size=16, verbose=0)
    proto = export.to_onnx_model(model)
    ops = [n.op_type for n in proto.graph.node]
    assert "Dropout" not in ops and ops.count("Gemm") == 9
    session = _session(proto)
    for n in (1, 7, 64):
        xb = x[:n]
        got = session.run(None, {"input": xb})[0]
        want = model.predict(xb)
        _check(got, want, dtype, _model_tol(want, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_file_checks_and_round_trips(dtype, tmp_path):
    model = _deep_model(dtype, seed=5)
    path = tmp_path / "model.onnx"
    assert export.to_onnx(model, path) == str(path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets == {"": export.DEFAULT_OPSET}
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    assert json.loads({p.key: p.value for p in proto.metadata_props}["gpubp.config"]) == model.config()
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for v, width in ((proto.graph.input[0], model.in_features), (proto.graph.output[0], model.out_features)):
        assert v.type.tensor_type.elem_type == elem
        dims = v.type.tensor_type.shape.dim
        assert (dims[0].dim_param, dims[1].dim_value) == ("batch", width)
    # The weights are gpubp's, bit for bit, laid out (in, out).
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for p in model.parameters():
        np.testing.assert_array_equal(inits[p.name], p.data)
        assert inits[p.name].dtype == np.dtype(dtype)
    x = np.random.default_rng(2).standard_normal((7, 8)).astype(dtype)
    got = _session(str(path)).run(None, {"input": x})[0]
    want = model.predict(x)
    _check(got, want, dtype, _model_tol(want, dtype))


def test_opset_is_checked():
    model = gp.Sequential(gp.Dense(2, 2, "gelu"))
    newest = onnx.defs.onnx_opset_version()
    for bad in (export.MIN_OPSET - 1, newest + 1, 0, -17):
        with pytest.raises(ValueError, match="opset"):
            export.to_onnx_model(model, bad)
    for bad in ("17", 17.0, True):
        with pytest.raises(TypeError, match="opset"):
            export.to_onnx_model(model, bad)
    for good in (export.MIN_OPSET, newest, np.int64(18)):
        proto = export.to_onnx_model(model, good)
        assert [(o.domain, o.version) for o in proto.opset_import] == [("", int(good))]


class _Scale(Layer):
    """A layer gpubp runs but the exporter does not know."""

    def forward(self, x, training=True):
        return 2 * x

    def config(self):
        return {"type": "Scale"}

    def __repr__(self):
        return "Scale()"


def test_what_cannot_be_exported_is_refused(tmp_path):
    with pytest.raises(TypeError, match="model: expected a gpubp.Sequential"):
        export.to_onnx_model("not a model")
    model = gp.Sequential(gp.Dense(3, 4, "relu"), _Scale(), gp.Dense(4, 2))
    with pytest.raises(ValueError, match=r"layers\[1\] \(Scale\(\)\): cannot be exported"):
        export.to_onnx(model, tmp_path / "m.onnx")
    assert not os.path.exists(tmp_path / "m.onnx")
    model = gp.Sequential(gp.Dense(3, 4, "relu"), gp.Dense(4, 2))
    model.layers[1].activation = type("Fake", (), {"name": "swish", "params": {}})()
    with pytest.raises(ValueError, match=r"layers\[1\] .*'swish' has no ONNX export"):
        export.to_onnx_model(model)
    model = gp.Sequential(gp.Dense(3, 2))
    with pytest.raises(FileNotFoundError, match="path"):
        export.to_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match="path"):
        export.to_onnx(model, 3)
    with pytest.raises(ValueError, match="path"):
        export.to_onnx(model, tmp_path)


def test_parameters_on_a_device_are_copied_through_the_backend(monkeypatch):
    """A model on the CUDA backend (the simulator where there is no GPU) exports from the host
    copy its backend makes: its parameters are never read as if they were host arrays."""
    device = "cudasim" if conftest.CUDA_MODE == "simulator" else "cuda"
    model = gp.Sequential(gp.Dense(4, 5, "tanh"), gp.Dense(5, 2), device=device, seed=1)
    backend = model.arena.backend
    copied = []
    real = backend.to_numpy

    def to_numpy(a):
        copied.append(a)
        return real(a)

    monkeypatch.setattr(backend, "to_numpy", to_numpy)
    proto = export.to_onnx_model(model)
    assert any(a is model.arena.data for a in copied)
    monkeypatch.undo()
    x = np.random.default_rng(4).standard_normal((7, 4)).astype(np.float32)
    got = _session(proto).run(None, {"input": x})[0]
    want = model.predict(x)
    _check(got, want, "float32", _model_tol(want, "float32"))


def _elementwise(build, x: np.ndarray) -> np.ndarray:
    """Run ``build(graph, "x") -> output name`` of export's graph builder on x (1-D) in x's dtype."""
    g = export._Graph(onnx, x.dtype, export.DEFAULT_OPSET)
    out = build(g, "x")
    elem = onnx.helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = onnx.helper.make_graph(
        g.nodes + [onnx.helper.make_node("Identity", [out], ["y"])], "t",
        [onnx.helper.make_tensor_value_info("x", elem, ["n"])], [onnx.helper.make_tensor_value_info("y", elem, ["n"])],
        initializer=g.initializers)
    opsets = [onnx.helper.make_opsetid("", export.DEFAULT_OPSET)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=onnx.helper.find_min_ir_version_for(opsets))
    return _session(proto).run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_expm1_and_log1p_keep_their_relative_accuracy(dtype):
    """The compensated forms are within a few ulp of NumPy's expm1 / log1p, also where e^x - 1 and
    log(1 + e) would cancel (|x|, e down to 1e-30)."""
    ulp = np.finfo(dtype).eps
    tiny = np.geomspace(1e-30, 1.0, 400)
    x = np.concatenate([-tiny, -np.linspace(1.0, 60.0, 200), [0.0, -800.0]]).astype(dtype)
    want = np.expm1(x.astype(np.float64))
    got = _elementwise(lambda g, v: g.expm1(v), x)
    _check(got, want, dtype, 4 * ulp * np.abs(want), ref="expm1")
    e = np.concatenate([tiny, np.linspace(1.0, 2.0, 50), [0.0]]).astype(dtype)
    want = np.log1p(e.astype(np.float64))
    got = _elementwise(lambda g, v: g.log1p(v), e)
    _check(got, want, dtype, 4 * ulp * np.abs(want), ref="log1p")


def test_float64_erf_from_chebyshev_series():
    """The float64 graph's erf (ONNX Runtime has no float64 Erf) against math.erf, absolute."""
    x = np.concatenate([np.linspace(-8.0, 8.0, 20001), [1e-300, -1e-300, 1e-8, 30.0, -30.0, 1e300, -1e300]])
    want = np.array([math.erf(v) for v in x])
    got = _elementwise(lambda g, v: g.erf(v), x)
    _check(got, want, "float64", 2e-15, ref="math.erf")


# The README's ONNX example (marked <!-- example: onnx-export -->), as it stands there.
README_EXAMPLE = """\
import os
import tempfile

import numpy as np
import onnxruntime as ort

import gpubp as gp

model = gp.Sequential(gp.Dense(4, 16, "gelu"), gp.Dropout(0.1), gp.Dense(16, 3), seed=0)
x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
with tempfile.TemporaryDirectory() as folder:
    path = gp.export.to_onnx(model, os.path.join(folder, "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = session.run(None, {"input": x})[0]  # (5, 3); any batch size
np.testing.assert_allclose(y, model.predict(x), **gp.accuracy.MODEL["float32"].kw())
"""


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- example: onnx-export -->\s*```python\n(.*?)```", readme, re.S)
    if m is not None:  # once the README shows it, it must be this code
        assert m.group(1) == README_EXAMPLE
    exec(compile(README_EXAMPLE, "README.md:onnx-export", "exec"), {})
