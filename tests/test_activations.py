"""Tests for the activation table in gpubp.activations.

Forward values are compared with scalar formulas written below with Python's
``math`` module, one element at a time; derivatives are compared with float64
central differences of the forward pass, away from the kinks.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from gpubp import activations
from gpubp.activations import NAMES, TABLE, Activation

# Every activation with its default parameters, plus non-default parameter choices.
CASES = [(name, {}) for name in NAMES] + [
    ("leaky_relu", {"slope": 0.2}),
    ("elu", {"alpha": 0.5}),
    ("softplus", {"beta": 2.0, "threshold": 5.0}),
]


def case_id(case):
    name, params = case
    return name + "".join(f"-{k}{v:g}" for k, v in params.items())


CASE_IDS = [case_id(c) for c in CASES]
DTYPES = [np.float32, np.float64]


# --- scalar references ----------------------------------------------------------------------


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _softplus(z: float, beta: float, threshold: float) -> float:
    bz = beta * z
    if bz > threshold:
        return z
    return math.log1p(math.exp(bz)) / beta


def reference(name: str, params: dict, z: float) -> float:
    """f(z) for one Python float, straight from the textbook formula."""
    if name == "identity":
        return z
    if name == "relu":
        return z if z > 0 else 0.0
    if name == "leaky_relu":
        return z if z > 0 else params.get("slope", 0.01) * z
    if name == "elu":
        return z if z > 0 else params.get("alpha", 1.0) * math.expm1(z)
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return math.tanh(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        return 0.5 * z * (1.0 + math.tanh(k * (z + 0.044715 * z**3)))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "softplus":
        return _softplus(z, params.get("beta", 1.0), params.get("threshold", 20.0))
    raise AssertionError(f"no reference for {name}")


def reference_array(name: str, params: dict, z: np.ndarray) -> np.ndarray:
    return np.array([reference(name, params, float(v)) for v in z.reshape(-1)]).reshape(z.shape)


# Values from tiny to large magnitude, both signs, plus the default softplus threshold region.
_MAGS = [1e-8, 1e-3, 0.1, 0.5, 1.0, 1.7, 2.4, 2.6, 3.0, 5.0, 8.0, 15.0, 19.9, 20.1, 30.0, 50.0, 100.0, 1e3, 1e4]
Z_GRID = np.array(sorted([0.0] + _MAGS + [-m for m in _MAGS]))


def derivative_points(name: str, params: dict) -> np.ndarray:
    """Points for central differences: away from z = 0 and from beta z = threshold."""
    rng = np.random.default_rng(1234)
    z = np.concatenate([rng.uniform(-8.0, 8.0, 200), np.array([-40.0, -25.0, -12.0, 12.0, 25.0, 40.0])])
    z = np.concatenate([z, Z_GRID[np.abs(Z_GRID) <= 50]])
    keep = np.abs(z) > 1e-3
    if name == "softplus":
        beta, thr = params.get("beta", 1.0), params.get("threshold", 20.0)
        keep &= np.abs(beta * z - thr) > 1e-3
    return z[keep]


# --- forward values -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_float64_matches_scalar_formula(case):
    name, params = case
    act = Activation(name, **params)
    got = act.forward(Z_GRID.copy())
    want = reference_array(name, params, Z_GRID)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{act!r}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_float32_matches_scalar_formula(case):
    name, params = case
    act = Activation(name, **params)
    z32 = Z_GRID.astype(np.float32)
    got = act.forward(z32)
    # The reference sees exactly the float32 inputs, evaluated in double precision.
    want = reference_array(name, params, z32.astype(np.float64))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-5, atol=1e-6, err_msg=f"{act!r}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_random_values_2d(case):
    name, params = case
    act = Activation(name, **params)
    z = np.random.default_rng(7).standard_normal((6, 5)) * 4
    got = act.forward(z)
    assert got.shape == z.shape
    np.testing.assert_allclose(got, reference_array(name, params, z), rtol=1e-12, atol=1e-15)


def test_forward_does_not_modify_input():
    z = np.random.default_rng(3).standard_normal((4, 3))
    for name, params in CASES:
        zc = z.copy()
        act = Activation(name, **params)
        a = act.forward(zc)
        act.backward(np.ones_like(zc), zc, a)
        assert np.array_equal(zc, z), name


# --- derivatives ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_derivative_matches_central_difference(case):
    name, params = case
    act = Activation(name, **params)
    z = derivative_points(name, params)
    h = 1e-6
    numeric = (act.forward(z + h) - act.forward(z - h)) / (2 * h)
    a = act.forward(z)
    got = act.backward(np.ones_like(z), z, a)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-7, err_msg=f"{act!r}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_multiplies_upstream_gradient(case):
    name, params = case
    act = Activation(name, **params)
    z = derivative_points(name, params)
    da = np.random.default_rng(5).standard_normal(z.shape)
    h = 1e-6
    numeric = (act.forward(z + h) - act.forward(z - h)) / (2 * h)
    got = act.backward(da, z, act.forward(z))
    np.testing.assert_allclose(got, da * numeric, rtol=1e-6, atol=1e-7, err_msg=f"{act!r}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_derivative_float32_close_to_float64(case):
    name, params = case
    act = Activation(name, **params)
    z64 = derivative_points(name, params).astype(np.float32).astype(np.float64)
    z32 = z64.astype(np.float32)
    d64 = act.backward(np.ones_like(z64), z64, act.forward(z64))
    d32 = act.backward(np.ones_like(z32), z32, act.forward(z32))
    assert d32.dtype == np.float32
    np.testing.assert_allclose(d32.astype(np.float64), d64, rtol=1e-4, atol=1e-5, err_msg=f"{act!r}")


def test_known_derivative_values():
    one = np.array([1.0])
    # sigmoid'(0) = 1/4, tanh'(0) = 1, gelu'(0) = 1/2, silu'(0) = 1/2, softplus'(0) = 1/2
    for name, want in [("sigmoid", 0.25), ("tanh", 1.0), ("gelu", 0.5), ("gelu_tanh", 0.5), ("silu", 0.5),
                       ("softplus", 0.5), ("identity", 1.0)]:
        act = Activation(name)
        z = np.array([0.0])
        assert act.backward(one, z, act.forward(z))[0] == pytest.approx(want, abs=1e-15), name
    # one-sided pieces of the piecewise functions
    z = np.array([-2.0, 3.0])
    assert list(Activation("relu").backward(np.ones(2), z, None)) == [0.0, 1.0]
    assert list(Activation("leaky_relu", slope=0.2).backward(np.ones(2), z, None)) == [0.2, 1.0]
    got = Activation("elu", alpha=0.5).backward(np.ones(2), z, None)
    assert got[0] == pytest.approx(0.5 * math.exp(-2.0), rel=1e-14) and got[1] == 1.0
    # softplus above its threshold is the identity, derivative exactly 1
    sp = Activation("softplus", beta=2.0, threshold=5.0)
    assert sp.forward(np.array([2.6]))[0] == 2.6
    assert sp.backward(np.ones(1), np.array([2.6]), None)[0] == 1.0


# --- dtypes, extremes, warnings -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dtype_is_kept(case, dtype):
    name, params = case
    act = Activation(name, **params)
    z = np.linspace(-3, 3, 7, dtype=dtype).reshape(7, 1)
    a = act.forward(z)
    dz = act.backward(np.ones_like(z), z, a)
    assert a.dtype == dtype and dz.dtype == dtype
    assert a.shape == z.shape and dz.shape == z.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_large_magnitudes_finite_without_warnings(case, dtype):
    name, params = case
    act = Activation(name, **params)
    z = np.array([-1e4, -1e3, -100.0, -88.0, 88.0, 100.0, 1e3, 1e4], dtype=dtype)
    da = np.ones_like(z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            a = act.forward(z)
            dz = act.backward(da, z, a)
    assert np.isfinite(a).all() and np.isfinite(dz).all()
    assert a.dtype == dtype and dz.dtype == dtype
    want = reference_array(name, params, z.astype(np.float64))
    np.testing.assert_allclose(a.astype(np.float64), want, rtol=1e-6, atol=1e-30)


def test_sigmoid_saturates_exactly():
    s = Activation("sigmoid")
    z = np.array([-1e4, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = s.forward(z)
        plain = activations.sigmoid(z)
    assert a[0] == 0.0 and a[1] == 1.0
    assert plain[0] == 0.0 and plain[1] == 1.0
    assert np.array_equal(s.backward(np.ones(2), None, a), [0.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a32 = s.forward(z.astype(np.float32))
    assert a32.dtype == np.float32 and a32[0] == 0.0 and a32[1] == 1.0


def test_sigmoid_symmetry():
    z = np.linspace(-40, 40, 161)
    s = activations.sigmoid(z)
    np.testing.assert_allclose(s + activations.sigmoid(-z), 1.0, rtol=0, atol=1e-15)


# The module promises formulas that stay finite "for any finite z"; far beyond 1e4 too, no
# intermediate may overflow (gelu's backward once squared z before its exponential).
@pytest.mark.parametrize(
    "dtype,big", [(np.float32, 1e30), (np.float64, 1e200)], ids=["float32-1e30", "float64-1e200"]
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_huge_magnitudes_finite_without_warnings(case, dtype, big):
    name, params = case
    act = Activation(name, **params)
    z = np.array([-big, big], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            a = act.forward(z)
            dz = act.backward(np.ones_like(z), z, a)
    assert np.isfinite(a).all() and np.isfinite(dz).all()


# --- what backward reads ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_saves_is_sufficient(case, dtype):
    name, params = case
    act = Activation(name, **params)
    assert act.saves in ("", "z", "a")
    z = (np.random.default_rng(11).standard_normal((5, 4)) * 3).astype(dtype)
    da = np.random.default_rng(12).standard_normal((5, 4)).astype(dtype)
    a = act.forward(z)
    full = act.backward(da, z, a)
    only = act.backward(da, z if act.saves == "z" else None, a if act.saves == "a" else None)
    assert np.array_equal(full, only)


def test_saves_values():
    assert Activation("identity").saves == ""
    assert Activation("sigmoid").saves == "a"
    assert Activation("tanh").saves == "a"
    for name in ("relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu", "softplus"):
        assert Activation(name).saves == "z", name


# --- the table and construction ---------------------------------------------------------------


def test_ids_unique():
    ids = [Activation(n).id for n in NAMES]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, int) for i in ids)
    assert [TABLE[n].id for n in NAMES] == ids


def test_names_are_the_table():
    assert NAMES == tuple(TABLE)
    assert set(NAMES) == {"identity", "relu", "leaky_relu", "elu", "sigmoid", "tanh", "gelu", "gelu_tanh",
                          "silu", "softplus"}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        Activation("swish_v2")
    msg = str(info.value)
    assert "swish_v2" in msg
    for name in NAMES:
        assert name in msg


def test_name_not_a_string():
    with pytest.raises(TypeError):
        Activation(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,params",
    [("relu", {"slope": 0.1}), ("leaky_relu", {"alpha": 1.0}), ("softplus", {"slope": 1.0}), ("tanh", {"beta": 2.0})],
    ids=["relu-slope", "leaky_relu-alpha", "softplus-slope", "tanh-beta"],
)
def test_unknown_parameter(name, params):
    with pytest.raises(ValueError, match="unknown parameter"):
        Activation(name, **params)


@pytest.mark.parametrize(
    "name,params",
    [("softplus", {"beta": 0.0}), ("softplus", {"beta": -1.0}), ("elu", {"alpha": -0.1}),
     ("leaky_relu", {"slope": float("nan")}), ("leaky_relu", {"slope": float("inf")}), ("elu", {"alpha": True})],
    ids=["beta0", "beta-neg", "alpha-neg", "slope-nan", "slope-inf", "alpha-bool"],
)
def test_bad_parameter_values(name, params):
    with pytest.raises(ValueError):
        Activation(name, **params)


def test_parameters_and_names_normalised():
    act = Activation(" Leaky_ReLU ", slope=1)
    assert act.name == "leaky_relu"
    assert act.params == {"slope": 1.0}
    assert isinstance(act.params["slope"], float)
    assert Activation("softplus", beta=2).params == {"beta": 2.0, "threshold": 20.0}
    assert activations.get(None).name == "identity"
    assert activations.get("tanh") == Activation("tanh")
    same = Activation("elu", alpha=0.5)
    assert activations.get(same) is same


def test_config_roundtrip():
    for name, params in CASES:
        act = Activation(name, **params)
        cfg = act.config()
        assert Activation(cfg["name"], **cfg["params"]) == act


def test_packed_parameters_follow_the_row():
    """(p0, p1) as the compiled kernels read them: slope / alpha / beta first, threshold second."""
    assert Activation("leaky_relu", slope=0.2).packed() == (0.2, 0.0)
    assert Activation("elu", alpha=0.5).packed() == (0.5, 0.0)
    assert Activation("softplus", beta=2.0, threshold=10.0).packed() == (2.0, 10.0)
    for name in ("identity", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"):
        assert Activation(name).packed() == (0.0, 0.0)
    for name, spec in TABLE.items():
        assert set(spec.packs) == set(spec.defaults), name  # every parameter reaches the kernels
