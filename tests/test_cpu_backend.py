"""The fast CPU backend: its float32 erf/exp against libm, determinism across thread counts,
the threading policy, the kernel cache across processes, and how it is selected.

Every interface operation is checked against the float64 spec in tests/test_conformance.py
("cpu"); here what is particular to this backend. Shapes stay small: chunk sizes are lowered
so that small arrays still split into several chunks and run on several threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import gpubp as gp
from gpubp import accuracy, threads
from gpubp._special import erf as libm_erf
from gpubp.activations import Activation
from gpubp.backends import get_backend
from gpubp.backends import numba_cpu as K
from gpubp.backends.cpu import CpuBackend
from gpubp.backends.numpy_ref import NumpyBackend
from gpubp.device import parse_device

ROOT = Path(__file__).resolve().parent.parent


@numba.njit
def _erf_all(x, out):
    for i in range(x.shape[0]):
        out[i] = K.fm.erf(x[i])


@numba.njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = K.fm.exp_neg(x[i])


# --- the float32 erf and exp ------------------------------------------------------------------


def _erf_grid() -> np.ndarray:
    x = np.concatenate([np.linspace(-6, 6, 4_000_001), np.geomspace(1e-38, 1.0, 200_000)]).astype(np.float32)
    return np.concatenate([x, -x])


def test_erf32_within_its_bound_over_a_dense_grid():
    x = _erf_grid()
    got = np.empty_like(x)
    _erf_all(x, got)
    want = libm_erf(x.astype(np.float64))  # libm erf in float64 at the float32 inputs
    err = np.abs(got.astype(np.float64) - want)
    worst = int(np.argmax(err))
    assert err.max() <= K.ERF32_MAX_ABS_ERR, f"erf({x[worst]!r}) = {got[worst]!r}, want {want[worst]!r}"
    small = (np.abs(x) < np.float32(0.875)) & (x != 0)
    rel = err[small] / np.abs(want[small])
    assert rel.max() <= K.ERF32_SMALL_MAX_REL_ERR, f"relative {rel.max():.3g} at {x[small][np.argmax(rel)]!r}"
    # The bound sits inside the activation contract's absolute allowance.
    assert K.ERF32_MAX_ABS_ERR <= accuracy.ACT_AEPS * accuracy.EPS32
    # Odd, saturating, NaN through.
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.92, 4.0, 1e30], dtype=np.float32)
    out = np.empty_like(edge)
    _erf_all(edge, out)
    assert out[:4].tolist() == [0.0, 0.0, 1.0, -1.0] and np.isnan(out[4]) and out[5:].tolist() == [1.0] * 3
    assert np.array_equal(got[: len(x) // 2], -got[len(x) // 2 :])


def test_exp32_within_its_bound():
    x = np.concatenate([np.linspace(-104, 0, 2_000_001), -np.geomspace(1e-30, 1, 10_000)]).astype(np.float32)
    got = np.empty_like(x)
    _exp_all(x, got)
    want = np.exp(x.astype(np.float64))
    normal = want >= np.finfo(np.float32).tiny
    rel = np.abs(got.astype(np.float64) - want)[normal] / want[normal]
    assert rel.max() <= K.EXP32_MAX_REL_ERR, f"relative {rel.max():.3g} at {x[normal][np.argmax(rel)]!r}"
    assert np.all(np.abs(got[~normal]) <= np.finfo(np.float32).tiny)
    edge = np.array([0.0, -np.inf, -200.0], dtype=np.float32)
    out = np.empty_like(edge)
    _exp_all(edge, out)
    assert out.tolist() == [1.0, 0.0, 0.0]


def test_one_source_two_targets_same_bits():
    """The plain-Python build and the compiled one are the same maths, rounding for rounding."""
    x = np.linspace(-5, 5, 997).astype(np.float32)
    compiled = np.empty_like(x)
    _erf_all(x, compiled)
    plain = np.array([K.FAST.erf(v) for v in x], dtype=np.float32)
    assert plain.tobytes() == compiled.tobytes()
    gelu = np.array([K.FAST.gelu_f(v) for v in x], dtype=np.float64)
    want = 0.5 * x.astype(np.float64) * (1 + libm_erf(x.astype(np.float64) / np.sqrt(2)))
    ok, why = accuracy.within(gelu, want, accuracy.Tolerance(0.0, 0.0), accuracy.activation_bound(want, x))
    assert ok, why


# --- determinism: same bits with 1 or 2 threads, serial or parallel ------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few dozen elements, so that small arrays run as many chunks on every thread."""
    monkeypatch.setattr(K, "ROW_CHUNK", 64)
    monkeypatch.setattr(K, "FLAT_CHUNK", 96)
    p = threads.policy()
    saved = p.parallel_min
    yield
    p.parallel_min = saved


