"""GPU tests of the CUDA C dense kernels (kernels/*.cu) through their launchers (cuda_fused).

Skipped cleanly where the CUDA driver reports no GPU (tests/conftest.py: GPUS); what runs
without one is in test_cuda_fused_offline.py (NVRTC compile checks, host emulation), whose
reference and error-bound helpers these tests share.

Every kernel version and activation, forward and backward, against the NumPy float64 reference
(numpy_ref / gpubp.activations on float64 copies of the float32 inputs), on the shapes of the
issue (1x1x1, 17x33x65, 1x4096x4096, 65536x64x64) and on a fresh random shape every run.
Inputs are fresh random numbers every run; the seed is in every failure message. Every output is
poisoned before the launch (NaN, or 0xDEADBEEF for mask words), so an element a kernel forgets to
write fails. Tolerance (gpubp.accuracy.dot_error_bound, through gpubp.tools.oracles): a K-long
float32 fmaf chain errs by at most about K * eps32/2 * sum_k |x_k w_k|; the bound is
|err| <= 2 * K * eps32 * sum_k |x_k w_k| (4x margin), plus 2e-5 relative for the activation and
its derivative in float32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpubp.activations import Activation
from gpubp.backends import cuda_fused as rk
from tests.conftest import GPUS
from tests.test_cuda_fused_offline import (
    ACTIVATIONS,
    POISON_U32,
    check_backward,
    check_forward,
    make_inputs,
    new_seed,
)

pytestmark = pytest.mark.skipif(GPUS == 0, reason="no GPU: the CUDA C kernels run only on a GPU")

cp = pytest.importorskip("cupy") if GPUS else None
REPO = Path(__file__).resolve().parents[1]

SHAPES = [(1, 1, 1), (17, 33, 65), (20, 36, 44), (1, 4096, 4096), (65536, 64, 64)]


def _random_shape(seed: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(seed)
    return tuple(int(v) for v in rng.integers(1, 300, size=3))


def _host(t):
    return None if t is None else cp.asnumpy(t)


def gpu_forward(x, w, b, act, training, version, mask=True):
    """Forward through rk.dense_forward with NaN-poisoned outputs; host copies of a and saved."""
    n, n_out = x.shape[0], w.shape[1]
    mode = rk.forward_mode(act, training, mask)
    out = cp.full((n, n_out), cp.nan, dtype=cp.float32)
    out_z = cp.full((n, n_out), cp.nan, dtype=cp.float32) if mode == rk.SAVED_Z else None
    out_m = cp.full((n, rk.mask_words(n_out)), POISON_U32, dtype=cp.uint32) if mode == rk.SAVED_MASK else None
    a, saved = rk.dense_forward(
        cp.asarray(x),
        cp.asarray(w),
        cp.asarray(b),
        act,
        training,
        mask=mask,
        version=version,
        out=out,
        out_z=out_z,
        out_mask=out_m,
    )
    assert a is out
    return a, saved


def gpu_backward(da, saved, w, act, version, need_dx=True, split_k=None):
    x, kept = saved
    n, n_in = x.shape
    n_out = w.shape[1]
    dw = cp.full((n_in, n_out), cp.nan, dtype=cp.float32)
    db = cp.full((n_out,), cp.nan, dtype=cp.float32)
    out_dx = cp.full((n, n_in), cp.nan, dtype=cp.float32) if need_dx else None
    dx = rk.dense_backward(
        cp.asarray(da), saved, cp.asarray(w), act, dw, db, need_dx, version=version, split_k=split_k, out_dx=out_dx
    )
    assert dx is out_dx
    return dw, db, dx


def run_and_check(shape, act, version, seed, mask=True, scale=1.0, split_k=None, need_dx=True):
    x, w, b, da = make_inputs(*shape, seed, scale)
    a, saved = gpu_forward(x, w, b, act, True, version, mask)
    saved_h = (x, _host(saved[1]))
    check_forward(x, w, b, act, True, _host(a), saved_h, seed)
    dw, db, dx = gpu_backward(da, saved, w, act, version, need_dx, split_k)
    check_backward(x, w, da, act, saved_h, _host(dw), _host(db), _host(dx), seed)
    return a, saved, (dw, db, dx)


@pytest.mark.parametrize("version", rk.VERSIONS)
@pytest.mark.parametrize("shape", [*SHAPES, "random"], ids=lambda s: s if isinstance(s, str) else "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_kernels_match_reference(act, shape, version):
    seed = new_seed()
    if shape == "random":
        shape = _random_shape(seed)
    try:
        run_and_check(shape, act, version, seed)
    except AssertionError as e:
        raise AssertionError(f"shape {shape}: {e}") from None


@pytest.mark.parametrize("version", rk.VERSIONS)
@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_relu_family_saving_z_instead_of_the_mask(name, version):
    seed = new_seed()
    _, saved, _ = run_and_check((45, 70, 99), Activation(name), version, seed, mask=False)
    assert saved[1].dtype == cp.float32


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "softplus", "gelu", "gelu_tanh", "elu", "silu"])
def test_large_inputs_stay_finite(name):
    seed = new_seed()
    a, _, grads = run_and_check((64, 48, 40), Activation(name), 2, seed, scale=60.0)
    assert bool(cp.isfinite(a).all()) and all(bool(cp.isfinite(g).all()) for g in grads), f"seed {seed}"


@pytest.mark.parametrize("split_k", [None, 1, 2, 5, 64])
def test_split_k(split_k):
    seed = new_seed()
    run_and_check((4099, 64, 72), Activation("gelu"), 2, seed, split_k=split_k)


@pytest.mark.parametrize("shape", [(65536, 64, 64), (300, 40, 72), (17, 33, 65)])
@pytest.mark.parametrize("version", rk.VERSIONS)
def test_same_inputs_give_the_same_bits(shape, version):
    seed = new_seed()
    act = Activation("silu")
    x, w, b, da = make_inputs(*shape, seed)
    runs = []
    for _ in range(2):
        a, saved = gpu_forward(x, w, b, act, True, version)
        grads = gpu_backward(da, saved, w, act, version)
        runs.append([_host(t) for t in (a, saved[1], *grads)])
    for name, first, second in zip(("a", "z", "dW", "db", "dx"), *runs, strict=True):
        assert first.tobytes() == second.tobytes(), f"{name}: two runs differ (shape {shape}, seed {seed})"


def test_v1_and_v2_sum_in_the_same_order():
    """Identity: a, dx and unsplit dW are the same fmaf chains in v1 and v2, so the same values."""
    seed = new_seed()
    act = Activation("identity")
    x, w, b, da = make_inputs(300, 129, 200, seed)
    out = {}
    for version in rk.VERSIONS:
        a, saved = gpu_forward(x, w, b, act, True, version)
        dw, _, dx = gpu_backward(da, saved, w, act, version, split_k=1 if version == 2 else None)
        out[version] = [_host(t) for t in (a, dw, dx)]
    for name, v1, v2 in zip(("a", "dW", "dx"), out[1], out[2], strict=True):
        assert np.array_equal(v1, v2), f"{name}: v1 and v2 differ (seed {seed})"


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid", "identity"])
def test_inference_writes_a_alone(name):
    seed = new_seed()
    act = Activation(name)
    x, w, b, _ = make_inputs(33, 20, 40, seed)
    launched = []
    inner = rk._cupy_launcher(act)

    def launch(spec, grid, block, args):
        launched.append(spec)
        inner(spec, grid, block, args)

    xd, wd, bd = cp.asarray(x), cp.asarray(w), cp.asarray(b)
    a = cp.full((33, 40), cp.nan, dtype=cp.float32)
    rk.queue_forward(xd, wd, bd, a, None, None, act, rk.forward_mode(act, False), 2, launch)
    assert [s.mode for s in launched] == [rk.SAVED_NONE]
    a2, saved = rk.dense_forward(xd, wd, bd, act, False)
    assert saved == ()
    check_forward(x, w, b, act, False, _host(a), (), seed)
    check_forward(x, w, b, act, False, _host(a2), (), seed)


def test_non_contiguous_and_unaligned_inputs():
    seed = new_seed()
    act = Activation("relu")
    x, w, b, da = make_inputs(40, 16, 24, seed)
    xt = cp.asfortranarray(cp.asarray(x))  # strided: the launcher copies it to C order
    a, saved = rk.dense_forward(xt, cp.asarray(w), cp.asarray(b), act, True)
    check_forward(x, w, b, act, True, _host(a), (x, _host(saved[1])), seed)
    big = cp.empty(x.size + 1, dtype=cp.float32)
    xu = big[1:].reshape(x.shape)  # C order, 4 bytes past a 16-byte boundary: the scalar path
    xu[...] = cp.asarray(x)
    a, saved = rk.dense_forward(xu, cp.asarray(w), cp.asarray(b), act, True)
    check_forward(x, w, b, act, True, _host(a), (x, _host(saved[1])), seed)
    dw, db, dx = gpu_backward(da, saved, w, act, 2)
    check_backward(x, w, da, act, (x, _host(saved[1])), _host(dw), _host(db), _host(dx), seed)


def test_first_layer_skips_dx():
    seed = new_seed()
    _, _, (dw, db, dx) = run_and_check((50, 7, 9), Activation("tanh"), 2, seed, need_dx=False)
    assert dx is None


def test_empty_batch():
    act = Activation("gelu")
    x, w, b = cp.zeros((0, 5), cp.float32), cp.ones((5, 3), cp.float32), cp.ones(3, cp.float32)
    a, saved = rk.dense_forward(x, w, b, act, True)
    assert a.shape == (0, 3)
    dw, db = cp.full((5, 3), cp.nan, cp.float32), cp.full(3, cp.nan, cp.float32)
    dx = rk.dense_backward(cp.zeros((0, 3), cp.float32), saved, w, act, dw, db, True)
    assert dx.shape == (0, 5) and not bool(dw.any()) and not bool(db.any())


def test_a_second_process_pays_no_compile_time(tmp_path):
    """CuPy's on-disk cache holds the modules: a second process adds no cache entry."""
    code = (
        "import cupy as cp\n"
        "from gpubp.backends import cuda_fused as rk\n"
        "x = cp.ones((8, 8), cp.float32)\n"
        "a, _ = rk.dense_forward(x, x, x[0], 'relu', True)\n"
        "cp.cuda.Device().synchronize()\n"
    )
    env = {**os.environ, "CUPY_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=600)
    first = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert first, "the first process left no compiled module in CUPY_CACHE_DIR"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=600)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == first
