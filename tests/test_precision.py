"""gpubp.precision: the rounding (round_to bit for bit against ml_dtypes' bfloat16 and NumPy's float16
casts, TF32 against a float64 rounding), the named precisions, the spec (numpy_ref under a precision)
against float64 within the accuracy contract's bounds, the layers' hand-over and gradcheck's check.
Every backend against the spec under a precision: tests/test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp as gp
from gpubp import accuracy, gradcheck
from gpubp import precision as P
from gpubp.activations import Activation
from gpubp.backends import numpy_ref

ml_dtypes = pytest.importorskip("ml_dtypes")


def _inputs() -> np.ndarray:
    """Random bit patterns (every exponent, NaNs and infinities among them), normal values at several
    scales, and the edges: ties at each kind's last bit, float16's overflow and subnormal boundaries."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7FC00000, 0x7F800001,
                        0xFF800001, 0x7FFFFFFF, 1, 0x80000001, 0x007FFFFF, 0x00800000], np.uint32).view(np.float32)
    edges = [65504, 65519, 65519.996, 65520, 65536, 1e6, 2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25,
             3 * 2.0**-25, 5 * 2.0**-25, 2.0**-14 * (1 - 2.0**-11), 2.0**-14 - 2.0**-25, 2.0**-26, 2.0**-126]
    for mant in (2.0**-8, 3 * 2.0**-8, 2.0**-11, 3 * 2.0**-11, 2.0**-9, 2.0**-12):  # ties and near-ties
        edges += [1 + mant, 1 + mant + 2.0**-23, 1 + mant - 2.0**-23]
    edges = np.array(edges, np.float32)
    ties = ((rng.integers(0, 2**32, size=20_000, dtype=np.uint64).astype(np.uint32) & np.uint32(0xFFFF0000))
            | np.uint32(0x8000)).view(np.float32)  # exactly half way between two bf16 values
    ties13 = ((rng.integers(0, 2**32, size=20_000, dtype=np.uint64).astype(np.uint32) & np.uint32(0xFFFFE000))
              | np.uint32(0x1000)).view(np.float32)  # half way between two tf32 / float16 values
    scales = np.concatenate([rng.standard_normal(20_000) * s for s in (1e-7, 1e-5, 1e-3, 1, 1e3, 6e4)])
    out = np.concatenate([bits.view(np.float32), special, edges, -edges, ties, ties13, scales.astype(np.float32)])
    return out


def _same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all(), f"{what}: NaN where it should not be, or a NaN lost"
    bad = (got.view(np.uint32) != want.view(np.uint32)) & ~nan
    assert not bad.any(), f"{what}: {int(bad.sum())} differ, e.g. {got[bad][:3]} vs {want[bad][:3]}"


def _tf32_reference(a: np.ndarray) -> np.ndarray:
    """Round to 10 explicit mantissa bits in float64: quantum 2^(e - 11) for a = m 2^e, 0.5 <= |m| < 1
    (float32's subnormal quantum scaled: e >= -125), ties to even (numpy.round), inf past float32's range."""
    with np.errstate(invalid="ignore", over="ignore"):  # signalling NaNs among the inputs
        x = a.astype(np.float64)
        finite = np.isfinite(x)
        _, e = np.frexp(np.where(finite, x, 1.0))
        q = np.ldexp(1.0, np.maximum(e, -125) - 11)
        r = np.where(finite, np.round(np.where(finite, x, 0.0) / q) * q, x)
        return r.astype(np.float32)


def test_round_to_bf16_is_ml_dtypes_cast():
    a = _inputs()
    with np.errstate(invalid="ignore", over="ignore"):
        want = a.astype(ml_dtypes.bfloat16).astype(np.float32)
    _same_bits(P.round_to(np, a, "bf16"), want, "bf16")


def test_round_to_fp16_is_numpy_float16_cast():
    a = _inputs()
    with np.errstate(invalid="ignore", over="ignore"):
        want = a.astype(np.float16).astype(np.float32)
    got = P.round_to(np, a, "fp16")
    _same_bits(got, want, "fp16")
    assert P.round_to(np, np.array([65519.99, 65520, -65520], np.float32), "fp16").tolist() == [65504, np.inf, -np.inf]
    assert P.round_to(np, np.array([2.0**-25, 1.0001 * 2.0**-25], np.float32), "fp16").tolist() == [0, 2.0**-24]


