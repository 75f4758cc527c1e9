"""Tests for gpubp.backends.numba_cuda_optim and cuda_update: the CUDA optimizer kernels against the NumPy reference.

Without a GPU the kernels run under the Numba CUDA simulator (conftest sets
NUMBA_ENABLE_CUDASIM before numba is imported) on NumPy arrays; on a GPU the
same tests run on device arrays. Inputs are fresh random numbers every run; a
failure message carries the seed that reproduces it.

The simulator is slow, above all at cuda.syncthreads, so arrays are small and
reductions few.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from numba import cuda

from gpubp import optim
from gpubp.backends import cuda_update
from gpubp.backends import numba_cuda_optim as nbo
from gpubp.backends import numpy_optim as npo
from gpubp.parameter import Arena

SIM = nbo.SIMULATOR
DTYPES = (np.float64, np.float32)
RTOL = {np.float64: 1e-12, np.float32: 1e-6}
SIZES = (1, 7, 33, 130)
ROOT = Path(__file__).resolve().parents[1]


def dev(a: np.ndarray):
    """The array the kernels get: a copy of ``a`` (simulator) or a device copy (GPU)."""
    return a.copy() if SIM else cuda.to_device(a)


def host(a) -> np.ndarray:
    return nbo.to_numpy(a)


@pytest.fixture
def seed() -> int:
    return int(np.random.default_rng().integers(2**63))


@pytest.fixture(autouse=True)
def small_blocks():
    """32-thread blocks, at most 2 of them: 130 elements take several turns of the grid-stride loops."""
    with nbo.launch_config(threads=32, max_blocks=2):
        yield


def close(actual, expected, dtype, what: str, seed: int) -> None:
    """Within RTOL; under the simulator, where kernels do NumPy's scalar arithmetic, to the bit."""
    rtol = 0.0 if SIM else RTOL[dtype]
    np.testing.assert_allclose(host(actual), expected, rtol=rtol, atol=0, err_msg=f"{what} (seed={seed})")


def same_bits(a: float, b: float) -> bool:
    return np.float64(a).tobytes() == np.float64(b).tobytes()


# --- optimizers -----------------------------------------------------------------------------


RULES = {cls.rule.name: cls.rule for cls in optim.OPTIMIZERS.values()}
# (rule name, hyper-parameters as rule.pack reads them, each buffer's start value)
CASES = [
    ("sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0), np.nan),
    ("sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1), np.nan),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0), np.nan),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.25, nesterov=False, weight_decay=0.01), np.nan),
    ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.01), np.nan),
    ("adam", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False), 0.0),
    ("adam", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, decoupled=False, amsgrad=True), 0.0),
    ("adam", dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False), 0.0),
    ("adam", dict(lr=3e-2, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.1, decoupled=True, amsgrad=True), 0.0),
    ("adam", dict(lr=1e-2, betas=(0.5, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True, amsgrad=False), 0.0),
    ("rmsprop", dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False), 0.0),
    ("rmsprop", dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=True), 0.0),
    ("rmsprop", dict(lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=0.01, momentum=0.9, centered=False), 0.0),
    ("rmsprop", dict(lr=1e-2, alpha=0.3, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True), 0.0),
    ("adagrad", dict(lr=1e-2, lr_decay=0.0, eps=1e-10, weight_decay=0.0), 0.0),
    ("adagrad", dict(lr=5e-2, lr_decay=0.1, eps=1e-10, weight_decay=0.01), 0.1),
] + [(name, hp, 0.0) for name, rule in RULES.items() if name not in ("sgd", "adam", "rmsprop", "adagrad")
     for hp in rule.examples]  # rules added since: their own examples


def start(rule, cfg: dict, init: float, n: int, dtype, full) -> list:
    """The rule's buffers (None where unused); SGD's momentum buffer starts as NaN (step 1 must only write it)."""
    used = rule.uses(rule.pack(cfg, 1, np.dtype(dtype)).flags)
    return [full(n, init, dtype) if u else None for u in used]


