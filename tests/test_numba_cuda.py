"""Tests for gpubp.backends.numba_cuda against the NumPy reference.

Without a GPU the kernels run under the Numba CUDA simulator (conftest sets
NUMBA_ENABLE_CUDASIM before numba is imported); with one, the same tests run on
device arrays. Inputs are fresh random numbers on every run (the seed is printed,
and shown by pytest on failure); every output is filled with NaN before a launch,
so an element a kernel forgets to write fails the comparison.

The simulator runs each CUDA thread as a Python thread, so shapes stay small and
blocks narrow; a shorter thread switch interval keeps its barriers quick.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpubp.activations import NAMES, Activation
from gpubp.backends import numba_cuda as nk
from gpubp.losses import RULES as LOSSES
from tests.conftest import CUDA_MODE

SIM = CUDA_MODE == "simulator"
DTYPES = [np.float32, np.float64]
REPO = Path(__file__).resolve().parents[1]

# Elementwise results: a few ulp of float32 (device libm vs NumPy) / of float64.
TOL = {np.float32: {"rtol": 2e-5, "atol": 2e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-13}}


# --- helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _quick_simulator_barriers():
    """The simulator polls for blocked threads; a short switch interval makes syncthreads cheap."""
    if not SIM:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def rng():
    """Unseeded: fresh inputs on every run; the seed is printed to reproduce a failure."""
    seed = np.random.SeedSequence().entropy
    print(f"numba kernel test seed: {seed}")
    return np.random.default_rng(seed)


def dev(x):
    """The array as the kernels take it here: NumPy under the simulator, a device array on a GPU."""
    x = np.ascontiguousarray(x)
    if SIM:
        return x
    from numba import cuda

    return cuda.to_device(x)


def host(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.copy()
    from numba import cuda

    cuda.synchronize()
    return x.copy_to_host()


def poisoned(shape, dtype):
    return dev(np.full(shape, np.nan, dtype=dtype))


def bits(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).tobytes()


def act_inputs(rng, n: int, dtype) -> np.ndarray:
    """Random z with hard cases mixed in: 0, +-1e4, +-3e19, around the softplus thresholds, tiny."""
    special = np.array([0.0, 1e4, -1e4, 20.0, 2.5, -30.0, 30.0, 1e-3, -1e-3, 5.0, 6.0, 3e19, -3e19])
    z = rng.standard_normal(n) * 4.0
    k = min(n, len(special))
    z[:k] = special[:k] if n > 3 else rng.choice(special, size=k, replace=False)
    rng.shuffle(z)
    return z.astype(dtype)


ACTS = [(name, {}) for name in NAMES] + [
    ("leaky_relu", {"slope": 0.2}),
    ("elu", {"alpha": 1.7}),
    ("softplus", {"beta": 2.0, "threshold": 5.0}),
    ("softplus", {"beta": 0.5, "threshold": 3.0}),
]
ACT_IDS = [name + "".join(f"-{k}{v}" for k, v in params.items()) for name, params in ACTS]
SIZES = [1, 3, 33, 129]


def test_mode_agrees_with_conftest():
    assert nk.SIMULATOR == SIM


# --- 1. activations ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "params"), ACTS, ids=ACT_IDS)
def test_activation_forward(rng, name, params, dtype):
    act = Activation(name, **params)
    for n in SIZES:
        z = act_inputs(rng, n, dtype)
        out = poisoned(n, dtype)
        got = nk.activation_forward(dev(z), act, out=out, threads=32)
        assert got is out
        np.testing.assert_allclose(host(out), act.forward(z), **TOL[dtype], err_msg=f"{act} n={n}")
    # Allocated output, 2-D shape, and a grid smaller than the data (grid-stride loop).
    z = act_inputs(rng, 17 * 33, dtype).reshape(17, 33)
    a = host(nk.activation_forward(dev(z), act, threads=16, max_blocks=3))
    assert a.shape == z.shape and a.dtype == dtype
    np.testing.assert_allclose(a, act.forward(z), **TOL[dtype], err_msg=f"{act} grid-stride")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "params"), ACTS, ids=ACT_IDS)
def test_bias_activation_forward(rng, name, params, dtype):
    """The dense epilogue: a = f(z + b); z becomes z + b only when asked (keep_z)."""
    act = Activation(name, **params)
    for shape in [(1, 1), (3, 5), (17, 33)]:
        z = act_inputs(rng, shape[0] * shape[1], dtype).reshape(shape)
        b = rng.standard_normal(shape[1]).astype(dtype)
        want_z = z + b
        for keep_z in (True, False):
            zd = dev(z.copy())
            out = poisoned(z.size, dtype).reshape(shape)
            nk.bias_activation_forward(zd, dev(b), act, out, keep_z, threads=32, max_blocks=2)
            np.testing.assert_allclose(host(out), act.forward(want_z), **TOL[dtype], err_msg=f"{act} {shape}")
            np.testing.assert_array_equal(host(zd), want_z if keep_z else z)
        # In place: a written over z (what identity, sigmoid and tanh layers do).
        zd = dev(z.copy())
        nk.bias_activation_forward(zd, dev(b), act, zd, False, threads=32)
        np.testing.assert_allclose(host(zd), act.forward(want_z), **TOL[dtype], err_msg=f"{act} in place")


def backward_slack(name: str, z: np.ndarray, da: np.ndarray, dtype) -> np.ndarray:
    """Absolute error allowed in dz = da f'(z): a few ulp of |da| times the conditioning of f'.

    gelu_tanh: f' has 1 + t and 1 - t^2 with t = tanh(u) near +-1, multiplied by
    z/2 k (1 + 3c z^2): one ulp of t costs up to that factor. silu: z (1 - s), one ulp
    of s costs |z|. gelu: z phi(z) adds |z| phi(z) <= 1. Others: 1.
    """
    z = np.abs(z.astype(np.float64))
    cond = np.ones_like(z)
    if name == "gelu_tanh":
        zc = np.minimum(z, 1e6)
        cond += 0.5 * z * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * zc * zc)
    elif name in ("silu", "gelu"):
        cond += z
    return 8 * float(np.finfo(dtype).eps) * np.abs(da.astype(np.float64)) * cond


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "params"), ACTS, ids=ACT_IDS)
def test_activation_backward(rng, name, params, dtype):
    act = Activation(name, **params)
    for n in [*SIZES, 17 * 33]:
        z = act_inputs(rng, n, dtype)
        a = act.forward(z)
        da = rng.standard_normal(n).astype(dtype)
        want = act.backward(da, z, a)
        # Only what the activation saves is handed over; the rest is None.
        zz = dev(z) if act.saves == "z" else None
        aa = dev(a) if act.saves == "a" else None
        out = poisoned(n, dtype)
        nk.activation_backward(dev(da), zz, aa, act, out=out, threads=32, max_blocks=2 if n > 100 else nk.MAX_BLOCKS)
        got = host(out)
        slack = TOL[dtype]["rtol"] * np.abs(want) + TOL[dtype]["atol"] + backward_slack(name, z, da, dtype)
        bad = ~(np.abs(got.astype(np.float64) - want) <= slack)
        assert not bad.any(), f"{act} n={n}: z={z[bad]} got={got[bad]} want={want[bad]}"


def test_activation_backward_relu_passes_da_exactly(rng):
    # np.where(z > 0, da, 0): an inf/NaN da below zero gives 0, as in the reference.
    z = np.array([-1.0, 0.0, 2.0, -3.0, 4.0])
    da = np.array([np.inf, np.nan, 1.5, -2.0, np.nan])
    out = poisoned(5, np.float64)
    nk.activation_backward(dev(da), dev(z), None, "relu", out=out, threads=4)
    np.testing.assert_array_equal(host(out), Activation("relu").backward(da, z, None))


def test_activation_rejects_bad_arguments():
    z = np.zeros(4, np.float32)
    with pytest.raises(TypeError):
        nk.activation_forward(np.zeros(4, np.int32), "relu")
    with pytest.raises(ValueError):
        nk.activation_forward(z, "relu", out=np.zeros(4, np.float64))
    with pytest.raises(ValueError):
        nk.activation_backward(z, None, None, "tanh")
    with pytest.raises(ValueError):
        nk.activation_forward(np.zeros((4, 4), np.float32)[:, ::2], "relu")


# --- 2. bias gradient ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33), (129, 3)], ids=str)
def test_bias_grad_matches_reference(rng, shape, dtype):
    dz = (rng.standard_normal(shape) * 3.0).astype(dtype)
    db = poisoned(shape[1], dtype)
    nk.bias_grad(dev(dz), db, tile=8, row_threads=4)
    got = host(db)
    want = dz.sum(axis=0)
    eps = float(np.finfo(dtype).eps)
    mass = np.abs(dz).astype(np.float64).sum(axis=0)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert np.all(diff <= 4 * eps * mass), (got, want)
    if dtype == np.float32:
        # Summed in float64 and rounded once: within half an ulp of the exact column sums.
        exact = dz.astype(np.float64).sum(axis=0)
        assert np.all(np.abs(got - exact) <= 0.5 * eps * np.abs(exact) + 1e-12 * mass), (got, exact)


def test_bias_grad_chunks_follow_rows_only():
    assert nk.bias_grad_chunks(0) == 1
    assert nk.bias_grad_chunks(129) == 5  # 32 rows per chunk for small N
    assert nk.bias_grad_rows_per_chunk(10**7) * nk.BG_MAX_CHUNKS >= 10**7
    assert nk.bias_grad_chunks(10**7) <= nk.BG_MAX_CHUNKS


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_bias_grad_deterministic_whatever_the_launch(rng, dtype):
    dz = (rng.standard_normal((129, 5)) * 10.0).astype(dtype)
    dz[::7] *= 1e6  # a wide range of magnitudes makes the summation order visible
    d = dev(dz)
    results = []
    for tile, row_threads in [(8, 8), (8, 8), (3, 2), (1, 1), (32, 1)]:
        db = poisoned(5, dtype)
        work = poisoned(nk.bias_grad_work_size(*dz.shape) + 3, np.float64)
        nk.bias_grad(d, db, work=work, tile=tile, row_threads=row_threads)
        results.append(host(db))
    assert all(bits(r) == bits(results[0]) for r in results[1:]), results
    mass = np.abs(dz).astype(np.float64).sum(axis=0)
    err = np.abs(results[0] - dz.astype(np.float64).sum(axis=0))
    assert np.all(err <= 4 * np.finfo(dtype).eps * mass), err


def test_bias_grad_rejects_bad_arguments():
    dz = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError):
        nk.bias_grad(dz, np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        nk.bias_grad(dz, np.zeros(3, np.float32), tile=33)
    with pytest.raises(ValueError):
        nk.bias_grad(dz, np.zeros(3, np.float32), work=np.zeros(1, np.float64))


# --- 3. losses ----------------------------------------------------------------------------


MSE, BCE, CE = LOSSES["mse"], LOSSES["bce_with_logits"], LOSSES["cross_entropy"]


def run_loss(rule, x, target, scale, **kw):
    """Launch the loss ``rule`` (nk.loss) on poisoned outputs and scratch; return (value, grad) on the host."""
    value = poisoned(1, np.float64)
    grad = poisoned(x.shape, x.dtype)
    rowwise = rule.family == "softmax"
    work = poisoned(max(1, nk.loss_work_size(x.shape, rowwise=rowwise)) + 2, np.float64)
    nk.loss(rule, dev(x), dev(target), scale, value, grad, work=work, **kw)
    v = host(value)
    assert v.shape == (1,)
    return float(v[0]), host(grad)


def check_loss(got, want, dtype, what):
    (v, g), (vr, gr) = got, want
    vt = 1e-5 if dtype == np.float32 else 1e-11
    assert np.isfinite(v), what
    assert abs(v - vr) <= vt * max(abs(vr), 1e-30) + 1e-300, (what, v, vr)
    gmax = float(np.abs(gr).max()) if gr.size else 0.0
    tol = TOL[dtype]
    np.testing.assert_allclose(g, gr, rtol=tol["rtol"], atol=tol["atol"] * max(gmax, 1e-30), err_msg=what)


LOSS_SHAPES = [(1, 1), (3, 5), (17, 33), (70, 33)]  # 70 x 33 spans two CHUNKs


def mse_inputs(rng, shape, dtype):
    return (rng.standard_normal(shape) * 2).astype(dtype), rng.standard_normal(shape).astype(dtype)


def bce_inputs(rng, shape, dtype):
    x = rng.standard_normal(shape) * 4
    flat = x.reshape(-1)
    flat[: min(4, flat.size)] = [1e4, -1e4, 0.0, 40.0][: min(4, flat.size)]
    t = rng.random(shape)
    t.reshape(-1)[::3] = np.round(t.reshape(-1)[::3])  # some hard 0/1 targets
    return x.astype(dtype), t.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
@pytest.mark.parametrize("loss", ["mse", "bce_with_logits"])
def test_elementwise_loss_matches_reference(rng, loss, shape, dtype):
    make = mse_inputs if loss == "mse" else bce_inputs
    x, t = make(rng, shape, dtype)
    for scale in (1.0 / x.size, 1.0):
        got = run_loss(LOSSES[loss], x, t, scale, threads=16)
        check_loss(got, LOSSES[loss].spec(x, t, scale), dtype, f"{loss} {shape} scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 129), (5, 300)], ids=str)
@pytest.mark.parametrize("kind", ["labels", "probs"])
def test_cross_entropy_matches_reference(rng, kind, shape, dtype):
    n, c = shape
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if kind == "labels":
        t = rng.integers(0, c, size=n).astype(np.int64)
    else:
        t = rng.random(shape) * (rng.random((n, 1)) < 0.5)  # some rows all zero
        t[n // 2 :] /= t[n // 2 :].sum(axis=1, keepdims=True) + 1e-30  # some rows normalised
        t = t.astype(dtype)
    for scale, max_blocks in ((1.0 / n, nk.MAX_BLOCKS), (1.0, 2)):
        got = run_loss(CE, x, t, scale, threads=16, max_blocks=max_blocks)
        check_loss(got, CE.spec(x, t, scale), dtype, f"{kind} {shape} scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_losses_finite_at_extreme_logits(rng, dtype):
    n, c = 6, 40
    x = (rng.choice([-1.0, 1.0], size=(n, c)) * 1e4 * rng.random((n, c))).astype(dtype)
    x[0] = 1e4
    x[1] = -1e4
    x[2, 3] = 1e4
    labels = rng.integers(0, c, size=n).astype(np.int64)
    probs = rng.random((n, c)).astype(dtype)
    scale = 1.0 / n
    for t in (labels, probs):
        v, g = run_loss(CE, x, t, scale, threads=16)
        assert np.isfinite(v) and np.isfinite(g).all()
        check_loss((v, g), CE.spec(x, t, scale), dtype, f"extreme ce {t.dtype}")
    tb = rng.random((n, c)).astype(dtype)
    v, g = run_loss(BCE, x, tb, scale, threads=16)
    assert np.isfinite(v) and np.isfinite(g).all()
    check_loss((v, g), BCE.spec(x, tb, scale), dtype, "extreme bce")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_loss_values_deterministic_whatever_the_launch(rng, dtype):
    cases = [
        (MSE, *mse_inputs(rng, (70, 33), dtype)),
        (BCE, *bce_inputs(rng, (70, 33), dtype)),
        (CE, (rng.standard_normal((5, 200)) * 5).astype(dtype), rng.integers(0, 200, 5)),
        (CE, (rng.standard_normal((5, 200)) * 5).astype(dtype), rng.random((5, 200)).astype(dtype)),
    ]
    for fn, x, t in cases:
        runs = [run_loss(fn, x, t, 1.0, threads=th, max_blocks=mb) for th, mb in ((16, 64), (16, 64), (5, 1), (64, 2))]
        v0, g0 = runs[0]
        for v, g in runs[1:]:
            assert bits(np.float64(v)) == bits(np.float64(v0)), (fn.name, v, v0)
            assert bits(g) == bits(g0), fn.name


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_weighted_losses_match_reference_whatever_the_launch(rng, dtype):
    """Row weights (some 0) on poisoned outputs and scratch: the reference's value and gradient, the
    same bits for every launch shape; the (70, 33) elementwise case spans two CHUNKs and cuts rows."""
    cases = [
        ("mse", MSE, *mse_inputs(rng, (70, 33), dtype)),
        ("bce_with_logits", BCE, *bce_inputs(rng, (70, 33), dtype)),
        ("cross_entropy", CE, (rng.standard_normal((5, 40)) * 5).astype(dtype), rng.integers(0, 40, 5)),
        ("cross_entropy", CE, (rng.standard_normal((5, 40)) * 5).astype(dtype),
         rng.random((5, 40)).astype(dtype)),
    ]
    for name, fn, x, t in cases:
        w = rng.uniform(0.0, 2.0, x.shape[0])
        w[::3] = 0.0
        scale = 1.0 / (w.sum() * (1 if name == "cross_entropy" else x.shape[1]))
        runs = [run_loss(fn, x, t, scale, weight=dev(w), threads=th, max_blocks=mb)
                for th, mb in ((16, 64), (5, 1), (32, 2))]
        check_loss(runs[0], fn.spec(x, t, scale, w), dtype, f"weighted {name} {x.shape}")
        for v, g in runs[1:]:
            assert bits(np.float64(v)) == bits(np.float64(runs[0][0])), name
            assert bits(g) == bits(runs[0][1]), name
        with pytest.raises(ValueError, match="weight"):
            nk.loss(fn, dev(x), dev(t), scale, poisoned(1, np.float64), poisoned(x.shape, x.dtype),
               weight=dev(w.astype(np.float32)))
        with pytest.raises(ValueError, match="weight"):
            nk.loss(fn, dev(x), dev(t), scale, poisoned(1, np.float64), poisoned(x.shape, x.dtype), weight=dev(w[1:]))


def test_cross_entropy_single_class_and_bad_labels():
    x = np.array([[3.0], [-2.0]])
    v, g = run_loss(CE, x, np.array([0, 0]), 0.5, threads=4)
    assert v == 0.0 and np.all(g == 0.0)
    x = np.zeros((3, 4))
    for bad in (4, -1):
        v, g = run_loss(CE, x, np.array([0, bad, 2]), 1.0, threads=4)
        assert np.isnan(v)  # an out-of-range label shows in the loss value


def test_loss_rejects_bad_arguments():
    x = np.zeros((2, 3))
    value = np.zeros(1)
    with pytest.raises(ValueError):
        nk.cross_entropy(x, np.array([0, 1], np.int32), 1.0, value, np.zeros_like(x))
    with pytest.raises(ValueError):
        nk.loss(MSE, x, np.zeros((3, 2)), 1.0, value, np.zeros_like(x))
    with pytest.raises(ValueError):
        nk.loss(MSE, x, x, 1.0, np.zeros(1, np.float32), np.zeros_like(x))
    with pytest.raises(ValueError):
        nk.loss(MSE, x, x, 1.0, value, np.zeros_like(x), threads=nk.LANES + 1)
    with pytest.raises(ValueError, match="element-wise"):
        nk.elementwise_loss(CE, x, x, 1.0, value, np.zeros_like(x))


# --- 4. PTX compile check ---------------------------------------------------------------

def test_every_kernel_compiles_to_ptx():
    """Every kernel of both Numba modules, with each signature its launchers use, for sm_80 and
    sm_90 (gpubp.tools.numba_ptx, in its own process: the simulator compiles nothing); the
    optimizer kernels without fused multiply-adds."""
    from gpubp.backends import numba_cuda_optim as nbo

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "gpubp.tools.numba_ptx", "--cc", "80,90", "--quiet"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    from gpubp.backends import cuda_update
    from gpubp.tools.numba_ptx import rows

    # 13 kernels x (float32, float64) + the final reduction + 5 mixed-precision kernels (float32 only)
    assert len(nk.ptx_targets(rows("loss"))) == 32
    listed = len(nk.ptx_targets(rows("loss"))) + len(nbo.ptx_targets()) + len(cuda_update.ptx_targets(rows("update")))
    expected = 2 * listed
    assert f"TOTAL compiled {expected} of {expected}" in proc.stdout, proc.stdout[-2000:]


def test_ptx_tool_compiles_one_kernel_per_module_and_refuses_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "gpubp.tools.numba_ptx", "--cc", "90", "--first"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "TOTAL compiled 3 of 3" in proc.stdout
    assert all(f"ok   {m}." in proc.stdout for m in ("numba_cuda", "numba_cuda_optim", "cuda_update"))
    bad = subprocess.run(cmd[:3] + ["--cc", "nine"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--cc" in bad.stderr
    from gpubp.tools import numba_ptx

    with pytest.raises(RuntimeError, match="simulator"):  # this process runs the simulator
        if not nk.SIMULATOR:
            pytest.skip("the kernels run on a GPU in this process")
        numba_ptx.targets()


# --- 5. one source, several targets: the scalar maths under numba.njit ---------------------


@pytest.fixture(scope="module")
def njit_math():
    """scalar_math compiled for the CPU, as a fast CPU backend would compile it."""
    import numba

    from gpubp.backends import scalar_math

    return scalar_math.build(numba.njit(inline="always"))


def _njit_activation_loops(sm):
    """Elementwise loops over the njit-compiled scalar activations (the CPU shape of the kernels)."""
    import numba

    @numba.njit
    def forward(act_id, z, p0, p1, out):
        for i in range(z.size):
            out[i] = sm.act_f(act_id, z[i], p0, p1)

    @numba.njit
    def backward(act_id, da, saved, p0, p1, out):
        for i in range(da.size):
            out[i] = sm.act_grad(act_id, da[i], saved[i], p0, p1)

    return forward, backward


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_scalar_activations_compile_with_njit_and_match_the_spec(njit_math, dtype):
    """Every activation (and its non-default parameters), f and f', on a grid of z with the hard cases."""
    import numba

    forward, backward = _njit_activation_loops(njit_math)
    grid = np.concatenate(
        [np.linspace(-12.0, 12.0, 481), [0.0, -0.0, 1e-3, -1e-3, 20.0, -30.0, 1e4, -1e4, 3e19, -3e19]]
    )
    z = grid.astype(dtype)
    da = np.linspace(-2.0, 2.0, z.size).astype(dtype)
    for name, params in ACTS:
        act = Activation(name, **params)
        act_id, p0, p1 = nk._act_args(act, np.dtype(dtype))
        a = np.full_like(z, np.nan)
        forward(act_id, z, p0, p1, a)
        want_a = act.forward(z)
        np.testing.assert_allclose(a, want_a, **TOL[dtype], err_msg=f"njit f for {act}")
        saved = {"z": z, "a": want_a}.get(act.saves, da)
        dz = np.full_like(z, np.nan)
        backward(act_id, da, saved, p0, p1, dz)
        want = act.backward(da, z, want_a)
        slack = TOL[dtype]["rtol"] * np.abs(want) + TOL[dtype]["atol"] + backward_slack(name, z, da, dtype)
        bad = ~(np.abs(dz.astype(np.float64) - want) <= slack)
        assert not bad.any(), f"njit f' for {act}: z={z[bad]} got={dz[bad]} want={want[bad]}"
    # The compiled functions keep the data dtype (float32 maths stays float32).
    njit_math.act_f(np.int64(Activation("gelu").id), dtype(0.5), dtype(0.0), dtype(0.0))
    sig = njit_math.act_f.nopython_signatures
    assert any(s.return_type == numba.from_dtype(np.dtype(dtype)) for s in sig), sig
    s = njit_math.sigmoid(dtype(-1e4))
    assert type(s) in (float, dtype) and s == 0.0