def test_round_to_tf32_is_the_float64_rounding():
    a = _inputs()
    _same_bits(P.round_to(np, a, "tf32"), _tf32_reference(a), "tf32")


def test_round_to_nan_inf_out_and_identity():
    a = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.2345678], np.float32)
    for kind in ("tf32", "bf16", "fp16"):
        r = P.round_to(np, a, kind)
        assert np.isnan(r[:2]).all() and np.signbit(r[1]) == np.signbit(a[1]) and r[2:4].tolist() == [np.inf, -np.inf]
        assert np.signbit(r[5]) and r[4] == 0
        assert (P.round_to(np, r, kind).view(np.uint32) == r.view(np.uint32)).all()  # idempotent, NaN too
        out = a.copy()
        assert P.round_to(np, out, kind, out=out) is out
        assert np.array_equal(out, r, equal_nan=True)
        two_d = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        assert np.array_equal(P.round_to(np, two_d.T, kind), P.round_to(np, two_d, kind).T)  # any layout
    assert P.round_to(np, a, None) is a and P.round_to(np, a, "fp32") is a
    with pytest.raises(TypeError, match="float32"):
        P.round_to(np, a.astype(np.float64), "bf16")
    with pytest.raises(ValueError, match="kind"):
        P.round_to(np, a, "fp8")


def test_named_precisions():
    assert P.PRECISIONS == ("fp32", "tf32", "bf16-mixed", "fp16-mixed")
    assert [(p.gemm, p.store) for p in map(P.get, P.PRECISIONS)] == [
        (None, None), ("tf32", None), ("bf16", "bf16"), ("fp16", "fp16")]
    assert P.get(None).name == "fp32" and P.get(P.get("tf32")) is P.get("tf32")
    assert P.active(None) is None and P.active("fp32") is None and P.active("bf16-mixed").store == "bf16"
    with pytest.raises(ValueError, match=r"precision.*bf16-mixed"):
        P.get("bf16")
    with pytest.raises(TypeError, match="precision"):
        P.get(16)
    assert [P.unit_roundoff(k) for k in ("fp32", "tf32", "bf16", "fp16")] == [2.0**-24, 2.0**-11, 2.0**-8, 2.0**-11]
    assert P.unit_roundoff(None) == 2.0**-24 and accuracy.KIND_ROUNDOFF["bf16"] == 2.0**-8
    assert P.check_dtype("bf16-mixed", "float32").name == "bf16-mixed"
    assert P.check_dtype("fp32", np.float64).name == "fp32"
    with pytest.raises(ValueError, match="precision.*float32"):
        P.check_dtype("tf32", "float64")
    with pytest.raises(dataclasses_error()):
        P.get("tf32").gemm = None


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_store_and_dot_bounds_hold_on_a_gemm():
    """The contract's bounds against float64 on a K = 512 GEMM of standard-normal inputs, each kind."""
    rng = np.random.default_rng(3)
    k = 512
    a = rng.standard_normal((64, k)).astype(np.float32)
    b = (rng.standard_normal((k, 48)) * 1e-3).astype(np.float32)  # small: fp16 subnormal products too
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b)
    margins = np.abs(a).sum(axis=1, keepdims=True, dtype=np.float64) + np.abs(b).sum(axis=0, dtype=np.float64)
    for g in (None, "tf32", "bf16", "fp16"):
        got = (P.round_to(np, a, g) @ P.round_to(np, b, g)).astype(np.float64)
        assert (np.abs(got - exact) <= accuracy.mixed_dot_error_bound(scale, k, g, margins)).all(), g
        stored = P.round_to(np, got.astype(np.float32), g).astype(np.float64)
        assert (np.abs(stored - got) <= accuracy.store_error_bound(got, g)).all(), g


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softplus"])
@pytest.mark.parametrize("precision", P.PRECISIONS)
def test_spec_against_float64_within_the_contract(precision, act):
    """numpy_ref's forward (a) and backward (via gradcheck.check_precision: dx, dW, db) under a precision
    against the exact float64 values of the unrounded inputs, within gpubp.accuracy's bounds."""
    p = P.get(precision)
    layer = gp.Dense(40, 24, Activation(act, slope=0.1) if act == "leaky_relu" else act)
    gp.Sequential(layer, dtype="float32", seed=5, device="cpu", dense_impl="reference")
    report = gradcheck.check_precision(layer, p, batch=16, seed=5)
    assert report.passed, report.worst()
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 40)).astype(np.float32)
    w, b = layer.weight.data, layer.bias.data
    a, _ = numpy_ref.dense_forward(x, w, b, layer.activation, False, p)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    z = x64 @ w64 + b
    ax, aw = np.abs(x64), np.abs(w64)
    z_err = accuracy.mixed_dot_error_bound(ax @ aw + np.abs(b), 41, p.gemm,
                                           ax.sum(axis=1, keepdims=True) + aw.sum(axis=0) + np.abs(b))
    want = layer.activation.forward(z)
    slope = np.abs(layer.activation.backward(np.ones_like(z), z, want)) + 1.0  # f' may jump inside z's interval
    pre = slope * z_err + accuracy.activation_bound(want, z)
    allow = pre + accuracy.store_error_bound(np.abs(want) + pre, p.store)
    assert (np.abs(a - want) <= allow).all()