def spec_update(rule, cfg, p, g, st, step) -> None:
    rule.spec(p, g, tuple(st), rule.pack(cfg, step, p.dtype))


def kernel_update(rule, cfg, p, g, st, step, **kw) -> None:
    cuda_update.update(rule, p, g, tuple(st), rule.pack(cfg, step, np.dtype(p.dtype)), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("kind", "cfg", "init"), CASES, ids=[f"{k}{i}" for i, (k, _, _) in enumerate(CASES)])
def test_update_matches_numpy(kind, cfg, init, dtype, seed):
    rule = RULES[kind]
    rng = np.random.default_rng(seed)
    for n in SIZES:
        p_ref = rng.standard_normal(n).astype(dtype)
        p = dev(p_ref)
        st_ref = start(rule, cfg, init, n, dtype, npo.full)
        st = start(rule, cfg, init, n, dtype, nbo.full)
        for step, size in enumerate((3.0, 0.5, 1.0), start=1):  # changing sizes, so AMSGrad's maximum matters
            g_ref = (rng.standard_normal(n) * size).astype(dtype)
            g = dev(g_ref)
            spec_update(rule, cfg, p_ref, g_ref, st_ref, step)
            kernel_update(rule, cfg, p, g, st, step)
            where = f"{kind} {cfg} {np.dtype(dtype).name} n={n} step {step}"
            close(p, p_ref, dtype, f"p after {where}", seed)
            for name, got, want in zip(rule.state, st, st_ref, strict=True):
                if want is not None:
                    close(got, want, dtype, f"{name} after {where}", seed)
            np.testing.assert_array_equal(host(g), g_ref, err_msg=f"g was written by {where} (seed={seed})")


def test_missing_buffers_are_refused():
    p, g = dev(np.zeros(3)), dev(np.zeros(3))
    sgd = dict(lr=0.1, dampening=0.0, nesterov=False, weight_decay=0.0)
    with pytest.raises(ValueError, match="momentum_buffer"):
        kernel_update(RULES["sgd"], dict(sgd, momentum=0.9), p, g, [None], 1)
    kernel_update(RULES["sgd"], dict(sgd, momentum=0.0), p, g, [None], 1)
    adam = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=True)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        kernel_update(RULES["adam"], adam, p, g, [dev(np.zeros(3)), dev(np.zeros(3)), None], 1)
    rms = dict(lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="grad_avg"):
        kernel_update(RULES["rmsprop"], dict(rms, momentum=0.0, centered=True), p, g, [dev(np.zeros(3)), None, None], 1)
    with pytest.raises(ValueError, match="momentum_buffer"):
        kernel_update(RULES["rmsprop"], dict(rms, momentum=0.5, centered=False), p, g, [dev(np.zeros(3)), None, None],
                      1)