def test_scalar_loss_terms_compile_with_njit(njit_math):
    """Each element-wise loss row's scalar term, built on scalar_math's njit build, compiles with njit."""
    import numba

    mse_term, bce_term = (numba.njit(LOSSES[k].scalar(njit_math)) for k in ("mse", "bce_with_logits"))
    x, t = np.float32(1.5), np.float32(0.25)
    g, v = mse_term(x, t, np.float32(2.0))
    assert g == np.float32(2.5) and v == 1.5625
    g, v = bce_term(np.float64(0.0), np.float64(1.0), np.float64(1.0))
    assert g == -0.5 and v == pytest.approx(math.log(2.0), rel=1e-15)
    # The value terms are float64 even for float32 data: d = float32(1.1) squared in float64.
    d = np.float32(1.1)
    _, v = mse_term(d, np.float32(0.0), np.float32(2.0))
    assert v == float(d) ** 2 and v != float(d * d)
    _, v = bce_term(np.float32(0.3), np.float32(1.0), np.float32(1.0))
    assert isinstance(v, float) and type(v) is not np.float32


# --- 6. launches: counted, shaped by the caller, streams wrapped once ---------------------


def test_launch_counter_counts_each_kernel_launch(rng):
    """Each launcher's launches, as designed: activations 1, bias gradient 2, losses 2 (1 when empty)."""
    x = rng.standard_normal((17, 33)).astype(np.float32)
    t = rng.standard_normal((17, 33)).astype(np.float32)
    labels = rng.integers(0, 33, 17).astype(np.int64)

    def launches(fn, *args, **kw):
        before = nk.launch_count()
        fn(*args, **kw)
        return nk.launch_count() - before

    assert launches(nk.activation_forward, dev(x), "relu", threads=32) == 1
    assert launches(nk.bias_activation_forward, dev(x), dev(x[0]), "gelu", poisoned(x.shape, x.dtype), True,
                    threads=32) == 1  # fmt: skip
    assert launches(nk.activation_backward, dev(x), dev(x), None, "relu", threads=32) == 1
    assert launches(nk.bias_grad, dev(x), poisoned(33, x.dtype), tile=8, row_threads=4) == 2
    for rule, target in ((MSE, t), (BCE, t), (CE, labels)):
        assert launches(run_loss, rule, x, target, 1.0, threads=16) == 2, rule.name
    empty = np.zeros((0, 3), np.float32)
    assert launches(run_loss, MSE, empty, empty, 1.0, threads=16) == 1  # stage 2 alone writes 0
    assert launches(nk.activation_forward, dev(empty), "relu") == 0


