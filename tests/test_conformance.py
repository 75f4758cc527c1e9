"""Conformance: every operation of the backend interface, on every available backend, against the float64 spec.

Backends: the NumPy reference ("numpy") and the fast CPU backend ("cpu") always; the simulated CUDA backend ("cudasim")
where the Numba CUDA simulator runs the kernels (machines without a GPU); the CUDA
backend ("cuda", and "cuda-fused" for the dense layers) where a GPU exists. The spec is
gpubp.backends.numpy_ref / numpy_optim, each optimizer rule's NumPy spec (gpubp/optim/<name>.py) and
each loss row's (gpubp/losses/<name>.py), evaluated in float64 on the same inputs.

Every case: fresh random inputs (the seed is in each failure message), shapes that are
no multiple of any tile (1, 3, 7, 17, 33, 130), outputs poisoned with NaN before the
call so an element left unwritten fails, tolerances from gpubp.accuracy.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import gpubp as gp
from gpubp import accuracy
from gpubp.activations import NAMES, Activation
from gpubp.backends import Backend, get_backend, numpy_ref
from gpubp.backends.numpy_ref import NumpyBackend
from gpubp.device import parse_device
from tests.conftest import CUDA_MODE, GPUS

SIM = CUDA_MODE == "simulator"


def _backends() -> list:
    out = [pytest.param("numpy", id="numpy"), pytest.param("cpu", id="cpu")]
    if SIM:
        out.append(pytest.param("cudasim", id="cudasim"))
    if GPUS > 0:
        out.append(pytest.param("cuda", id="cuda"))
    return out


def _dense_backends() -> list:
    return _backends() + ([pytest.param("cuda-fused", id="cuda-fused")] if GPUS > 0 else [])


def backend_for(name: str, dtype: str) -> Backend:
    if name == "cuda-fused":
        if dtype != "float32":
            pytest.skip("the fused CUDA C kernels are float32 only")
        return get_backend(parse_device("cuda"), "fused", dtype)
    if name == "numpy":
        return get_backend(parse_device("cpu"), "reference")
    return get_backend(parse_device(name))


# The simulator runs each GPU thread as a Python thread: a subset of activations there.
ACTS = ["identity", "relu", "leaky_relu", "sigmoid", "gelu", "softplus"] if SIM and GPUS == 0 else list(NAMES)
DTYPES = ["float32", "float64"]
FLAT_SIZES = [1, 3, 130]


@pytest.fixture
def seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


def host(b: Backend, a) -> np.ndarray:
    return np.asarray(b.to_numpy(a), dtype=np.float64)


def poisoned(b: Backend, shape, dtype: str):
    return b.asarray(np.full(shape, np.nan), dtype)


def close(got, want, tol: accuracy.Tolerance, msg: str, allowance=0.0) -> None:
    ok, why = accuracy.within(got, want, tol, allowance)
    assert ok, f"{msg}: {why}"


# --- the interface itself -------------------------------------------------------------------

INTERFACE = sorted(name for name, v in vars(Backend).items() if getattr(v, "__isabstractmethod__", False))


def test_interface_lists_every_operation():
    assert {"dense_forward", "dense_backward", "loss", "update",
            "reduce_into", "scale_", "clip_scale_", "flag_nonfinite_", "asarray", "to_numpy", "full", "assign_",
            "take_rows", "is_device_array"} <= set(INTERFACE)
    assert len(INTERFACE) == 16, INTERFACE
    derived = {"zeros", "sum_of_squares", "sum_of_squares_into", "max_abs", "all_finite"}
    assert not derived & set(INTERFACE) and all(callable(getattr(Backend, k)) for k in derived)


@pytest.mark.parametrize("name", _dense_backends())
def test_backend_implements_the_whole_interface(name):
    b = backend_for(name, "float32")
    assert isinstance(b, Backend)
    for op in INTERFACE:
        assert not getattr(getattr(type(b), op), "__isabstractmethod__", False), f"{name} lacks {op}"


def test_an_incomplete_backend_cannot_be_made():
    class Partial(NumpyBackend):
        pass

    del_one = type("Missing", (Backend,), {k: getattr(NumpyBackend, k) for k in INTERFACE if k != "clip_scale_"})
    Partial()  # complete: fine
    with pytest.raises(TypeError, match="clip_scale_"):
        del_one()


def test_no_device_branches_outside_the_backends():
    """Layers, losses, optimizers and the model ask the interface; they never test where arrays live,
    which backend runs, or which loss they hold (names in the code, docstrings aside)."""
    import ast
    import importlib
    import pkgutil

    import gpubp.layers
    import gpubp.losses
    import gpubp.model
    import gpubp.optim

    forbidden = {"cupy", "numba", "numpy_ref", "numpy_optim", "cuda", "cudasim", "simulated", "CudaBackend",
                 "SimulatedCudaBackend", "hasattr", "CrossEntropy", "BCEWithLogits", "MSE"}
    optim_files = [importlib.import_module(f"gpubp.optim.{m.name}") for m in pkgutil.iter_modules(gpubp.optim.__path__)]
    for mod in (gpubp.layers, gpubp.model, gpubp.optim, *optim_files):
        names = set()
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update(part for alias in node.names for part in alias.name.split("."))
                names.update((getattr(node, "module", "") or "").split("."))
        assert not names & forbidden, f"{mod.__name__} uses {sorted(names & forbidden)}"
    # The loss rows define the loss classes; their code hands the backend a rule, never a name or a class.
    loss_files = [importlib.import_module(f"gpubp.losses.{m.name}") for m in pkgutil.iter_modules(gpubp.losses.__path__)]
    for mod in (gpubp.losses, *loss_files):
        tree = ast.parse(inspect.getsource(mod))
        calls = {getattr(n.func, "id", "") for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert not calls & {"getattr", "hasattr"} or mod.__name__ == "gpubp.losses.base", mod.__name__  # torch twin
        assert not {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & {"cupy", "numba", "numpy_ref"}


# --- array helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _backends())
def test_array_helpers(name, dtype, seed):
    b = backend_for(name, dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((7, 3))
    a = b.asarray(x, dtype)
    assert host(b, a).tolist() == x.astype(dtype).astype(np.float64).tolist()
    copy = b.to_numpy(a)
    copy[...] = 0  # a copy, never a view of the backend's array
    assert host(b, a)[0, 0] == np.float64(x.astype(dtype)[0, 0])
    assert host(b, b.zeros((2, 3), dtype)).tolist() == [[0.0] * 3] * 2
    f = b.full(5, 2.5, dtype)
    assert host(b, f).tolist() == [2.5] * 5 and str(b.to_numpy(f).dtype) == dtype
    dst = poisoned(b, (2, 3), dtype)
    b.assign_(dst, np.arange(6, dtype=dtype))
    assert host(b, dst).tolist() == [[0, 1, 2], [3, 4, 5]]
    idx = rng.permutation(7)[:4]
    for data in (x.astype(dtype), a):  # host data is copied in; backend data is indexed in place
        assert host(b, b.take_rows(data, idx)).tolist() == x.astype(dtype)[idx].astype(np.float64).tolist()
        assert host(b, b.take_rows(data, slice(2, 5))).tolist() == x.astype(dtype)[2:5].astype(np.float64).tolist()
    assert b.all_finite(a)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y.flat[rng.integers(y.size)] = bad
        assert not b.all_finite(b.asarray(y, dtype)), f"seed {seed}: {bad} missed"
    assert b.is_device_array(a) == (name.startswith("cuda") and name != "cudasim")
    assert not b.is_device_array(x)


# --- dense layer pair -----------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (7, 3, 5), (17, 33, 13)]


def _act(name: str) -> Activation:
    return Activation(name, slope=0.1) if name == "leaky_relu" else Activation(name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _dense_backends())
def test_dense_forward_and_backward(name, dtype, act, shape, seed):
    b = backend_for(name, dtype)
    activation = _act(act)
    n, k, m = shape
    rng = np.random.default_rng(seed)
    x, w, bias = rng.standard_normal((n, k)), rng.standard_normal((k, m)) / np.sqrt(k), rng.standard_normal(m)
    da = rng.standard_normal((n, m))
    # Inputs as the backend sees them (rounded to dtype), then the float64 spec on those values.
    x, w, bias, da = (v.astype(dtype).astype(np.float64) for v in (x, w, bias, da))
    msg = f"{name} {dtype} {act} {shape} seed {seed}"

    a_want, saved_want = numpy_ref.dense_forward(x, w, bias, activation, True)
    dw_want, db_want = np.empty_like(w), np.empty_like(bias)
    dx_want = numpy_ref.dense_backward(da, saved_want, w, activation, dw_want, db_want, True)

    xd, wd, bd = b.asarray(x, dtype), b.asarray(w, dtype), b.asarray(bias, dtype)
    a, saved = b.dense_forward(xd, wd, bd, activation, True)
    a_inf, none = b.dense_forward(xd, wd, bd, activation, False)
    assert none == ()
    dw, db = poisoned(b, w.shape, dtype), poisoned(b, bias.shape, dtype)
    dx = b.dense_backward(b.asarray(da, dtype), saved, wd, activation, dw, db, True)
    dw2, db2 = poisoned(b, w.shape, dtype), poisoned(b, bias.shape, dtype)
    assert b.dense_backward(b.asarray(da, dtype), saved, wd, activation, dw2, db2, False) is None

    tol = accuracy.MODEL[dtype]
    # The allowances of the float32 contract: the dot-product bound of the GEMMs, the
    # activation's libm bound, and where z lies within rounding distance of a kink of f',
    # the worst case of f' taken on either side.
    z_terms = np.abs(x) @ np.abs(w) + np.abs(bias)
    z = x @ w + bias
    if dtype == "float32":
        z_err = accuracy.dot_error_bound(z_terms, k + 1)
        slope = np.abs(activation.backward(np.ones_like(a_want), saved_want[1] if activation.saves == "z" else None,
                                           saved_want[1] if activation.saves == "a" else None)) + 1.0
        a_allow = accuracy.activation_bound(a_want, z) + slope * z_err
        near = accuracy.near_kink(activation, z, x, w, bias, accuracy.unit_roundoff(dtype))
        dz_want = np.abs(da) * slope
        flip = np.zeros_like(da) if near is None else near * np.abs(da) * accuracy.kinks(activation)[1]
        dz_allow = accuracy.activation_bound(dz_want, z, da) + np.abs(da) * z_err * 4 + flip
        dw_allow = accuracy.dot_error_bound(np.abs(x).T @ (dz_want + dz_allow), n) + np.abs(x).T @ dz_allow
        db_allow = accuracy.dot_error_bound((dz_want + dz_allow).sum(axis=0), n) + dz_allow.sum(axis=0)
        dx_allow = accuracy.dot_error_bound((dz_want + dz_allow) @ np.abs(w).T, m) + dz_allow @ np.abs(w).T
    else:
        a_allow = dw_allow = db_allow = dx_allow = 0.0
    close(host(b, a), a_want, tol, f"forward a, {msg}", a_allow)
    close(host(b, a_inf), a_want, tol, f"inference a, {msg}", a_allow)
    close(host(b, dw), dw_want, tol, f"dW, {msg}", dw_allow)
    close(host(b, db), db_want, tol, f"db, {msg}", db_allow)
    close(host(b, dx), dx_want, tol, f"dx, {msg}", dx_allow)
    assert host(b, dw2).tolist() == host(b, dw).tolist(), f"dW differs without dx, {msg}"


# --- losses: Backend.loss(rule, ...) for every registered loss row ------------------------------------

LOSS_SHAPES = [(1, 1), (7, 3), (33, 17)]
LOSS_RULES = gp.losses.RULES
#: each kind of problem: (the loss row, what its target is)
LOSS_KINDS = {"mse": "mse", "ce_labels": "cross_entropy", "ce_probs": "cross_entropy", "bce": "bce_with_logits"}


def test_every_loss_row_is_checked():
    assert set(LOSS_KINDS.values()) == set(LOSS_RULES), "a loss row without a conformance problem"


def _loss_problem(rng, kind: str, shape: tuple[int, int], dtype: str):
    """(rule, pred, target, target dtype) with inputs rounded to ``dtype`` (the spec runs on those values)."""
    n, c = shape
    pred = (3 * rng.standard_normal(shape)).astype(dtype).astype(np.float64)
    if kind == "ce_labels":
        target = rng.integers(0, c, size=n)
    elif kind == "ce_probs":
        t = rng.uniform(size=shape)
        target = (t / t.sum(axis=1, keepdims=True)).astype(dtype).astype(np.float64)
    elif kind == "bce":
        target = rng.uniform(size=shape).astype(dtype).astype(np.float64)
    else:
        target = rng.standard_normal(shape).astype(dtype).astype(np.float64)
    return LOSS_RULES[LOSS_KINDS[kind]], pred, target, (np.int64 if kind == "ce_labels" else dtype)


def _per_row(rule, c: int) -> int:
    """Terms per row: C for an element-wise loss, 1 for the softmax rows."""
    return c if rule.family == "elementwise" else 1


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", list(LOSS_KINDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _backends())
def test_losses(name, dtype, kind, shape, seed):
    b = backend_for(name, dtype)
    rng = np.random.default_rng(seed)
    n, c = shape
    rule, pred, target, tdt = _loss_problem(rng, kind, shape, dtype)
    scale = 1.0 / (n * _per_row(rule, c))
    v_want, g_want = rule.spec(pred, target, scale)
    v, g = b.loss(rule, b.asarray(pred, dtype), b.asarray(target, tdt), scale)
    msg = f"{name} {dtype} {kind} {shape} seed {seed}"
    # float64: two correct formulas; float32: a few ulp of exp/log1p, and the row sums of softmax.
    tol = accuracy.ELEMENTWISE[dtype] if dtype == "float64" else accuracy.MODEL[dtype]
    close(np.array([float(v)]), np.array([v_want]), tol, f"value, {msg}")
    close(host(b, g), g_want, tol, f"gradient, {msg}")


WEIGHTED_SHAPES = [(1, 1), (7, 3), (33, 17), (130, 1)]


@pytest.mark.parametrize("shape", WEIGHTED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", list(LOSS_KINDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _backends())
def test_weighted_losses(name, dtype, kind, shape, seed):
    """Row weights (zeros among them): value and gradient against the float64 spec, for the weighted
    mean (scale 1 / (per-row count x sum w)) and the weighted sum (scale 1); and weights of 1 give
    the unweighted value and gradient bit for bit."""
    b = backend_for(name, dtype)
    rng = np.random.default_rng(seed)
    if name == "cudasim" and kind.startswith("ce"):
        shape = (min(shape[0], 5), shape[1])  # the simulator runs a block of Python threads per row
    n, c = shape
    rule, pred, target, tdt = _loss_problem(rng, kind, shape, dtype)
    w = rng.uniform(0.0, 3.0, size=n)
    w[rng.random(n) < 0.3] = 0.0
    w[rng.integers(n)] = 1.5  # not all zero
    per_row = _per_row(rule, c)
    msg = f"{name} {dtype} {kind} {shape} seed {seed}"
    tol = accuracy.ELEMENTWISE[dtype] if dtype == "float64" else accuracy.MODEL[dtype]
    pd, td = b.asarray(pred, dtype), b.asarray(target, tdt)
    for scale in (1.0 / (per_row * float(np.sum(w))), 1.0):
        v_want, g_want = rule.spec(pred, target, scale, w)
        v, g = b.loss(rule, pd, td, scale, b.asarray(w, np.float64))
        close(np.array([float(v)]), np.array([v_want]), tol, f"weighted value scale={scale}, {msg}")
        close(host(b, g), g_want, tol, f"weighted gradient scale={scale}, {msg}")
        assert not np.isnan(host(b, g)).any(), f"unwritten gradient, {msg}"
    scale = 1.0 / (per_row * n)
    v0, g0 = b.loss(rule, pd, td, scale)
    v1, g1 = b.loss(rule, pd, td, 1.0 / (per_row * float(n)), b.asarray(np.ones(n), np.float64))
    assert float(v1) == float(v0), f"weights of 1 change the value, {msg}"
    assert b.to_numpy(g1).tobytes() == b.to_numpy(g0).tobytes(), f"weights of 1 change the gradient, {msg}"


def test_weighted_spec_is_the_weighted_sum_of_row_losses(seed):
    """The spec: the weighted value is sum_i w_i (unweighted loss of row i) and row i's gradient is
    w_i times its unweighted gradient (float64, every loss)."""
    rng = np.random.default_rng(seed)
    for kind in LOSS_KINDS:
        rule, pred, target, _ = _loss_problem(rng, kind, (6, 4), "float64")
        w = rng.uniform(0.0, 2.0, size=6)
        fn = rule.spec
        value, grad = fn(pred, target, 0.5, w)
        rows = [fn(pred[i : i + 1], target[i : i + 1], 0.5) for i in range(6)]
        assert value == pytest.approx(sum(wi * r[0] for wi, r in zip(w, rows, strict=True)), rel=1e-13), kind
        np.testing.assert_allclose(grad, np.concatenate([wi * r[1] for wi, r in zip(w, rows, strict=True)]),
                                   rtol=1e-14, atol=1e-16, err_msg=f"{kind} seed {seed}")


# --- optimizer updates --------------------------------------------------------------------------------

RULES = {cls.rule.name: cls.rule for cls in gp.optim.OPTIMIZERS.values()}
# every rule's example hyper-parameter sets (they cover its branches): "sgd0", "sgd1", ..., "adam0", ...
UPDATES = {f"{name}{k}": (rule, hp) for name, rule in RULES.items() for k, hp in enumerate(rule.examples)}


def _state(rule, hp, n, dtype, fill=0.0):
    """The rule's buffers under ``hp``'s flags, as host arrays (None where unused)."""
    return [np.full(n, fill, dtype) if u else None for u in rule.uses(rule.pack(hp, 2, dtype).flags)]


def _spec(rule, p, g, bufs, hp, step):
    """One step of the rule's NumPy spec (in the arrays' dtype)."""
    rule.spec(p, g, tuple(bufs), rule.pack(hp, step, p.dtype))


@pytest.mark.parametrize("n", FLAT_SIZES)
@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _backends())
def test_optimizer_updates(name, dtype, update, n, seed):
    """Three steps from the same state as the rule's spec run in the same dtype: equal to a few ulp."""
    b = backend_for(name, dtype)
    rule, hp = UPDATES[update]
    rng = np.random.default_rng(seed)
    p_host = rng.standard_normal(n).astype(dtype)
    bufs_host = _state(rule, hp, n, dtype)
    p = b.asarray(p_host, dtype)
    bufs = [None if v is None else b.asarray(v, dtype) for v in bufs_host]
    for step in range(1, 4):
        g_host = rng.standard_normal(n).astype(dtype)
        g_host[0] *= 1e-30  # a gradient of almost nothing: Adam's sign(g) regime
        _spec(rule, p_host, g_host, bufs_host, hp, step)
        b.update(rule, p, b.asarray(g_host, dtype), tuple(bufs), rule.pack(hp, step, np.dtype(dtype)))
        ulp = 8 * np.finfo(dtype).eps
        msg = f"{name} {dtype} {update} n={n} step {step} seed {seed}"
        close(host(b, p), p_host, accuracy.Tolerance(atol=ulp * hp["lr"], rtol=ulp), f"parameters, {msg}")
        for k, got, want in zip(rule.state, bufs, bufs_host, strict=True):
            if want is not None:
                close(host(b, got), want, accuracy.Tolerance(atol=0.0, rtol=ulp), f"{k}, {msg}")