def test_layers_hand_the_precision_to_the_backend():
    """Layer.precision defaults to None (no keyword at all); set, Dense and Dropout pass it on."""
    calls = []

    class Spy(type(numpy_ref.BACKEND)):
        def dense_forward(self, *args, **kw):
            calls.append(("dense_forward", kw.get("precision", "absent")))
            return super().dense_forward(*args, **kw)

        def dropout_forward(self, *args, **kw):
            calls.append(("dropout_forward", kw.get("precision", "absent")))
            return super().dropout_forward(*args, **kw)

    model = gp.Sequential(gp.Dense(4, 6, "relu"), gp.Dropout(0.5), gp.Dense(6, 2), dtype="float32", seed=0)
    assert all(layer.precision is None for layer in model.layers)
    spy = Spy()
    for layer in model.layers:
        layer._backend = spy
        layer.prepare(0, 0, 1, 0, True)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    model.layers[0].forward(x)
    assert calls == [("dense_forward", "absent")]
    bf16 = P.get("bf16-mixed")
    for layer in model.layers:
        layer.precision = bf16
    h = x
    for layer in model.layers:
        h = layer.forward(h)
    assert calls[1:] == [("dense_forward", bf16), ("dropout_forward", bf16), ("dense_forward", bf16)]
    assert (P.round_to(np, h, "bf16") == h).all()
    g = np.ones_like(h)
    for layer in reversed(model.layers):
        g = layer.backward(g)
    assert (P.round_to(np, g, "bf16") == g).all()


def test_cpu_planned_forms_decline_a_precision():
    """A recorded step runs a mixed-precision dense call eagerly (the planned forms return None)."""
    from gpubp.backends import cpu_plan
    from gpubp.backends.cpu import CpuBackend

    b = CpuBackend.instance()
    act = Activation("relu")
    x, w, bias = np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), np.zeros(2, np.float32)
    assert cpu_plan.dense_forward(b, x, w, bias, act, True) is not None
    assert cpu_plan.dense_forward(b, x, w, bias, act, True, precision=P.get("fp32")) is not None
    assert cpu_plan.dense_forward(b, x, w, bias, act, True, precision=P.get("tf32")) is None
    _, saved = b.dense_forward(x, w, bias, act, True)
    dw, db = np.empty_like(w), np.empty_like(bias)
    assert cpu_plan.dense_backward(b, np.ones((3, 2), np.float32), saved, w, act, dw, db, True,
                                   precision=P.get("fp16-mixed")) is None


def test_check_precision_catches_a_missing_rounding(monkeypatch):
    """gradcheck.check_precision passes the spec and refuses a backward that rounds dx twice as coarsely."""
    layer = gp.Dense(24, 12, "tanh")
    gp.Sequential(layer, dtype="float32", seed=1, device="cpu", dense_impl="reference")
    assert gradcheck.check_precision(layer, "bf16-mixed", batch=8).passed
    real = numpy_ref._dense_backward_mixed

    def coarse(*args):
        dx = real(*args)
        return None if dx is None else (np.round(dx * 8) / 8).astype(np.float32)

    monkeypatch.setattr(numpy_ref, "_dense_backward_mixed", coarse)
    report = gradcheck.check_precision(layer, "bf16-mixed", batch=8)
    assert not report.passed and report.worst().name == "x"
