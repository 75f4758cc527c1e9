"""The CUDA backend's native mixed precision (gpubp.backends.cuda_precision, numba_cuda.precision).

Without a GPU: the conversion kernels and the 16-bit epilogue under the Numba simulator, bit for bit
against gpubp.precision.round_to and ml_dtypes / NumPy casts (ties, subnormals, overflow, NaN); the
gemmEx marshalling against a fake cuBLAS that records each call and computes it from the pointers
(column-major, leading dimensions, transposes); the whole native dense path on the simulated
backend with that fake cuBLAS against the spec (numpy_ref). With a GPU: the CUDA backend's native
paths against the spec under each precision.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from gpubp import precision as P
from tests.conftest import GPUS

numba_sim = pytest.importorskip("numba.core.config")
if not getattr(numba_sim, "ENABLE_CUDASIM", False) and GPUS == 0:  # pragma: no cover
    pytest.skip("needs the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1) or a GPU", allow_module_level=True)

from gpubp.activations import get as get_activation  # noqa: E402
from gpubp.backends import cuda_precision as CP  # noqa: E402
from gpubp.backends import numpy_ref  # noqa: E402
from gpubp.backends.numba_cuda import precision as K  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")
SIM = GPUS == 0
T = {"threads": 32} if SIM else {}
MIXED = ["tf32", "bf16-mixed", "fp16-mixed"]


def _values() -> np.ndarray:
    """Random magnitudes over the whole range, the ties of each kind, fp16's subnormals and overflow edges,
    zeros, infinities, NaNs with payloads."""
    rng = np.random.default_rng(3)
    v = rng.standard_normal(300) * 10.0 ** rng.integers(-9, 7, 300)
    ties = [1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 2.0**-24 * 1.5, 2.0**-24 * 2.5,
            2.0**-24 * 0.5, 2.0**-25 * 1.0000001, 65504, 65519.99, 65520, 2.0**-14, 2.0**-14 * (1 - 2.0**-11),
            6.1e-5, 3.0e-8, 1e-45, 3e-39, 3.4e38, 0.0, -0.0, np.inf, -np.inf]
    v = np.concatenate([v, ties, [-t for t in ties]]).astype(np.float32)
    u = np.concatenate([v.view(np.uint32), np.array([0x7FC12345, 0xFFA00001, 0x7F800001], np.uint32)])
    return u.view(np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("kind", ["tf32", "bf16", "fp16"])
def test_conversion_kernels_are_round_to_bit_for_bit(kind):
    v = _values()
    want = P.round_to(np, v, kind)
    got = K.round_into(v, np.empty_like(v), kind, **T)
    assert (_bits(got) == _bits(want)).all(), v[_bits(got) != _bits(want)]
    if kind == "tf32":
        return
    h = K.to16_into(v, np.empty(v.size, np.uint16), kind, **T)
    fin = ~np.isnan(v)
    with np.errstate(all="ignore"):
        ref = (v.astype(ml_dtypes.bfloat16) if kind == "bf16" else v.astype(np.float16)).view(np.uint16)
    assert (h[fin] == ref[fin]).all(), v[fin][h[fin] != ref[fin]]
    back = K.from16_into(h, np.empty_like(v), kind, **T)
    assert (_bits(back) == _bits(want)).all()  # NaNs included: quiet, payload's top bits kept
    assert (K.round_into(v.copy(), v.copy(), kind, **T).size == v.size)


@pytest.mark.parametrize("act", ["identity", "relu", "sigmoid"])
@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_epilogue_and_backward_store(kind, act):
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((3, 5)) * 4).astype(np.float32)
    z[0, :3] = [1 + 2.0**-8, 70000.0, 1e-6]
    b = rng.standard_normal(5).astype(np.float32)
    a = get_activation(act)
    saves = a.saves
    kept = np.empty(z.shape, np.uint16) if saves else None
    out = K.bias_activation_store(z.copy(), b, a, out := z.copy(), kept, saves, kind, **T)
    v = z + b
    f = a.forward(v).astype(np.float32)
    if act != "sigmoid":  # exact maths: the spec bit for bit
        assert (_bits(out) == _bits(P.round_to(np, f, kind))).all()
    else:
        assert np.allclose(out, P.round_to(np, f, kind), rtol=P.unit_roundoff(kind) * 2, atol=0)
    assert (_bits(out) == _bits(P.round_to(np, out, kind))).all()
    if saves:
        want_kept = P.round_to(np, v if saves == "z" else out, kind)
        got_kept = K.from16_into(kept, np.empty(z.shape, np.float32), kind, **T)
        assert (_bits(got_kept) == _bits(want_kept)).all()
        da = rng.standard_normal(z.shape).astype(np.float32)
        dz, dzg = np.empty_like(da), np.empty(z.shape, np.uint16)
        K.activation_backward_store(da, kept, a, dz, dzg, kind, **T)
        s = got_kept
        want_dz = a.backward(da, s, s).astype(np.float32)
        assert np.allclose(dz, want_dz, rtol=1e-6, atol=1e-7)
        got_g = K.from16_into(dzg, np.empty_like(da), kind, **T)
        assert (_bits(got_g) == _bits(P.round_to(np, dz, kind))).all()


# --- a fake cuBLAS: records every gemmEx call and computes it from the pointers ----------------------------

_CT = {CP.CUDA_R_32F: (ctypes.c_float, np.float32), CP.CUDA_R_16F: (ctypes.c_uint16, np.float16),
       CP.CUDA_R_16BF: (ctypes.c_uint16, "bf16")}


def _read(ptr: int, dtype: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major (rows, cols) matrix at ``ptr`` with leading dimension ``ld``, as float64."""
    ct, dt = _CT[dtype]
    count = ld * (cols - 1) + rows
    raw = np.ctypeslib.as_array((ct * count).from_address(ptr))
    if dt == "bf16":
        vals = CP.bf16_to_float32(raw)
    else:
        vals = raw.view(dt)
    full = np.zeros(ld * cols, np.float64)
    full[:count] = vals
    return full.reshape(cols, ld)[:, :rows].T