@pytest.mark.parametrize("name", _backends())
def test_an_update_refuses_a_missing_buffer(name):
    b = backend_for(name, "float32")
    rule = gp.optim.Adam.rule
    hp = rule.pack(dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, amsgrad=True), 1, np.float32)
    z = b.asarray(np.zeros(3, np.float32), "float32")
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        b.update(rule, z, z, (z, z, None), hp)
    with pytest.raises(ValueError, match="3 buffers"):
        b.update(rule, z, z, (z, z), hp)


@pytest.mark.parametrize("update", sorted(UPDATES))
@pytest.mark.parametrize("name", _backends())
def test_a_set_guard_leaves_parameters_and_state_untouched(name, update, seed):
    """guard[0] != 0: the update writes nothing; guard[0] == 0: the update of the spec."""
    dtype, n = "float32", 130
    b = backend_for(name, dtype)
    rule, hp = UPDATES[update]
    rng = np.random.default_rng(seed)
    # a valid state (centred RMSprop needs square_avg >= grad_avg**2): one step of the spec from zeros
    p_host = rng.standard_normal(n).astype(dtype)
    bufs_host = _state(rule, hp, n, dtype)
    _spec(rule, p_host, rng.standard_normal(n).astype(dtype), bufs_host, hp, 1)
    g_host = rng.standard_normal(n).astype(dtype)
    for tag in (3, 0):
        p = b.asarray(p_host.copy(), dtype)  # copies: the reference backend keeps host arrays as they are
        bufs = [None if v is None else b.asarray(v.copy(), dtype) for v in bufs_host]
        guard = b.asarray(np.array([tag], np.int64), np.int64)
        b.update(rule, p, b.asarray(g_host, dtype), tuple(bufs), rule.pack(hp, 2, np.dtype(dtype)), guard)
        got = [host(b, p)] + [host(b, v) for v in bufs if v is not None]
        if tag:
            want = [p_host] + [v for v in bufs_host if v is not None]
        else:
            ref_p, ref_bufs = p_host.copy(), [None if v is None else v.copy() for v in bufs_host]
            _spec(rule, ref_p, g_host.copy(), ref_bufs, hp, 2)
            want = [ref_p] + [v for v in ref_bufs if v is not None]
        ulp = 8 * np.finfo(dtype).eps
        for i, (x, w) in enumerate(zip(got, want, strict=True)):
            tol = accuracy.Tolerance(atol=0.0, rtol=0.0) if tag else accuracy.Tolerance(atol=ulp * hp["lr"], rtol=ulp)
            close(x, np.asarray(w, np.float64), tol, f"{name} {update} guard={tag} array {i} seed {seed}")