def _everything(seed: int, dtype: str) -> list[np.ndarray]:
    """One of each reduction-bearing operation (and an update) on the CPU backend; results as arrays."""
    b = get_backend(parse_device("cpu"))
    rng = np.random.default_rng(seed)
    out = []
    n, k, m = 301, 9, 13
    x, w = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
    bias, da = rng.standard_normal(m).astype(dtype), rng.standard_normal((n, m)).astype(dtype)
    for act in ("gelu", "identity"):  # dz and db fused; db alone
        a, saved = b.dense_forward(x.copy(), w, bias, Activation(act), True)
        dw, db = np.empty_like(w), np.empty_like(bias)
        b.dense_backward(da, saved, w, Activation(act), dw, db, False)
        out += [a, dw, db]
    logits = (3 * rng.standard_normal((n, m))).astype(dtype)
    out += [np.array(v) for v in b.loss(gp.losses.CrossEntropy.rule, logits, rng.integers(0, m, n), 1 / n)]
    out += [np.array(v) for v in b.loss(gp.losses.MSE.rule, logits, da, 1 / da.size)]
    g = rng.standard_normal(1000).astype(dtype)
    out.append(np.array(b.sum_of_squares(g)))
    p, m1, v1 = rng.standard_normal(1000).astype(dtype), np.zeros(1000, dtype), np.zeros(1000, dtype)
    rule = gp.optim.Adam.rule
    hp = rule.pack(dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False), 1, p.dtype)
    b.update(rule, p, g, (m1, v1, None), hp)
    out.append(p)
    return out


def test_same_bits_whatever_the_thread_count(small_chunks):
    """Serial, parallel on 1 thread and on 2: the same bits (the parallel kernels compile here: float32 only)."""
    dtype = "float32"
    before = numba.get_num_threads()
    runs = {}
    try:
        for label, nthreads, parallel_min in (("serial", 1, 1 << 40), ("1 thread", 1, 0), ("2 threads", 2, 0)):
            numba.set_num_threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
            threads.policy().parallel_min = parallel_min
            runs[label] = _everything(7, dtype)
    finally:
        numba.set_num_threads(before)
    ref = runs["serial"]
    for label, got in runs.items():
        for i, (u, v) in enumerate(zip(got, ref, strict=True)):
            assert u.tobytes() == v.tobytes(), f"{dtype}: result {i} differs between serial and {label}"


# --- selection ------------------------------------------------------------------------------------------


def test_the_fast_backend_is_the_cpu_default_and_the_reference_stays_selectable():
    assert isinstance(gp.Sequential(gp.Dense(2, 2)).arena.backend, CpuBackend)
    ref = gp.Sequential(gp.Dense(2, 2), dense_impl="reference").arena.backend
    assert isinstance(ref, NumpyBackend) and not isinstance(ref, CpuBackend)
    with pytest.raises(ValueError, match="dense_impl: 'reference' .* runs on the CPU only"):
        get_backend(parse_device("cudasim"), "reference")
    with pytest.raises(ValueError, match="dense_impl: expected one of auto, fused, unfused, reference"):
        gp.Sequential(gp.Dense(2, 2), dense_impl="numpy")


def test_relu_saves_its_output_as_the_mask():
    """relu keeps a = max(z, 0) for backward (a > 0 exactly where z > 0): NaN and -0 as the spec."""
    b = get_backend(parse_device("cpu"))
    ref = get_backend(parse_device("cpu"), "reference")
    x = np.array([[1.0], [-1.0], [0.0], [np.nan]], dtype=np.float32)
    w, bias = np.ones((1, 1), np.float32), np.zeros(1, np.float32)
    da = np.full((4, 1), 2.0, np.float32)
    results = []
    for be in (b, ref):
        a, saved = be.dense_forward(x, w, bias, Activation("relu"), True)
        dw, db = np.empty_like(w), np.empty_like(bias)
        dx = be.dense_backward(da, saved, w, Activation("relu"), dw, db, True)
        results.append([a.tobytes(), dx.tobytes(), db.tobytes()])
    assert results[0] == results[1]


# --- the threading policy -----------------------------------------------------------------------------------


def test_policy_settings_are_validated():
    with pytest.raises(ValueError, match="threads: expected an integer >= 1"):
        threads.set_policy(threads=0)
    with pytest.raises(ValueError, match="parallel_min: expected an integer >= 0"):
        threads.set_policy(parallel_min=-1)
    info = threads.describe()
    assert set(info) == {"policy", "blas", "numba"}


_CHILD = """
import json, numpy as np
from gpubp import threads
from gpubp.activations import Activation
from gpubp.backends import get_backend, numba_cpu as K
from gpubp.device import parse_device
b = get_backend(parse_device("cpu"))
x = np.ones((3, 4), np.float32); w = np.ones((4, 5), np.float32); bias = np.zeros(5, np.float32)
b.dense_forward(x, w, bias, Activation("gelu"), True)
k = K.bias_act(Activation("gelu").id, True, True, False)
print(json.dumps({"info": threads.describe(), "hits": sum(k.stats.cache_hits.values()),
                  "misses": sum(k.stats.cache_misses.values())}))
"""


def test_a_second_process_loads_the_kernels_and_applies_the_policy():
    # Compiled (or loaded) here first; a new process must then find it in the cache.
    b = get_backend(parse_device("cpu"))
    b.dense_forward(np.ones((3, 4), np.float32), np.ones((4, 5), np.float32), np.zeros(5, np.float32),
                    Activation("gelu"), True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUBP_CPU", "NUMBA_THREADING"))}
    env["GPUBP_CPU_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["misses"] == 0 and got["hits"] == 1, got
    assert got["info"]["policy"].startswith("1 BLAS + 1 Numba threads"), got
    assert got["info"]["numba"].startswith("1 threads, layer"), got
    assert "1 threads" in got["info"]["blas"], got


def test_the_policy_can_be_turned_off():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBP_CPU")}
    env["GPUBP_CPU_THREADS_POLICY"] = "off"
    code = "from gpubp import threads; threads.apply(); print(threads.describe()['policy'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("off"), out.stdout
