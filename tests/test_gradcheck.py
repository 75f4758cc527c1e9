"""Tests for gpubp.gradcheck itself: it must pass correct gradients, fail wrong
ones (naming the parameter and the worst index), report clearly, validate its
arguments and leave its inputs exactly as it found them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpubp as gp
from gpubp import activations, gradcheck
from gpubp.backends import numpy_ref
from gpubp.backends.cpu import CpuBackend
from gpubp.gradcheck import GradcheckError, Report

MODES = ["full", "directional", "both"]


def tiny_model(dtype="float64", seed=0):
    model = gp.Sequential(gp.Dense(3, 4, "tanh"), gp.Dense(4, 2, "sigmoid"), dtype=dtype, seed=seed)
    for layer in model.layers:
        layer.bias.data[...] = np.linspace(-0.3, 0.3, layer.out_features)
    return model


def data(n=4, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)), rng.standard_normal((n, 2))


def checks_by_name(report: Report):
    return {c.name: c for c in report.checks}


# --- wrong backward passes -----------------------------------------------------------------------
# Each breaks the CPU's dense backward, the fast backend (the CPU default) and the reference alike:
# ``make(real)`` wraps a correct backward ``real(da, saved, w, act, dw, db, need_dx)``.


def break_dense_backward(monkeypatch, make) -> None:
    monkeypatch.setattr(numpy_ref, "dense_backward", make(numpy_ref.dense_backward))
    fast = CpuBackend.dense_backward
    monkeypatch.setattr(CpuBackend, "dense_backward", lambda self, *args: make(lambda *a: fast(self, *a))(*args))


def scaled_weight_grad(factor):
    def make(real):
        def wrong(da, saved, w, act, dw, db, need_dx):
            dx = real(da, saved, w, act, dw, db, need_dx)
            dw *= factor
            return dx

        return wrong

    return make


def dropped_bias_grad():
    def make(real):
        def wrong(da, saved, w, act, dw, db, need_dx):
            dx = real(da, saved, w, act, dw, db, need_dx)
            db[...] = 0
            return dx

        return wrong

    return make


def nan_weight_grad(index):
    def make(real):
        def wrong(da, saved, w, act, dw, db, need_dx):
            dx = real(da, saved, w, act, dw, db, need_dx)
            dw[index] = np.nan
            return dx

        return wrong

    return make


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_passes_correct_layer(mode, dtype):
    report = gradcheck.check_layer(gp.Dense(3, 2, "gelu"), batch=4, mode=mode, dtype=dtype)
    assert report.passed, str(report)
    assert report.dtype == dtype
    assert report.tolerance == gradcheck.TOLERANCES[dtype]
    report.raise_if_failed()  # no exception


def test_layer_weight_off_by_one_percent(monkeypatch):
    break_dense_backward(monkeypatch, scaled_weight_grad(1.01))
    report = gradcheck.check_layer(gp.Dense(3, 2, "tanh"), batch=4, mode="both")
    assert not report.passed
    by = checks_by_name(report)
    assert by["x"].passed and by["bias"].passed
    assert not by["weight"].passed
    assert not by["v^T J u"].passed
    worst = report.worst()
    assert worst.name == "weight"
    # full Jacobian index: (output row, output column, weight row, weight column)
    assert len(worst.worst_index) == 4
    assert worst.worst_index[2] < 3 and worst.worst_index[3] < 2
    assert worst.got == pytest.approx(1.01 * worst.want, rel=1e-6)
    assert worst.max_rel_err == pytest.approx(0.01, rel=1e-3)


def test_layer_dropped_bias_gradient(monkeypatch):
    break_dense_backward(monkeypatch, dropped_bias_grad())
    report = gradcheck.check_layer(gp.Dense(3, 2, "relu"), batch=3, mode="full")
    by = checks_by_name(report)
    assert not report.passed
    assert by["x"].passed and by["weight"].passed and not by["bias"].passed
    assert report.worst().name == "bias"
    assert len(by["bias"].worst_index) == 3  # (output row, output column, bias index)
    assert by["bias"].got == 0.0 and by["bias"].want != 0.0


def test_layer_nan_gradient(monkeypatch):
    break_dense_backward(monkeypatch, nan_weight_grad((2, 1)))
    report = gradcheck.check_layer(gp.Dense(3, 2, "silu"), batch=2, mode="both")
    by = checks_by_name(report)
    assert not report.passed
    assert not by["weight"].passed and not by["v^T J u"].passed
    assert by["weight"].worst_index[2:] == (2, 1)
    assert np.isnan(by["weight"].got)
    with pytest.raises(GradcheckError):
        report.raise_if_failed()


def test_infinite_gradient_fails():
    inputs = {"a": np.array([1.0, 2.0])}

    def forward():
        return inputs["a"] * 3.0

    report = gradcheck.check_function(forward, inputs, lambda v: {"a": np.full(2, np.inf)}, (2,),
                                      case="inf", dtype="float64", mode="both")
    assert not report.passed
    assert all(not c.passed for c in report.checks)


def test_wrong_activation_derivative(monkeypatch):
    spec = activations.TABLE["tanh"]
    real = spec.backward

    def wrong(da, z, a, p):
        return real(da, z, a, p) * 1.01

    monkeypatch.setitem(activations.TABLE, "tanh", dataclasses.replace(spec, backward=wrong))
    layer = gp.Dense(2, 3, "tanh")
    gp.Sequential(layer, dtype="float64", seed=0, dense_impl="reference")  # the table is the reference's maths
    report = gradcheck.check_layer(layer, batch=3, mode="both")
    assert not report.passed
    by = checks_by_name(report)
    for name in ("x", "weight", "bias", "v^T J u"):
        assert not by[name].passed, name
    monkeypatch.undo()
    assert gradcheck.check_layer(gp.Dense(2, 3, "tanh"), batch=3, mode="both").passed


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_dropped_bias_names_parameter(monkeypatch, dtype):
    model = tiny_model(dtype)
    x, y = data()
    assert gradcheck.check_model(model, "mse", x, y, mode="both").passed
    break_dense_backward(monkeypatch, dropped_bias_grad())
    report = gradcheck.check_model(model, "mse", x, y, mode="full")
    by = checks_by_name(report)
    assert not report.passed
    assert not by["0.bias"].passed and not by["1.bias"].passed
    assert by["0.weight"].passed and by["1.weight"].passed and by["x"].passed
    assert report.worst().name in ("0.bias", "1.bias")
    assert len(by["1.bias"].worst_index) == 1  # a scalar loss: the index is the parameter's own
    assert "1.bias" in str(report)
    directional = gradcheck.check_model(model, "mse", x, y, mode="directional")
    assert not directional.passed


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_weight_off_by_one_percent(monkeypatch, dtype):
    model = tiny_model(dtype)
    x, y = data()
    break_dense_backward(monkeypatch, scaled_weight_grad(1.01))
    report = gradcheck.check_model(model, "cross_entropy", x, np.array([0, 1, 1, 0]), mode="both")
    by = checks_by_name(report)
    assert not by["1.weight"].passed and not by["0.weight"].passed
    assert by["0.bias"].passed and by["1.bias"].passed and by["x"].passed
    if dtype == "float64":  # the float32 directional tolerance is too loose for a 1% error of size 1e-2
        assert not by["v^T J u"].passed
    assert len(by["0.weight"].worst_index) == 2


def test_wrong_loss_gradient(monkeypatch):
    real = gp.losses.MSE.rule

    def wrong(pred, target, scale, weight=None):
        value, grad = real.spec(pred, target, scale, weight)
        return value, grad * pred.dtype.type(1.01)

    pred = np.random.default_rng(2).standard_normal((3, 2))
    target = np.zeros((3, 2))
    assert gradcheck.check_loss("mse", pred, target).passed
    monkeypatch.setattr(gp.losses.MSE, "rule", dataclasses.replace(real, spec=wrong))
    report = gradcheck.check_loss("mse", pred, target, mode="both")
    by = checks_by_name(report)
    assert not by["pred"].passed and not by["v^T J u"].passed
    assert len(by["pred"].worst_index) == 2


def test_detects_small_errors_float32_tolerance(monkeypatch):
    # even the looser float32 tolerance catches a 1% error in a gradient of size ~1
    break_dense_backward(monkeypatch, scaled_weight_grad(1.01))
    layer = gp.Dense(3, 3, "identity")
    x = np.random.default_rng(4).standard_normal((5, 3)) * 3
    assert not gradcheck.check_layer(layer, x, mode="full", dtype="float32").passed


# --- the report ---------------------------------------------------------------------------------


def test_report_string(monkeypatch):
    break_dense_backward(monkeypatch, dropped_bias_grad())
    report = gradcheck.check_layer(gp.Dense(2, 2, "tanh"), batch=2, mode="full")
    text = str(report)
    bias = checks_by_name(report)["bias"]
    assert "FAIL" in text
    assert "float64" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("bias"))
    assert str(bias.worst_index) in line
    assert "got" in line and "want" in line
    assert f"{bias.got:.9g}" in line and f"{bias.want:.9g}" in line
    assert "FAIL" in line
    with pytest.raises(GradcheckError) as info:
        report.raise_if_failed()
    assert str(info.value) == text
    assert isinstance(info.value, AssertionError)


def test_report_string_on_pass():
    report = gradcheck.check_layer(gp.Dense(2, 2, "tanh"), batch=2, mode="both")
    text = str(report)
    assert "pass" in text.splitlines()[0]
    for name in ("x", "weight", "bias", "v^T J u"):
        assert name in text
    assert report.max_abs_err < 1e-8
    assert report.worst() in report.checks


def test_empty_report_passes():
    report = Report(case="nothing", dtype="float64", tolerance=gradcheck.TOLERANCES["float64"])
    assert report.passed
    assert report.max_abs_err == 0.0 and report.max_rel_err == 0.0


def test_tolerances():
    t64, t32 = gradcheck.TOLERANCES["float64"], gradcheck.TOLERANCES["float32"]
    assert 0 < t64.atol < t32.atol and 0 < t64.rtol < t32.rtol


def test_custom_tolerance_is_used():
    inputs = {"a": np.array([1.0, -2.0])}

    def forward():
        return inputs["a"] ** 2

    def backward(v, factor):
        return {"a": 2 * inputs["a"] * v * factor}

    kw = dict(case="sq", dtype="float64", mode="full")
    assert not gradcheck.check_function(forward, inputs, lambda v: backward(v, 1.001), (2,), **kw).passed
    loose = gradcheck.Tolerance(atol=1e-6, rtol=1e-2)
    assert gradcheck.check_function(forward, inputs, lambda v: backward(v, 1.001), (2,), tolerance=loose,
                                    **kw).passed


# --- argument validation ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["Full", "jacobian", "", None])
def test_mode_validation(mode):
    x, y = data()
    with pytest.raises(ValueError, match="mode"):
        gradcheck.check_layer(gp.Dense(3, 2), batch=2, mode=mode)
    with pytest.raises(ValueError, match="mode"):
        gradcheck.check_loss("mse", y, y, mode=mode)
    with pytest.raises(ValueError, match="mode"):
        gradcheck.check_model(tiny_model(), "mse", x, y, mode=mode)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan")])
def test_eps_validation(eps):
    x, y = data()
    with pytest.raises(ValueError, match="eps"):
        gradcheck.check_model(tiny_model(), "mse", x, y, eps=eps)


def test_check_layer_rejects_non_layers():
    with pytest.raises(TypeError):
        gradcheck.check_layer(tiny_model())


def test_layer_in_float32_model_checked_in_float32():
    model = tiny_model("float32")
    report = gradcheck.check_layer(model.layers[1], batch=3, mode="both", dtype="float64")
    assert report.dtype == "float32"  # the model's dtype wins
    assert report.passed, str(report)


# --- inputs are left untouched ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_model_parameters_restored(mode, dtype):
    model = tiny_model(dtype)
    x, y = data()
    before = model.arena.data.copy()
    x0, y0 = x.copy(), y.copy()
    assert gradcheck.check_model(model, "mse", x, y, mode=mode).passed
    assert model.arena.data.tobytes() == before.tobytes()
    assert x.tobytes() == x0.tobytes() and y.tobytes() == y0.tobytes()


@pytest.mark.parametrize("mode", MODES)
def test_layer_parameters_restored(mode):
    model = tiny_model()
    layer = model.layers[0]
    x = np.random.default_rng(3).standard_normal((2, 3))
    before, x0 = model.arena.data.copy(), x.copy()
    assert gradcheck.check_layer(layer, x, mode=mode).passed
    assert model.arena.data.tobytes() == before.tobytes()
    assert x.tobytes() == x0.tobytes()


@pytest.mark.parametrize("mode", MODES)
def test_check_function_restores_inputs(mode):
    rng = np.random.default_rng(5)
    # values whose perturbation would not round-trip exactly if restored by subtraction
    inputs = {"a": rng.standard_normal((3, 2)) * 1e3 + 0.1, "b": rng.standard_normal(4) * 1e-3}
    before = {k: v.copy() for k, v in inputs.items()}
    ids = {k: id(v) for k, v in inputs.items()}

    def forward():
        return np.concatenate([np.sin(inputs["a"]).sum(axis=1), [np.sum(inputs["b"] ** 3)]])

    def backward(v):
        return {"a": np.cos(inputs["a"]) * v[:3, None], "b": 3 * inputs["b"] ** 2 * v[3]}

    report = gradcheck.check_function(forward, inputs, backward, (4,), case="fn", dtype="float64", mode=mode,
                                      eps=1e-7)
    assert report.passed, str(report)
    for k in inputs:
        assert id(inputs[k]) == ids[k]
        assert inputs[k].tobytes() == before[k].tobytes()


def test_check_loss_restores_pred():
    pred = np.random.default_rng(6).standard_normal((3, 4)) * 1e2
    p0 = pred.copy()
    assert gradcheck.check_loss("cross_entropy", pred, np.array([0, 3, 1])).passed
    assert pred.tobytes() == p0.tobytes()


def test_directional_is_deterministic():
    model = tiny_model()
    x, y = data()
    r1 = gradcheck.check_model(model, "mse", x, y, mode="directional", seed=3)
    r2 = gradcheck.check_model(model, "mse", x, y, mode="directional", seed=3)
    assert r1.checks[0].got == r2.checks[0].got and r1.checks[0].want == r2.checks[0].want


# check_function perturbs each input through a flat view, so it needs C-contiguous float64 inputs
# and refuses others; check_layer / check_loss / check_model make C-ordered copies of the caller's
# x / pred, so Fortran-ordered data gives the same (passing) result as C-ordered data.
def test_check_function_refuses_inputs_it_cannot_perturb_in_place():
    x = np.asfortranarray(np.random.default_rng(7).standard_normal((4, 3)))
    for bad in (x, x.astype(np.float32), np.ascontiguousarray(x)[:, ::2]):
        inputs = {"a": bad}
        with pytest.raises(ValueError, match="inputs64\\['a'\\]: expected a writeable C-contiguous float64"):
            gradcheck.check_function(lambda: None, inputs, lambda v: {}, (4,),
                                     case="squares", dtype="float64", mode="full")


@pytest.mark.parametrize("which", ["layer", "loss", "model"])
def test_full_mode_with_fortran_ordered_input(which):
    rng = np.random.default_rng(7)
    x = np.asfortranarray(rng.standard_normal((4, 3)))
    if which == "layer":
        report = gradcheck.check_layer(gp.Dense(3, 2, "tanh"), x, mode="full")
    elif which == "loss":
        report = gradcheck.check_loss("mse", x, np.zeros((4, 3)), mode="full")
    else:
        report = gradcheck.check_model(tiny_model(), "mse", x, np.zeros((4, 2)), mode="full")
    assert report.passed, str(report)