class FakeCublas:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
               computeType, algo):  # noqa: N802, N803 (cuBLAS's names)
        self.calls.append(dict(transa=transa, transb=transb, m=m, n=n, k=k, Atype=Atype, lda=lda, Btype=Btype,
                               ldb=ldb, Ctype=Ctype, ldc=ldc, compute=computeType, algo=algo))
        assert Atype == Btype and Ctype == CP.CUDA_R_32F
        assert computeType == (CP.CUBLAS_COMPUTE_32F_FAST_TF32 if Atype == CP.CUDA_R_32F else CP.CUBLAS_COMPUTE_32F)
        one = ctypes.c_float.from_address(alpha).value
        zero = ctypes.c_float.from_address(beta).value
        assert (one, zero) == (1.0, 0.0)
        a = _read(A, Atype, *((m, k) if transa == CP.CUBLAS_OP_N else (k, m)), lda)
        b = _read(B, Btype, *((k, n) if transb == CP.CUBLAS_OP_N else (n, k)), ldb)
        a = a if transa == CP.CUBLAS_OP_N else a.T
        b = b if transb == CP.CUBLAS_OP_N else b.T
        if Atype == CP.CUDA_R_32F:  # the inputs come rounded to tf32: nothing left for the hardware
            for x in (a, b):
                assert (_bits(x.astype(np.float32)) & 0x1FFF == 0).all()
        c = (a @ b).astype(np.float32)  # products exact, float64 sums rounded once
        out = np.ctypeslib.as_array((ctypes.c_float * (ldc * (n - 1) + m)).from_address(C))
        for j in range(n):
            out[j * ldc: j * ldc + m] = c[:, j]


