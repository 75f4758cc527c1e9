"""Fused Numba kernels for the CPU: the memory-bound half of a dense step, one pass each.

The GEMMs stay NumPy/BLAS (``x @ W``, ``x^T dz``, ``dz W^T``); what lies between them
runs here, each a single pass over memory where NumPy makes several:

| kernel               | computes (shapes)                                              | NumPy passes it replaces |
|----------------------|----------------------------------------------------------------|--------------------------|
| ``bias_act``         | z += b; a = f(z)                 z, a (N, M), b (M,)           | 2-3, a temporary         |
| ``act_bias_grad``    | dz = da f'(s); db = sum_rows dz  da, s, dz (N, M), db (M,)     | 3-5, temporaries         |
| ``cpu_loss.kernel``  | an element-wise loss (any row): gradient, float64 value, flat  | 4-8                      |
| ``cross_entropy``    | softmax, gradient, value by rows logits (N, C)                 | 8, three temporaries     |
| ``cpu_update.kernel`` | one optimizer update (any rule)  flat runs of the arena         | 4-12, 1-3 temporaries    |
| ``sum_of_squares``   | sum g^2 in float64               flat                          | 2, a float64 temporary   |

The per-element maths is not written here: it is :mod:`gpubp.backends.scalar_math`
(``act_f``, ``act_grad``, ...; an optimizer's is its rule's body, compiled by
:mod:`gpubp.backends.cpu_update`, an element-wise loss's its row's term, compiled by
:mod:`gpubp.backends.cpu_loss`, both with this module's ``dm``), compiled with
``numba.njit`` (LLVM inlines them), the same source the Numba CUDA kernels compile. The one
addition is :func:`build_fast`: a float32 exp and erf made of polynomials and selects,
which LLVM vectorises where ``math.erf``/``math.exp`` are scalar libm calls (see its
error bounds); the float32 gelu and softmax use them, float64 keeps libm.

Kernels are made per configuration by factories (activation id, optimizer flags,
float32 or not, parallel or serial), so each compiled loop has its constants folded
and vectorises; they are cached on disk (``cache=True``): a second process loads them
instead of compiling. Numba keys its cache on this file and on the closure's values,
and ``SOURCE`` (a hash of the scalar maths the kernels inline) is one of those values,
so an edit of scalar_math.py or activations.py recompiles.

Determinism: work is cut into fixed chunks (``FLAT_CHUNK`` elements, or rows of about
``ROW_CHUNK`` elements), whatever the thread count. A reduction sums each chunk in a
fixed order into its own partial, then the partials in chunk order: the same bits with
one thread or many, serially or in parallel. Parallel (``numba.prange`` over chunks)
or serial is chosen per call by :mod:`gpubp.threads` (``parallel_min``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

from gpubp import threads
from gpubp.backends import scalar_math

__all__ = ["build_fast", "FAST", "ERF32_MAX_ABS_ERR", "ERF32_SMALL_MAX_REL_ERR", "EXP32_MAX_REL_ERR", "dm", "fm"]

FLAT_CHUNK = 1 << 14  # elements per chunk of a flat kernel
ROW_CHUNK = 1 << 14  # elements per chunk of a row kernel: max(1, ROW_CHUNK // M) rows

GELU = scalar_math.GELU
IDENTITY = scalar_math.IDENTITY

#: A hash of the sources the kernels inline; part of every kernel's cache key.
SOURCE = hashlib.sha256(
    b"".join((Path(__file__).parent.parent / p).read_bytes() for p in ("backends/scalar_math.py", "activations.py"))
).hexdigest()[:16]

# error_model="numpy": x / 0 gives inf or NaN as NumPy does, where Python's model raises, and its
# check in every loop that divides stops the loop vectorising.
# Plain njit, not inline="always": Numba compiles each scalar function once per signature and
# LLVM inlines it into every kernel (constants folded, loops vectorised); Numba's IR-level
# inlining gave the same code at 3-10x the compile time.
_inline = numba.njit(error_model="numpy")
# The fast float32 functions and the element wrappers below are inlined by Numba itself: LLVM's
# inliner refuses a function as large as erf, and a call left in a loop stops it vectorising.
_always = numba.njit(inline="always", error_model="numpy")

#: scalar_math compiled for the CPU.
dm = scalar_math.build(_inline)


# --- a vectorisable float32 exp and erf -------------------------------------------------------

# e^r = 1 + r + r^2 E(r) on |r| <= ln2/2 (E fitted for relative error 3e-9, coefficients in float32)
_EXP_E = (0.5, 0.1666666716337204, 0.04166649281978607, 0.008333364501595497, 0.0013931869762018323,
          0.0001985460112337023)
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # 9 significant bits: k * LN2_HI is exact in float32 for |k| <= 2^15
_LN2_LO = -2.1219444005469057e-4
_EXP_MIN = -104.0  # e^-104 = 6.8e-46 rounds to 0 in float32
# erf(x) = x P(x^2) for |x| < _ERF_SPLIT (P fitted for relative error 9e-9)
_ERF_P = (1.1283791065216064, -0.3761255145072937, 0.11282456666231155, -0.026791509240865707,
          0.005032240878790617, -0.0006203535594977438)
# erf(x) = 1 - e^Q(|x|) above, Q(a) ~ log erfc(a) as a polynomial in a - 0.875 on [0.875, 3.92]
# (fitted for absolute error 1.1e-8, so e^Q is erfc to a relative 1.1e-8; expanded about the left
# end, where erfc is largest, so that float32 Horner rounding stays small there); erf = 1 in float32
# beyond 3.92
_ERF_SPLIT = 0.875
_ERF_Q = (-1.5328243970870972, -2.430220365524292, -0.8265326023101807, -0.0469391904771328,
          0.01142971683293581, -0.002300058025866747, 0.0003480098384898156, -3.428538184380159e-05,
          1.6146591406140942e-06)
_ERF_ONE = 3.92

#: Error bounds of the float32 build against math.erf / math.exp in float64, at float32 inputs
#: (tests/test_cpu_backend.py checks them on a grid of 8.4M points, where the worst were 1.04, 1.47
#: and 0.99 units of 2^-23): erf to 1.5 * 2^-23 absolute everywhere (about one float32 ulp at
#: erf = 1; the activation contract allows ACT_AEPS * eps32 = 4 * 2^-23 and more), and to
#: 2 * 2^-23 relative where |x| < 0.875 (near 0, where erf is small); exp_neg to 1.5 * 2^-23
#: relative while e^x is a normal float32 (x >= -87.3), beyond which float32 keeps fewer bits.
ERF32_MAX_ABS_ERR = 1.5 * 2.0**-23
ERF32_SMALL_MAX_REL_ERR = 2.0 * 2.0**-23
EXP32_MAX_REL_ERR = 1.5 * 2.0**-23


@intrinsic
def _pow2_neg(typingctx, like, m):
    """2^-m in like's float type (0 <= m <= 126 for float32, normal), from its exponent bits: one
    integer subtract, shift and bitcast, which vectorise, where a libm ldexp is a call."""
    if not isinstance(like, numba.types.Float) or not isinstance(m, numba.types.Integer):
        return None

    def codegen(context, builder, signature, args):
        lty = context.get_value_type(like)
        bits, bias = (32, 127 - 23) if like.bitwidth == 32 else (64, 1023 - 52)
        ity = ir.IntType(bits)
        mi = context.cast(builder, args[1], m, numba.types.int32)
        mi = builder.sext(mi, ity) if bits == 64 else mi
        e = builder.sub(ir.Constant(ity, bias + (23 if bits == 32 else 52)), mi)
        return builder.bitcast(builder.shl(e, ir.Constant(ity, 23 if bits == 32 else 52)), lty)

    return like(like, m), codegen


def _pow2_neg_plain(like, m):
    """The plain-Python twin of _pow2_neg (exact)."""
    return type(like)(math.ldexp(1.0, -int(m)))


def build_fast(jit: Callable[[Callable], Any] | None = None) -> types.ModuleType:
    """``exp_neg`` (e^x, x <= 0), ``erf``, ``gelu_f`` and ``gelu_df`` made of polynomials and selects,
    in the dtype of their argument (accurate to float32 rounding; meant for float32), compiled with
    ``jit`` (None: plain Python). No libm call, so a loop over them vectorises."""
    if jit is None:
        jit = _identity
    compiled = jit is not _identity
    cst = dm.cst if compiled else scalar_math.PLAIN.cst
    pow2_neg = _pow2_neg if compiled else _pow2_neg_plain

    @jit
    def exp_neg(x):
        """e^x for x <= 0: e^x = 2^k e^r, k = -floor(1/2 - x log2 e) (x log2 e rounded), r = x - k ln2
        (Cody-Waite, two parts), e^r a polynomial, 2^k (k in [-151, 0]) as two normal powers of two
        made from their exponent bits (2^-(m//2) and 2^-(m - m//2), m = -k), so that p 2^k rounds once."""
        one = cst(x, 1.0)
        x = max(x, cst(x, _EXP_MIN))
        m = np.int32(cst(x, 0.5) - x * cst(x, _LOG2E))  # m = -k >= 0: truncation is floor here (no libm floor)
        kf = -cst(x, m)
        r = (x - kf * cst(x, _LN2_HI)) - kf * cst(x, _LN2_LO)
        e = cst(x, _EXP_E[5])
        e = e * r + cst(x, _EXP_E[4])
        e = e * r + cst(x, _EXP_E[3])
        e = e * r + cst(x, _EXP_E[2])
        e = e * r + cst(x, _EXP_E[1])
        e = e * r + cst(x, _EXP_E[0])
        p = one + r + r * r * e
        half = m >> 1
        return p * pow2_neg(x, half) * pow2_neg(x, m - half)

    @jit
    def erf(x):
        """erf(x): x P(x^2) for |x| < 0.875, else sign(x) (1 - e^Q(|x|)); both computed, one selected."""
        a = abs(x)
        s = x * x
        p = cst(x, _ERF_P[5])
        p = p * s + cst(x, _ERF_P[4])
        p = p * s + cst(x, _ERF_P[3])
        p = p * s + cst(x, _ERF_P[2])
        p = p * s + cst(x, _ERF_P[1])
        p = p * s + cst(x, _ERF_P[0])
        small = x * p
        u = min(a, cst(x, _ERF_ONE)) - cst(x, _ERF_SPLIT)
        q = cst(x, _ERF_Q[8])
        q = q * u + cst(x, _ERF_Q[7])
        q = q * u + cst(x, _ERF_Q[6])
        q = q * u + cst(x, _ERF_Q[5])
        q = q * u + cst(x, _ERF_Q[4])
        q = q * u + cst(x, _ERF_Q[3])
        q = q * u + cst(x, _ERF_Q[2])
        q = q * u + cst(x, _ERF_Q[1])
        q = q * u + cst(x, _ERF_Q[0])
        big = cst(x, 1.0) - exp_neg(min(q, cst(x, 0.0)))
        big = big if x >= cst(x, 0.0) else -big
        return small if a < cst(x, _ERF_SPLIT) else big

    @jit
    def gelu_f(z):
        """scalar_math's GELU forward, z/2 (1 + erf(z/sqrt 2)), with this erf."""
        half = cst(z, 0.5)
        return half * z * (cst(z, 1.0) + erf(z * cst(z, scalar_math._INV_SQRT_2)))

    @jit
    def gelu_df(z):
        """scalar_math's GELU derivative, Phi(z) + z phi(z) (phi on z clipped to +-40), with this erf and exp."""
        half = cst(z, 0.5)
        cdf = half * (cst(z, 1.0) + erf(z * cst(z, scalar_math._INV_SQRT_2)))
        zc = min(max(z, cst(z, -scalar_math._GELU_PDF_CLIP)), cst(z, scalar_math._GELU_PDF_CLIP))
        pdf = cst(z, scalar_math._INV_SQRT_2PI) * exp_neg(-half * zc * zc)
        return cdf + z * pdf

    built = types.ModuleType("numba_cpu_fast", "float32 exp/erf/gelu made of polynomials and selects")
    for name, fn in (("exp_neg", exp_neg), ("erf", erf), ("gelu_f", gelu_f), ("gelu_df", gelu_df)):
        setattr(built, name, fn)
    return built


def _identity(fn: Callable) -> Callable:
    return fn


#: The plain-Python build (tests) and the compiled one (the kernels).
FAST = build_fast()
fm = build_fast(_always)


# --- element functions: scalar_math's, or the fast float32 gelu --------------------------------


@_always
def _act(act_id, approx, z, p0, p1):
    if approx and act_id == GELU:
        return fm.gelu_f(z)
    return dm.act_f(act_id, z, p0, p1)


@_always
def _grad(act_id, approx, g, s, p0, p1):
    if approx and act_id == GELU:
        return g * fm.gelu_df(s)
    return dm.act_grad(act_id, g, s, p0, p1)


@_always
def _exp(approx, x):
    """e^x for x <= 0: the fast float32 path or libm."""
    if approx:
        return fm.exp_neg(x)
    return math.exp(x)


# Numba's float() keeps a float32 a float32: float64 values are made with np.float64().
# Flat kernels index a slice per chunk from 0 (an index LLVM knows is >= 0 needs no negative-index
# wraparound, which would otherwise stop the loop vectorising).

# --- kernel factories ----------------------------------------------------------------------------
# Each returns a kernel compiled for its closure's constants; ``source`` and ``parallel`` are
# named in every body so that they are part of the closure, and so of the cache key.


def _jit(parallel: bool) -> Callable:
    return numba.njit(parallel=parallel, cache=True, nogil=True, error_model="numpy")


# --- the generic row kernels (cpu_update, cpu_loss): a template loop bound to a row's scalar code ---


@functools.cache
def row_source(rule_module: str, shared_module: str) -> str:
    """A hash of what a row's kernel inlines (scalar_math, activations, the row's file and the module
    its kind shares): a cache key argument of the template, so Numba's disk cache follows edits."""
    files = [Path(inspect.getfile(sys.modules[m])) for m in (rule_module, shared_module)]
    return hashlib.sha256(SOURCE.encode() + b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


@functools.cache
def row_scalar(rule: Any) -> Any:
    """``rule.scalar`` built on :data:`dm` and compiled with numba.njit, once per rule."""
    return _inline(rule.scalar(dm))


def bind(template: Callable, step: Any, parallel: bool) -> Callable:
    """``template`` (a loop calling the global ``step``) with ``step`` bound, compiled: a copy of the
    function with its own globals, so each row's loop is its own Numba dispatcher."""
    fn = types.FunctionType(template.__code__, {**template.__globals__, "step": step}, template.__name__,
                            template.__defaults__, template.__closure__)
    fn.__qualname__ = template.__qualname__
    return _jit(parallel)(fn)


@functools.cache
def bias_act(act_id: int, approx: bool, keep_z: bool, parallel: bool) -> Callable:
    """kernel(z, b, p0, p1, a, rows): z (N, M) + b (M,) -> a = f(z + b); z keeps z + b when ``keep_z``
    (``a`` a separate array), else a = f(z + b) is written over z (``a`` unused)."""
    source = SOURCE

    @_jit(parallel)
    def kernel(z, b, p0, p1, a, rows):
        source, parallel  # noqa: B018 - cache key
        n, m = z.shape
        for c in numba.prange((n + rows - 1) // rows):
            for i in range(c * rows, min(n, c * rows + rows)):
                zr = z[i]  # row views: 1-D contiguous loops (2-D indexing ran 2x slower at M = 64)
                if keep_z:
                    ar = a[i]
                    for j in range(m):
                        v = zr[j] + b[j]
                        zr[j] = v
                        ar[j] = _act(act_id, approx, v, p0, p1)
                else:  # in place, through z only: a store through a second name for the same
                    for j in range(m):  # memory fails LLVM's overlap check
                        zr[j] = _act(act_id, approx, zr[j] + b[j], p0, p1)

    return kernel


@functools.cache
def act_bias_grad(act_id: int, approx: bool, parallel: bool) -> Callable:
    """kernel(da, s, p0, p1, dz, partial, db, rows): dz = da f'(s) (N, M) (not written for identity,
    where dz is da); db = sum over rows of dz: chunk c's rows summed in order into partial[c] (nch, M),
    then the partials in chunk order."""
    source = SOURCE

    @_jit(parallel)
    def kernel(da, s, p0, p1, dz, partial, db, rows):
        source, parallel  # noqa: B018 - cache key
        n, m = da.shape
        nch = partial.shape[0]
        for c in numba.prange(nch):
            pc = partial[c]  # row views: 1-D contiguous loops
            for j in range(m):
                pc[j] = 0
            for i in range(c * rows, min(n, c * rows + rows)):
                dar, sr, dzr = da[i], s[i], dz[i]
                for j in range(m):
                    g = _grad(act_id, approx, dar[j], sr[j], p0, p1)
                    if act_id != IDENTITY:
                        dzr[j] = g
                    pc[j] += g
        for j in range(m):
            db[j] = partial[0, j]
        for c in range(1, nch):
            for j in range(m):
                db[j] += partial[c, j]

    return kernel


@functools.cache
def cross_entropy(labels: bool, approx: bool, weighted: bool, parallel: bool) -> Callable:
    """kernel(z, y, t, scale, grad, partial, rows, w, wscale) -> the loss before scaling, in float64.

    Per row of z (N, C): mx = max z; e = exp(z - mx) (written to grad); s = sum e (8 fixed lanes,
    then the lanes in a fixed tree); logsumexp = mx + log s.
      labels (y (N,) int64):  value += logsumexp - z[y];            grad = scale (e / s - onehot(y))
      probabilities t (N, C): value += sum_c t (logsumexp - z);    grad = scale (e / s * sum_c t - t)
    ``weighted``: row i's value terms are multiplied by w[i] (float64) and its gradient factor is
    dtype(wscale w[i]) in place of ``scale`` (w and wscale are not read otherwise).
    Row values summed in order within a chunk of ``rows`` rows, then chunk partials in order.
    """
    source = SOURCE

    @_jit(parallel)
    def kernel(z, y, t, scale, grad, partial, rows, w, wscale):
        source, parallel  # noqa: B018 - cache key
        n, m = z.shape
        m8 = m - m % 8
        for c in numba.prange(partial.shape[0]):
            acc = 0.0
            for i in range(c * rows, min(n, c * rows + rows)):
                m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = z[i, 0]
                for j in range(0, m8, 8):
                    m0 = max(m0, z[i, j])
                    m1 = max(m1, z[i, j + 1])
                    m2 = max(m2, z[i, j + 2])
                    m3 = max(m3, z[i, j + 3])
                    m4 = max(m4, z[i, j + 4])
                    m5 = max(m5, z[i, j + 5])
                    m6 = max(m6, z[i, j + 6])
                    m7 = max(m7, z[i, j + 7])
                for j in range(m8, m):
                    m0 = max(m0, z[i, j])
                mx = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
                for j in range(m):
                    grad[i, j] = _exp(approx, z[i, j] - mx)
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = dm.cst(mx, 0.0)
                for j in range(0, m8, 8):
                    s0 += grad[i, j]
                    s1 += grad[i, j + 1]
                    s2 += grad[i, j + 2]
                    s3 += grad[i, j + 3]
                    s4 += grad[i, j + 4]
                    s5 += grad[i, j + 5]
                    s6 += grad[i, j + 6]
                    s7 += grad[i, j + 7]
                for j in range(m8, m):
                    s0 += grad[i, j]
                s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
                lse = np.float64(mx) + math.log(np.float64(s))
                wi = 1.0
                sc = scale
                if weighted:
                    wi = w[i]
                    sc = dm.cst(mx, wscale * wi)
                if labels:
                    k = y[i]
                    if weighted:
                        acc += wi * (lse - np.float64(z[i, k]))
                    else:
                        acc += lse - np.float64(z[i, k])
                    f = sc / s
                    for j in range(m):
                        grad[i, j] = grad[i, j] * f
                    grad[i, k] -= sc
                else:
                    ts = dm.cst(t[i, 0], 0.0)
                    for j in range(m):
                        ts += t[i, j]
                        if weighted:
                            acc += wi * (np.float64(t[i, j]) * (lse - np.float64(z[i, j])))
                        else:
                            acc += np.float64(t[i, j]) * (lse - np.float64(z[i, j]))
                    f = sc / s * ts
                    for j in range(m):
                        grad[i, j] = grad[i, j] * f - sc * t[i, j]
            partial[c] = acc
        total = 0.0
        for c in range(partial.shape[0]):
            total += partial[c]
        return total

    return kernel


@functools.cache
def sum_of_squares(parallel: bool) -> Callable:
    """kernel(g, partial, chunk) -> sum g^2 in float64: 8 fixed lanes per chunk, lanes then chunks in order."""
    source = SOURCE

    @_jit(parallel)
    def kernel(g, partial, chunk):
        source, parallel  # noqa: B018 - cache key
        n = g.shape[0]
        for c in numba.prange(partial.shape[0]):
            lo = c * chunk
            hi = min(n, lo + chunk)
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
            j = lo
            while j + 8 <= hi:
                v0, v1, v2, v3 = np.float64(g[j]), np.float64(g[j + 1]), np.float64(g[j + 2]), np.float64(g[j + 3])
                v4, v5, v6, v7 = np.float64(g[j + 4]), np.float64(g[j + 5]), np.float64(g[j + 6]), np.float64(g[j + 7])
                s0 += v0 * v0
                s1 += v1 * v1
                s2 += v2 * v2
                s3 += v3 * v3
                s4 += v4 * v4
                s5 += v5 * v5
                s6 += v6 * v6
                s7 += v7 * v7
                j += 8
            while j < hi:
                v0 = np.float64(g[j])
                s0 += v0 * v0
                j += 1
            partial[c] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        total = 0.0
        for c in range(partial.shape[0]):
            total += partial[c]
        return total

    return kernel


# --- launching ---------------------------------------------------------------------------------------


def parallel_for(elements: int) -> bool:
    """Whether a kernel over ``elements`` elements runs on Numba's threads (gpubp.threads' policy)."""
    return elements >= threads.policy().parallel_min


def rows_per_chunk(m: int) -> int:
    """Rows per chunk of a row kernel over M columns (a function of M only: fixed for a shape)."""
    return max(1, ROW_CHUNK // max(m, 1))


def chunks(n: int, size: int) -> int:
    return max(1, -(-n // size))