# --- reductions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", FLAT_SIZES + [2500])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _backends())
def test_reductions(name, dtype, n, seed):
    b = backend_for(name, dtype)
    rng = np.random.default_rng(seed)
    g_host = rng.standard_normal(n).astype(dtype)
    g64 = g_host.astype(np.float64)
    msg = f"{name} {dtype} n={n} seed {seed}"
    want_sq = float(np.sum(g64 * g64))
    tol = accuracy.Tolerance(atol=0.0, rtol=1e-13)  # float64 accumulation of exact float32/64 squares
    g = b.asarray(g_host, dtype)
    close(np.array([b.sum_of_squares(g)]), np.array([want_sq]), tol, f"sum_of_squares, {msg}")
    assert b.max_abs(g) == float(np.max(np.abs(g64))), msg
    out = b.asarray(np.array([np.nan]), np.float64)
    b.reduce_into(g, out, "maxabs")
    assert host(b, out)[0] == float(np.max(np.abs(g64))), msg
    b.reduce_into(g, out, "maxabs", accumulate=True)
    assert host(b, out)[0] == float(np.max(np.abs(g64))), msg
    big = b.asarray(np.array([1e300]), np.float64)
    b.reduce_into(g, big, "maxabs", accumulate=True)
    assert host(b, big)[0] == 1e300, msg
    assert b.all_finite(g), msg
    b.sum_of_squares_into(g, out)
    close(host(b, out), np.array([want_sq]), tol, f"sum_of_squares_into, {msg}")
    b.sum_of_squares_into(g, out, accumulate=True)
    close(host(b, out), np.array([2 * want_sq]), tol, f"sum_of_squares_into accumulate, {msg}")
    norm = float(np.sqrt(2 * want_sq))
    for max_norm in (norm / 3, norm * 3):  # clipped, then left alone
        h = b.asarray(g_host.copy(), dtype)  # the reference backend takes host arrays without a copy
        b.clip_scale_(h, out, max_norm)
        # the factor from the squared norm the backend was given (its own rounding of the sum)
        coef = max_norm / (float(np.sqrt(host(b, out)[0])) + 1e-6)
        want = g64 * np.asarray(coef, dtype=dtype).astype(np.float64) if coef < 1 else g64
        close(host(b, h), want, accuracy.Tolerance(atol=0.0, rtol=np.finfo(dtype).eps), f"clip_scale_ {max_norm}, {msg}")
    h = b.asarray(g_host.copy(), dtype)
    b.scale_(h, 0.5)
    assert host(b, h).tolist() == (g64 * 0.5).tolist(), msg