def test_one_specialisation_per_kernel_and_dtype():
    """The launch path prepares a kernel once per key, then only launches it."""

    class FakeKernel:
        def __init__(self):
            self.prepared = 0
            self.runs = []

        def specialize(self, *args):
            self.prepared += 1
            return self

        def __getitem__(self, config):
            return lambda *args: self.runs.append((config, args))

    launch = nk.Launches()
    k = FakeKernel()
    for blocks in (1, 2, 3):
        launch(k, np.dtype(np.float32), blocks, 32, 0, "a", blocks)
    launch(k, np.dtype(np.float64), 1, 32, 0, "b")
    assert k.prepared == 2 and launch.count == 4
    assert k.runs[1] == ((2, 32, 0), ("a", 2))


def test_launch_stream_wraps_each_handle_once(monkeypatch):
    from types import SimpleNamespace

    made = []

    def external_stream(ptr):
        made.append(ptr)
        return SimpleNamespace(ptr=None, handle=ptr, auto_synchronize=None)

    monkeypatch.setattr(nk.launch.cuda, "external_stream", external_stream)
    monkeypatch.setattr(nk.launch, "_STREAMS", {})
    assert nk.launch_stream(0) == 0 and nk.launch_stream(None) == 0
    assert nk.launch_stream(SimpleNamespace(ptr=0)) == 0  # CuPy's null stream
    s = nk.launch_stream(0x1234)
    assert nk.launch_stream(SimpleNamespace(ptr=0x1234)) is s  # a CuPy stream with that handle
    assert nk.launch_stream(np.int64(0x1234)) is s
    assert made == [0x1234]
    numba_stream = SimpleNamespace(auto_synchronize=lambda: None)
    assert nk.launch_stream(numba_stream) is numba_stream
    for bad in ("stream", 1.5, True):
        with pytest.raises(TypeError, match="stream"):
            nk.launch_stream(bad)