@pytest.mark.parametrize("kind", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_marshalling(kind, ta, tb):
    rng = np.random.default_rng(7)
    M, K_, N = 3, 5, 4
    a = rng.standard_normal((K_, M) if ta else (M, K_)).astype(np.float32)
    b = rng.standard_normal((N, K_) if tb else (K_, N)).astype(np.float32)
    a, b = P.round_to(np, a, kind), P.round_to(np, b, kind)

    def store(x):
        if kind == "tf32":
            return x
        h = CP.empty16(np, x.shape, kind)
        return K.to16_into(x, h, kind, **T)

    c = np.full((M, N), np.nan, np.float32)
    fake = FakeCublas()
    CP.gemm(fake, 0, store(a), store(b), c, kind, trans_a=ta, trans_b=tb)
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    np.testing.assert_allclose(c, want, rtol=1e-6)
    (call,) = fake.calls
    assert (call["m"], call["n"], call["k"], call["ldc"]) == (N, M, K_, N)
    assert call["transa"] == (CP.CUBLAS_OP_T if tb else CP.CUBLAS_OP_N)
    assert call["transb"] == (CP.CUBLAS_OP_T if ta else CP.CUBLAS_OP_N)
    assert (call["lda"], call["ldb"]) == (b.shape[1], a.shape[1])
    assert call["Atype"] == {"tf32": CP.CUDA_R_32F, "bf16": CP.CUDA_R_16BF, "fp16": CP.CUDA_R_16F}[kind]
    with pytest.raises(ValueError, match="do not match"):
        CP.gemm(fake, 0, store(a), store(b), np.empty((M + 1, N), np.float32), kind, trans_a=ta, trans_b=tb)


# --- the native dense path against the spec ---------------------------------------------------------------


def _native_sim():
    from gpubp.backends.cudasim import SimulatedCudaBackend

    class NativeSim(SimulatedCudaBackend):
        native_precisions = tuple(MIXED)

        def __init__(self) -> None:
            super().__init__()
            self.fake = FakeCublas()

        def _blas(self):
            return self.fake, 0

    return NativeSim()


def _backend():
    if SIM:
        return _native_sim()
    from gpubp.backends.cuda import CudaBackend

    return CudaBackend.for_device(0)


def _check_against_spec(b, precision: str, act: str, shape: tuple) -> None:
    p = P.get(precision)
    a_ = get_activation(act)
    n, k, m = shape
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = (rng.standard_normal((k, m)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    da = P.round_to(np, rng.standard_normal((n, m)).astype(np.float32), p.store)
    a_want, (xg_want, kept_want) = numpy_ref.dense_forward(x, w, bias, a_, True, p)
    xd, wd, bd = b.asarray(x, "float32"), b.asarray(w, "float32"), b.asarray(bias, "float32")
    a, saved = b.dense_forward(xd, wd, bd, a_, True, precision=p)
    a_inf, none = b.dense_forward(xd, wd, bd, a_, False, precision=p)
    assert none == () and str(a.dtype) == "float32"
    ulp = 4 * P.unit_roundoff(p.store or "fp32")
    tol = dict(rtol=ulp, atol=1e-6)
    np.testing.assert_allclose(b.to_numpy(a), a_want, **tol)
    np.testing.assert_allclose(b.to_numpy(a_inf), a_want, **tol)
    assert (_bits(b.to_numpy(saved[0]).astype(np.float32)) == _bits(xg_want)).all()  # R_g(x), exactly
    if a_.saves:
        np.testing.assert_allclose(b.to_numpy(saved[1]).astype(np.float32), kept_want, **tol)
    if p.store is not None:
        assert str(saved[0].dtype) == ("float16" if p.store == "fp16" else "uint16")
    host_saved = tuple(None if s is None else b.to_numpy(s).astype(np.float32) for s in saved)
    dw_want, db_want = np.empty_like(w), np.empty_like(bias)
    dx_want = numpy_ref.dense_backward(da, host_saved, w, a_, dw_want, db_want, True, p)
    dw, db = b.asarray(np.full(w.shape, np.nan), "float32"), b.asarray(np.full(m, np.nan), "float32")
    dx = b.dense_backward(b.asarray(da, "float32"), saved, wd, a_, dw, db, True, precision=p)
    gtol = dict(rtol=4 * P.unit_roundoff(p.gemm), atol=1e-5)
    np.testing.assert_allclose(b.to_numpy(dw), dw_want, **gtol)
    np.testing.assert_allclose(b.to_numpy(db), db_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.to_numpy(dx), dx_want, **tol)
    dxh = b.to_numpy(dx)
    assert (_bits(dxh) == _bits(P.round_to(np, dxh, p.store))).all()


@pytest.mark.parametrize("act", ["identity", "relu", "sigmoid"])
@pytest.mark.parametrize("precision", MIXED)
def test_native_dense_on_the_simulator_matches_the_spec(precision, act):
    if not SIM:
        pytest.skip("the simulator's run (a GPU runs the real one below)")
    b = _native_sim()
    _check_against_spec(b, precision, act, (3, 4, 5))
    assert b.fake.calls and all(c["Ctype"] == CP.CUDA_R_32F for c in b.fake.calls)


def test_weight_copies_are_made_once_per_parameter_change():
    if not SIM:
        pytest.skip("counts conversions on the simulator")
    b = _native_sim()
    p = P.get("bf16-mixed")
    act = get_activation("relu")
    rng = np.random.default_rng(0)
    x, w, bias = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3), (3, 4), (4,)))
    nd = b._native(p)
    made = []
    real = nd.convert
    nd.convert = lambda arr, kind, stream: made.append(arr.shape) or real(arr, kind, stream)
    a1, _ = b.dense_forward(x, w, bias, act, False, precision=p)
    b.dense_forward(x, w, bias, act, False, precision=p)
    assert made.count((3, 4)) == 1  # the weight copy once, x each call
    b.assign_(w, w * 2)
    a2, _ = b.dense_forward(x, w, bias, act, False, precision=p)
    assert made.count((3, 4)) == 2 and not np.array_equal(a1, a2)


def test_native_precisions():
    from gpubp.backends.cuda import CudaBackend
    from gpubp.backends.cudasim import SimulatedCudaBackend

    assert set(CudaBackend.native_precisions) == set(MIXED)
    assert SimulatedCudaBackend.native_precisions == ()


@pytest.mark.skipif(GPUS == 0, reason="needs a GPU")
@pytest.mark.parametrize("act", ["identity", "relu", "sigmoid", "gelu"])
@pytest.mark.parametrize("precision", MIXED)
def test_native_dense_on_the_gpu_matches_the_spec(precision, act):
    b = _backend()
    for shape in [(7, 3, 5), (17, 33, 13), (64, 128, 96)]:
        _check_against_spec(b, precision, act, shape)