# --- a model on every backend: the interface is all it needs --------------------------------------------


@pytest.mark.parametrize("name", _backends())
def test_a_model_trains_the_same_on_every_backend(name, seed):
    """Two epochs of fit (shuffle, last partial batch, clipping) vs the reference, in float64."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((23, 3)), rng.integers(0, 4, size=23)

    def run(device: str, impl: str = "auto") -> gp.Sequential:
        model = gp.Sequential(gp.Dense(3, 5, "tanh"), gp.Dense(5, 4), device=device, dtype="float64", seed=seed % 97,
                              dense_impl=impl)
        model.fit(x, y, "cross_entropy", gp.optim.Adam(model.parameters(), lr=1e-2), epochs=2, batch_size=8,
                  clip_grad_norm=0.5, verbose=0)
        return model

    want = run("cpu", "reference").arena.data
    model = run("cpu", "reference") if name == "numpy" else run(name)
    close(host(model.arena.backend, model.arena.data), want, accuracy.MODEL["float64"], f"{name} seed {seed}")


# --- mixed precision: every backend against the spec under the same precision (gpubp.precision) -------

MIXED = ["tf32", "bf16-mixed", "fp16-mixed"]
MIXED_ACTS = ["identity", "relu", "sigmoid", "gelu"]
MIXED_SHAPES = [(7, 3, 5), (17, 33, 13)]


def _mixed_shapes(name: str) -> list:
    return MIXED_SHAPES[:1] if name == "cudasim" else MIXED_SHAPES


def _representable(b: Backend, a, kind) -> bool:
    """Whether every value of ``a`` is one of ``kind``'s (round_to leaves it as it is, bit for bit)."""
    from gpubp.precision import round_to

    h = np.asarray(b.to_numpy(a), dtype=np.float32)
    return kind is None or bool((round_to(np, h, kind).view(np.uint32) == h.view(np.uint32)).all())