# --- 7. finding libNVVM ------------------------------------------------------------------


@pytest.fixture
def fake_toolkits(tmp_path, monkeypatch):
    """System toolkits under tmp_path; cuda-pathfinder finds no libNVVM until one is loaded by path."""
    from gpubp.backends import numba_setup as ns

    for version, has_nvvm in (("11.8", False), ("12.4", True), ("12.9", True)):
        lib = tmp_path / f"cuda-{version}" / "nvvm" / ("lib64" if has_nvvm else "libdevice")
        lib.mkdir(parents=True)
        if has_nvvm:
            (lib / "libnvvm.so.4").write_bytes(b"")
            (lib / "libnvvm.so").symlink_to(lib / "libnvvm.so.4")
    loaded: list[str] = []

    def pathfinder_load(name):
        if name == "nvvm" and loaded:
            return ns.Found("nvvm", loaded[-1], "was-already-loaded-from-elsewhere")
        raise LookupError(f"DynamicLibNotFoundError: no {name} in the wheels or on the loader path")

    monkeypatch.setattr(ns, "_pathfinder_load", pathfinder_load)
    monkeypatch.setattr(ns, "_preload", loaded.append)
    monkeypatch.setattr(ns, "_nvvm", None)
    monkeypatch.setattr(ns, "SYSTEM_TOOLKITS", str(tmp_path / "cuda*"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return ns, tmp_path, loaded


def test_nvvm_found_in_the_newest_system_toolkit(fake_toolkits):
    ns, root, loaded = fake_toolkits
    found = ns.ensure_nvvm()
    want = root / "cuda-12.9" / "nvvm" / "lib64" / "libnvvm.so.4"
    assert loaded == [str(want)]  # loaded by path, so Numba's own look-up finds it loaded
    assert found.path == str(want) and "cuda-12.9" in found.via
    assert ns.ensure_nvvm() is found  # looked up once
    assert ns.describe()["NVVM"].startswith(str(want))


def test_nvvm_from_cuda_home_first(fake_toolkits, monkeypatch):
    ns, root, loaded = fake_toolkits
    monkeypatch.setenv("CUDA_HOME", str(root / "cuda-12.4"))
    assert ns.ensure_nvvm().path == str(root / "cuda-12.4" / "nvvm" / "lib64" / "libnvvm.so.4")
    assert ns.toolkit_roots()[0] == root / "cuda-12.4"


def test_missing_nvvm_names_it_and_the_fix(fake_toolkits, monkeypatch):
    ns, root, loaded = fake_toolkits
    monkeypatch.setattr(ns, "SYSTEM_TOOLKITS", str(root / "none*"))
    monkeypatch.setenv("CUDA_PATH", str(root / "cuda-11.8"))  # a toolkit without libNVVM
    with pytest.raises(ns.NvvmNotFoundError) as err:
        ns.ensure_nvvm()
    msg = str(err.value)
    for words in ("libNVVM", "NVVM", "pip install 'gpubp[cuda13]'", "nvidia-nvvm", "CUDA_HOME", "cuda-11.8"):
        assert words in msg, msg
    assert not loaded
    info = ns.describe()  # gpubp info reports it, and does not raise
    assert info["NVVM"].startswith("not found: ") and "gpubp[cuda13]" in info["NVVM"]
    assert info["NVRTC"].startswith("not found: ")


def test_a_libnvvm_loaded_by_path_is_the_one_numba_finds(tmp_path):
    """The fallback's premise, with the real loader: a libNVVM loaded by path is found 'already loaded'."""
    pytest.importorskip("cuda.pathfinder")
    code = textwrap.dedent(
        """
        import ctypes, sys
        from cuda import pathfinder
        try:
            real = pathfinder.load_nvidia_dynamic_lib("nvvm").abs_path
        except Exception as e:
            print("SKIP", e); sys.exit(0)
        print("REAL", real)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if "SKIP" in r.stdout or r.returncode:
        pytest.skip(f"no libNVVM here: {r.stdout}{r.stderr}")
    real = r.stdout.split("REAL", 1)[1].strip()
    lib = tmp_path / "cuda-99.0" / "nvvm" / "lib64"
    lib.mkdir(parents=True)
    (lib / "libnvvm.so.4").symlink_to(real)
    code = textwrap.dedent(
        f"""
        from gpubp.backends import numba_setup as ns
        ns._preload({str(lib / "libnvvm.so.4")!r})
        found = ns.locate("nvvm")
        print(found.via)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "already-loaded" in r.stdout, r.stdout


def test_info_says_where_nvrtc_and_nvvm_come_from(capsys):
    from gpubp import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for lib in ("NVRTC", "NVVM"):
        assert lib in lines, out
        assert "/" in lines[lib] or "not found" in lines[lib], lines[lib]