def test_bad_arrays_are_refused():
    rule, kw = RULES["sgd"], dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)

    def sgd(p, g):
        cuda_update.update(rule, p, g, (None,), rule.pack(kw, 1, np.float64))

    with pytest.raises(TypeError, match="dtype"):
        sgd(dev(np.zeros(3)), dev(np.zeros(3, np.float32)))
    with pytest.raises(TypeError, match="float32 or float64"):
        sgd(dev(np.zeros(3, np.int64)), dev(np.zeros(3, np.int64)))
    with pytest.raises(ValueError, match="elements"):
        sgd(dev(np.zeros(3)), dev(np.zeros(4)))
    with pytest.raises(ValueError, match="1-D"):
        sgd(dev(np.zeros((2, 2))), dev(np.zeros((2, 2))))
    with pytest.raises(TypeError, match="array"):
        nbo.scale_([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="1-element float64"):
        nbo.sum_of_squares_into(dev(np.zeros(3)), dev(np.zeros(2)))
    with pytest.raises(ValueError, match="1-element int32"):
        nbo.all_finite_into(dev(np.zeros(3)), dev(np.zeros(1)))
    with pytest.raises(ValueError, match="threads"):
        with nbo.launch_config(threads=0):
            pass


# --- helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_full_assign_to_numpy_scale(dtype, seed):
    rng = np.random.default_rng(seed)
    for n in (0, *SIZES):
        a = nbo.full(n, 0.1, dtype)
        np.testing.assert_array_equal(host(a), npo.full(n, 0.1, dtype))
        src = rng.standard_normal(n).astype(dtype)
        nbo.assign_(a, src.reshape(n, 1))
        got = host(a)
        np.testing.assert_array_equal(got, src, err_msg=f"seed={seed}")
        got[...] = 7  # a copy: writing it leaves the array alone
        np.testing.assert_array_equal(host(a), src)
        ref = src.copy()
        npo.scale_(ref, 0.3)
        nbo.scale_(a, 0.3)
        np.testing.assert_array_equal(host(a), ref, err_msg=f"scale_ n={n} (seed={seed})")
    with pytest.raises(TypeError):
        nbo.assign_(nbo.full(2, 0.0, dtype), np.zeros(2, np.float16))


# --- reductions -----------------------------------------------------------------------------


def tree_sum_of_squares(x: np.ndarray) -> float:
    """The documented order of sum_of_squares_into, in NumPy: fixed trees over chunks, then over the partials."""
    chunk = nbo.REDUCE_CHUNK

    def tree(v: np.ndarray) -> np.ndarray:
        out = []
        for lo in range(0, v.size, chunk):
            a = np.zeros(chunk)
            a[: min(chunk, v.size - lo)] = v[lo : lo + chunk]
            while a.size > 1:
                a = a[: a.size // 2] + a[a.size // 2 :]
            out.append(a[0])
        return np.array(out)

    acc = 0.0
    for t in tree(tree(np.square(x, dtype=np.float64))):  # partials per chunk, then per tile, tiles in order
        acc = acc + t
    return float(acc)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sum_of_squares_and_max_abs_match_numpy(dtype, seed):
    rng = np.random.default_rng(seed)
    for n in (0, 1, 130, 2500):
        x = (rng.standard_normal(n) * 3).astype(dtype)
        got = nbo.sum_of_squares(dev(x))
        assert isinstance(got, float)
        np.testing.assert_allclose(got, npo.sum_of_squares(x), rtol=1e-13, err_msg=f"n={n} (seed={seed})")
        assert same_bits(got, tree_sum_of_squares(x)), f"n={n}: order differs from the documented tree (seed={seed})"
        if n <= 130:
            m = nbo.max_abs(dev(x))
            assert isinstance(m, float) and m == npo.max_abs(x), f"max_abs n={n} (seed={seed})"
    x = rng.standard_normal(33).astype(dtype)
    x[20] = np.nan
    assert np.isnan(nbo.max_abs(dev(x)))


def test_sum_of_squares_same_bits_on_any_grid(seed):
    """Three chunks; the bits depend on the chunking only, not on threads, blocks or the run."""
    x = np.random.default_rng(seed).standard_normal(2 * nbo.REDUCE_CHUNK + 452)
    d = dev(x)
    results = []
    for threads, blocks in ((32, 1), (32, 1), (64, 3), (96, 2)):
        out = dev(np.full(1, np.nan))  # poisoned: must be overwritten
        with nbo.launch_config(threads=threads, max_blocks=blocks):
            nbo.sum_of_squares_into(d, out)
        results.append(float(host(out)[0]))
    assert all(same_bits(r, results[0]) for r in results), f"{[r.hex() for r in results]} (seed={seed})"
    assert same_bits(results[0], tree_sum_of_squares(x)), f"seed={seed}"


def test_sum_of_squares_into_accumulates_in_call_order(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(130), rng.standard_normal(7)
    out = dev(np.full(1, np.nan))
    nbo.sum_of_squares_into(dev(a), out)
    nbo.sum_of_squares_into(dev(b), out, accumulate=True)
    want = sum([nbo.sum_of_squares(dev(a)), nbo.sum_of_squares(dev(b))])
    assert same_bits(float(host(out)[0]), want), f"seed={seed}"


# --- clipping -------------------------------------------------------------------------------


def arena_with_grads(dtype, grads: np.ndarray):
    a = Arena(grads.size, dtype)
    params = [a.carve("0.weight", (8, 15)), a.carve("0.bias", (grads.size - 120,))]
    a.grad[:] = grads
    return a, params


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_clip_scale_follows_clip_grad_norm(dtype, seed):
    grads = np.random.default_rng(seed).standard_normal(130).astype(dtype)
    norm = float(np.sqrt(npo.sum_of_squares(grads)))
    for max_norm in (0.5 * norm, 2.0 * norm):
        arena, params = arena_with_grads(dtype, grads)
        optim.clip_grad_norm(params, max_norm)
        g = dev(grads)
        total = dev(np.full(1, np.nan))
        nbo.sum_of_squares_into(g, total)
        nbo.clip_scale_(g, total, max_norm)
        # the sums of squares are added in different orders, so coef may differ in its last bit
        np.testing.assert_allclose(
            host(g), arena.grad, rtol=RTOL[dtype], atol=0, err_msg=f"clip to {max_norm / norm} x norm (seed={seed})"
        )
        if max_norm > norm:
            np.testing.assert_array_equal(host(g), grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_clip_scale_is_exact_given_the_total(dtype, seed):
    """With the same total as clip_grad_norm, the same float64 coef and so the same bits, in every case."""
    grads = np.random.default_rng(seed).standard_normal(33).astype(dtype)
    total_sq = npo.sum_of_squares(grads)
    for tot, max_norm in ((total_sq, 0.1), (total_sq, 1e3), (np.inf, 1.0), (np.nan, 1.0)):
        want = grads.copy()
        coef = max_norm / (math.sqrt(tot) + 1e-6)  # Python floats, as clip_grad_norm
        if coef < 1.0:
            npo.scale_(want, coef)
        g = dev(grads)
        nbo.clip_scale_(g, dev(np.array([tot])), max_norm)
        np.testing.assert_array_equal(host(g), want, err_msg=f"total={tot} max_norm={max_norm} (seed={seed})")
    with pytest.raises(ValueError, match="max_norm"):
        nbo.clip_scale_(dev(grads), dev(np.array([1.0])), 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_all_finite(dtype, seed):
    rng = np.random.default_rng(seed)
    assert nbo.all_finite(dev(np.zeros(0, dtype)))
    for n in (33, 130):
        x = rng.standard_normal(n).astype(dtype)
        assert nbo.all_finite(dev(x)), f"seed={seed}"
        for bad in (np.nan, np.inf, -np.inf):
            for i in (0, n // 2, n - 1):
                y = x.copy()
                y[i] = bad
                assert not nbo.all_finite(dev(y)), f"{bad} at {i} of {n} not seen"
    flag = dev(np.full(1, -7, np.int32))  # poisoned: must be overwritten
    nbo.all_finite_into(dev(x), flag)
    assert host(flag)[0] == 1
    y = x.copy()
    y[-1] = np.nan
    nbo.all_finite_into(dev(y), flag)
    assert host(flag)[0] == 0


# --- launches: counted, shaped by the caller, arrays passed as they are ---------------------


def launches(fn, *args, **kw) -> int:
    before = nbo.launch_count()
    fn(*args, **kw)
    return nbo.launch_count() - before


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_launch_counter(dtype, seed):
    """An update over a whole arena is one launch; the reductions two (pass 1 and pass 2)."""
    rng = np.random.default_rng(seed)
    arena = Arena(130, dtype)
    arena.carve("0.weight", (8, 15))
    arena.carve("0.bias", (10,))
    arena.grad[:] = rng.standard_normal(130)
    p, g = dev(arena.data), dev(arena.grad)
    for name, rule in RULES.items():  # every rule, every example: one launch
        for cfg in rule.examples:
            st = start(rule, cfg, 0.0, 130, dtype, nbo.full)
            assert launches(kernel_update, rule, cfg, p, g, st, 2) == 1, (name, cfg)
    assert launches(kernel_update, RULES["sgd"], RULES["sgd"].examples[0], dev(np.zeros(0, dtype)),
                    dev(np.zeros(0, dtype)), [dev(np.zeros(0, dtype))], 2) == 0
    total = dev(np.full(1, np.nan))
    assert launches(nbo.sum_of_squares_into, g, total) == 2
    assert launches(nbo.clip_scale_, g, total, 1.0) == 1
    assert launches(nbo.all_finite_into, g, dev(np.zeros(1, np.int32))) == 2
    assert launches(nbo.scale_, g, 0.5) == 1
    assert launches(nbo.full, 7, 1.0, dtype) == 1
    assert launches(nbo.full, 0, 1.0, dtype) == 0
    assert launches(nbo.sum_of_squares_into, dev(np.zeros(0, dtype)), total) == 1  # pass 2 alone writes 0


def test_launch_shape_from_the_caller(seed):
    """threads= / max_blocks= on the call itself; the bits are those of any other launch shape."""
    x = np.random.default_rng(seed).standard_normal(2 * nbo.REDUCE_CHUNK + 452)
    results = []
    for threads, max_blocks in ((32, 1), (64, 3), (None, None)):
        out = dev(np.full(1, np.nan))
        nbo.sum_of_squares_into(dev(x), out, threads=threads, max_blocks=max_blocks)
        results.append(float(host(out)[0]))
    assert all(same_bits(r, results[0]) for r in results), f"seed={seed}"
    g = dev(x[:130].copy())
    nbo.scale_(g, 0.25, threads=7, max_blocks=1)
    np.testing.assert_array_equal(host(g), x[:130] * 0.25)
    with pytest.raises(ValueError, match="threads"):
        nbo.scale_(g, 0.5, threads=0)
    with pytest.raises(ValueError, match="max_blocks"):
        nbo.scale_(g, 0.5, max_blocks=True)


def test_device_arrays_are_passed_as_they_are():
    """An object with __cuda_array_interface__ (CuPy, ...) reaches the kernel itself, not a per-launch wrapper."""

    class CudaArrayLike:
        __cuda_array_interface__ = {"shape": (3,), "typestr": "<f4", "data": (0, False), "version": 3}

    a = CudaArrayLike()
    assert nbo._arr(a, "a") is a
    with pytest.raises(TypeError, match="CUDA array"):
        nbo._arr([1.0], "a")


# --- one source, several targets: the optimizer maths under numba.njit -----------------------


_NJIT: dict = {}  # each rule's scalar body compiled by numba.njit, once per session


def njit_body(rule):
    """``rule.scalar`` built on scalar_math compiled by numba.njit (a CPU target of the same source)."""
    import numba

    from gpubp.backends import scalar_math

    ops = _NJIT.get("ops") or _NJIT.setdefault("ops", scalar_math.build(numba.njit))
    return _NJIT.get(rule.name) or _NJIT.setdefault(rule.name, numba.njit(rule.scalar(ops)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("kind", "cfg", "init"), CASES, ids=[f"{k}{i}" for i, (k, _, _) in enumerate(CASES)])
def test_scalar_updates_compile_with_njit_and_match_numpy_to_the_bit(kind, cfg, init, dtype, seed):
    """Each rule's scalar body, compiled for the CPU, element by element against its NumPy spec: the same bits."""
    rule = RULES[kind]
    step_fn = njit_body(rule)
    rng = np.random.default_rng(seed)
    n = 33
    p_ref = rng.standard_normal(n).astype(dtype)
    p = p_ref.copy()
    st_ref = start(rule, cfg, init, n, dtype, npo.full)
    st = [np.full(n, init, dtype) for _ in range(3)]
    for step, size in enumerate((3.0, 0.5, 1.0), start=1):
        g = (rng.standard_normal(n) * size).astype(dtype)
        spec_update(rule, cfg, p_ref, g, st_ref, step)
        hp = rule.pack(cfg, step, np.dtype(dtype))
        for i in range(n):
            p[i], st[0][i], st[1][i], st[2][i] = step_fn(p[i], g[i], st[0][i], st[1][i], st[2][i], hp.scalars,
                                                         hp.flags)
        where = f"njit {kind} {cfg} {np.dtype(dtype).name} step {step} (seed={seed})"
        np.testing.assert_array_equal(p, p_ref, err_msg=where)
        for name, got, want in zip(rule.state, st, st_ref, strict=False):
            if want is not None:
                np.testing.assert_array_equal(got, want, err_msg=f"{name}: {where}")


# --- compiling to PTX -----------------------------------------------------------------------


def test_ptx_targets_listing():
    from gpubp.backends import cuda_update
    from gpubp.tools.numba_ptx import rows

    targets = nbo.ptx_targets() + cuda_update.ptx_targets(rows("update"))
    names = [t[0] for t in targets]
    updates = sum(len(rule.examples) for rule in RULES.values())
    assert len(names) == len(set(names)) == 14 + 4 * updates  # updates: hp as a tuple, and on the device
    for name in ("reduce_chunks", "clip_scale", "finite_scan"):
        assert f"{name}[float32]" in names and f"{name}[float64]" in names
    for name, rule in RULES.items():  # the generic update kernel, compiled for each rule's examples
        for k in range(len(rule.examples)):
            assert f"update_{name}{k}[float32]" in names and f"update_{name}{k}[float64]" in names
    assert {"reduce_partials", "set_flag", "merge_flag", "merge_flag_dev"} <= set(names)
    assert all(callable(fn) and isinstance(sig, tuple) for _, fn, sig in targets)


# --- GPU only -------------------------------------------------------------------------------


@pytest.mark.skipif(SIM, reason="needs a GPU")
def test_cupy_arrays_and_streams(seed):
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(seed)
    p_ref, g_ref = rng.standard_normal(130), rng.standard_normal(130)
    buf_ref = np.zeros(130)
    p, g, buf = cp.asarray(p_ref), cp.asarray(g_ref), cp.zeros(130)
    total = cp.zeros(1)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01)
    stream = cp.cuda.Stream(non_blocking=True)
    # The arrays were written on the null stream, which a non-blocking stream does not wait for.
    stream.wait_event(cp.cuda.Stream.null.record())
    for step in (1, 2):
        spec_update(RULES["sgd"], kw, p_ref, g_ref, [buf_ref], step)
        kernel_update(RULES["sgd"], kw, p, g, [buf], step, stream=stream)
    nbo.sum_of_squares_into(p, total, stream=stream)
    stream.synchronize()
    close(p, p_ref, np.float64, "cupy sgd", seed)
    close(buf, buf_ref, np.float64, "cupy sgd buffer", seed)
    np.testing.assert_allclose(float(total[0]), npo.sum_of_squares(p_ref), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_flag_nonfinite(dtype):
    """fit's guard: the first tag sticks; a NaN/Inf loss value or gradient element sets it, three launches."""
    g = np.ones(300, dtype)
    flag = dev(np.zeros(1, np.int64))
    before = nbo.launch_count()
    nbo.flag_nonfinite_(dev(np.array([1.5])), dev(g), flag, 7)
    assert nbo.launch_count() - before == 3 and host(flag)[0] == 0
    nbo.flag_nonfinite_(dev(np.array([np.inf])), dev(g), flag, 7)
    assert host(flag)[0] == 7
    nbo.flag_nonfinite_(dev(np.array([np.nan])), dev(g), flag, 9)
    assert host(flag)[0] == 7  # the first tag stays
    flag = dev(np.zeros(1, np.int64))
    g[257] = np.nan
    nbo.flag_nonfinite_(dev(np.array([0.5])), dev(g), flag, 3)
    assert host(flag)[0] == 3