@pytest.mark.parametrize("act", MIXED_ACTS)
@pytest.mark.parametrize("precision", MIXED)
@pytest.mark.parametrize("name", _dense_backends())
def test_dense_under_a_precision(name, precision, act, seed):
    """dense_forward / dense_backward under a precision vs numpy_ref under the same precision (the spec):
    rounded values agree to one ulp of their kind beyond the float32 differences (summation order, libm)
    that may move a rounding across a tie; the backward runs from the backend's own saved tensors."""
    from gpubp import precision as prec_mod

    P = prec_mod.get(precision)
    b = backend_for(name, "float32")
    activation = _act(act)
    for shape in _mixed_shapes(name):
        n, k, m = shape
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, k)).astype(np.float32)
        w = (rng.standard_normal((k, m)) / np.sqrt(k)).astype(np.float32)
        bias = rng.standard_normal(m).astype(np.float32)
        da = prec_mod.round_to(np, rng.standard_normal((n, m)).astype(np.float32), P.store)
        msg = f"{name} {precision} {act} {shape} seed {seed}"

        a_want, (xg_want, kept_want) = numpy_ref.dense_forward(x, w, bias, activation, True, P)
        xd, wd, bd = b.asarray(x, "float32"), b.asarray(w, "float32"), b.asarray(bias, "float32")
        a, saved = b.dense_forward(xd, wd, bd, activation, True, precision=P)
        a_inf, none = b.dense_forward(xd, wd, bd, activation, False, precision=P)
        assert none == ()
        assert _representable(b, a, P.store) and _representable(b, saved[0], P.gemm), msg
        assert host(b, saved[0]).tolist() == xg_want.astype(np.float64).tolist(), f"saved x, {msg}"

        xg, wg = (prec_mod.round_to(np, v, P.gemm).astype(np.float64) for v in (x, w))
        z = xg @ wg + bias
        z_err = accuracy.dot_error_bound(np.abs(xg) @ np.abs(wg) + np.abs(bias), k + 1)
        slope = np.abs(activation.backward(np.ones_like(z), z, activation.forward(z))) + 1.0
        a_pre = accuracy.activation_bound(activation.forward(z), z) + slope * z_err
        a_allow = a_pre + accuracy.ulp_bound(np.abs(a_want) + a_pre, P.store)
        tol = accuracy.Tolerance(0.0, 0.0)
        close(host(b, a), a_want, tol, f"forward a, {msg}", a_allow)
        close(host(b, a_inf), a_want, tol, f"inference a, {msg}", a_allow)
        if activation.saves:
            kept = host(b, saved[1])
            assert _representable(b, saved[1], P.store), msg
            if not (name == "cpu" and act == "relu"):  # the CPU keeps relu's a as the mask
                close(kept, kept_want, tol, f"saved, {msg}",
                      (z_err if activation.saves == "z" else a_pre) + accuracy.ulp_bound(np.abs(kept_want) + a_pre, P.store))

        # backward from the backend's saved tensors, the spec on the same (host) values
        saved_host = (np.asarray(b.to_numpy(saved[0])),
                      None if saved[1] is None else np.asarray(b.to_numpy(saved[1])))
        dw_want, db_want = np.empty_like(w), np.empty_like(bias)
        dx_want = numpy_ref.dense_backward(da, saved_host, w, activation, dw_want, db_want, True, P)
        dw, db = poisoned(b, w.shape, "float32"), poisoned(b, bias.shape, "float32")
        dx = b.dense_backward(b.asarray(da, "float32"), saved, wd, activation, dw, db, True, precision=P)
        dw2, db2 = poisoned(b, w.shape, "float32"), poisoned(b, bias.shape, "float32")
        assert b.dense_backward(b.asarray(da, "float32"), saved, wd, activation, dw2, db2, False, precision=P) is None
        assert _representable(b, dx, P.store), msg

        s = saved_host[1]
        dz = np.asarray(activation.backward(da.astype(np.float64), None if s is None else s.astype(np.float64),
                                            None if s is None else s.astype(np.float64)), dtype=np.float64)
        if act in ("identity", "relu"):
            dz_allow = np.zeros_like(dz)  # exact in float32
        else:
            dz_allow = accuracy.activation_bound(dz, s if activation.saves == "z" else 0.0, da)
        dzg = np.abs(prec_mod.round_to(np, dz.astype(np.float32), P.gemm)).astype(np.float64)
        flip = np.where(dz_allow > 0, dz_allow + accuracy.ulp_bound(np.abs(dz) + dz_allow, P.gemm), 0.0)
        dw_allow = accuracy.dot_error_bound(np.abs(xg).T @ (dzg + flip), n) + np.abs(xg).T @ flip
        db_allow = accuracy.dot_error_bound((np.abs(dz) + dz_allow).sum(axis=0), n) + dz_allow.sum(axis=0)
        dx_pre = accuracy.dot_error_bound((dzg + flip) @ np.abs(wg).T, m) + flip @ np.abs(wg).T
        dx_allow = dx_pre + accuracy.ulp_bound(np.abs(dx_want) + dx_pre, P.store)
        close(host(b, dw), dw_want, tol, f"dW, {msg}", dw_allow)
        close(host(b, db), db_want, tol, f"db, {msg}", db_allow)
        close(host(b, dx), dx_want, tol, f"dx, {msg}", dx_allow)
        assert host(b, dw2).tolist() == host(b, dw).tolist(), f"dW differs without dx, {msg}"


@pytest.mark.parametrize("precision", [None, "fp32", *MIXED])
@pytest.mark.parametrize("name", _backends())
def test_dropout_under_a_precision(name, precision, seed):
    """dropout_forward / dropout_backward: the spec's bits (the mask is the same, the product one
    float32 multiplication, the rounding exact); None and fp32 are the calls without a precision."""
    from gpubp import precision as prec_mod

    b = backend_for(name, "float32")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    dy = rng.standard_normal((7, 5)).astype(np.float32)
    y_want, keep_want = numpy_ref.dropout_forward(x, 12345, 0.3, prec_mod.get(precision))
    y, keep = b.dropout_forward(b.asarray(x, "float32"), 12345, 0.3, precision=prec_mod.get(precision))
    assert np.asarray(b.to_numpy(y)).view(np.uint32).tolist() == y_want.view(np.uint32).tolist()
    dx_want = numpy_ref.dropout_backward(dy, keep_want, 0.3, prec_mod.get(precision))
    dx = b.dropout_backward(b.asarray(dy, "float32"), keep, 0.3, precision=prec_mod.get(precision))
    assert np.asarray(b.to_numpy(dx)).view(np.uint32).tolist() == dx_want.view(np.uint32).tolist()
    if precision in (None, "fp32"):
        y0, _ = b.dropout_forward(b.asarray(x, "float32"), 12345, 0.3)
        assert np.asarray(b.to_numpy(y0)).view(np.uint32).tolist() == y_want.view(np.uint32).tolist()


@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
@pytest.mark.parametrize("name", _dense_backends())
def test_dense_fp32_precision_is_the_plain_path(name, act, seed):
    """precision=None and precision="fp32" are the calls without a precision, bit for bit."""
    from gpubp import precision as prec_mod

    b = backend_for(name, "float32")
    activation = _act(act)
    rng = np.random.default_rng(seed)
    x, w, bias, da = (b.asarray(rng.standard_normal(s), "float32") for s in ((7, 3), (3, 5), (5,), (7, 5)))
    runs = []
    for kw in ({}, {"precision": None}, {"precision": prec_mod.get("fp32")}):
        a, saved = b.dense_forward(x, w, bias, activation, True, **kw)
        dw, db = b.zeros((3, 5), "float32"), b.zeros(5, "float32")
        dx = b.dense_backward(da, saved, w, activation, dw, db, True, **kw)
        runs.append([np.asarray(b.to_numpy(v)).view(np.uint32).tolist() for v in (a, dw, db, dx)])
    assert runs[0] == runs[1] == runs[2]
