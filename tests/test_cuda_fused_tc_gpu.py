"""GPU tests of the tensor-core kernels (kernels/*_tc.cu) through their launchers (dense_forward_tc /
dense_backward_tc): skipped where the CUDA driver reports no GPU (tests/conftest.py: GPUS), or
where the GPU is older than compute capability 8.0.

The comparison of test_cuda_fused_tc_offline.py on real tensor cores: every activation kind and
precision (tf32, bf16-mixed, fp16-mixed) against the float64 oracle under the precision spec's
rounding (gpubp.tools.oracles_tc: the dot-product bound of the float32 accumulation plus one
rounding of the store type), on odd shapes, one that needs split-K, and a wide one. What only the
hardware shows: the mma fragment layouts as the PTX ISA documents them (a wrong layout is far
outside every bound), ldmatrix, the accumulation order and rounding inside one mma, cvt.rna, the
device libm, -ftz. Reruns must give the same bits (no atomics, fixed split). Seeds in messages.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubp.activations import Activation
from gpubp.backends import cuda_fused as rk
from tests.conftest import GPUS
from tests.test_cuda_fused_tc_offline import check_against_oracle, make_inputs, new_seed

pytestmark = pytest.mark.skipif(GPUS == 0, reason="no GPU: the tensor-core kernels run only on a GPU")

cp = pytest.importorskip("cupy") if GPUS else None

PRECISIONS = ["tf32", "bf16-mixed", "fp16-mixed"]
ACTS = [
    Activation("identity"),
    Activation("relu"),
    Activation("leaky_relu", slope=0.1),
    Activation("sigmoid"),
    Activation("tanh"),
    Activation("gelu"),
    Activation("gelu_tanh"),
    Activation("silu"),
    Activation("elu", alpha=0.7),
    Activation("softplus", beta=2.0, threshold=10.0),
]
SHAPES = [(1, 1, 1), (37, 45, 70), (130, 131, 260), (4096, 64, 64)]


@pytest.fixture(autouse=True)
def _needs_sm80():
    cc = int(cp.cuda.Device().compute_capability)
    if cc < rk.MIN_CC_TC:
        pytest.skip(f"the tensor-core kernels need compute capability 8.0+, this GPU has {cc}")


def _run(x, w, b, da, act, precision, mask=True, split_k=None):
    prec = rk.precision_id(precision)
    a, saved = rk.dense_forward_tc(cp.asarray(x), cp.asarray(w), cp.asarray(b), act, True, precision, mask=mask)
    dw = cp.full(w.shape, np.nan, cp.float32)
    db = cp.full(w.shape[1], np.nan, cp.float32)
    dx = rk.dense_backward_tc(cp.asarray(da), saved, cp.asarray(w), act, dw, db, True, precision, split_k=split_k)
    kept = None if saved[1] is None else cp.asnumpy(saved[1])
    host = [cp.asnumpy(t) for t in (a, dw, db, dx)]
    if prec == 1:  # bf16 arrays come back as their uint16 bits
        host[0], host[3] = host[0].view(np.uint16), host[3].view(np.uint16)
    return host[0], kept, host[1], host[2], host[3]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_tc_kernels_match_the_float64_oracle_on_the_gpu(precision, act, shape):
    seed, prec = new_seed(), rk.precision_id(precision)
    x, w, b, da = make_inputs(*shape, prec, seed)
    for mask in ([True, False] if act.name in rk.MASK_ACTIVATIONS else [True]):
        a, kept, dw, db, dx = _run(x, w, b, da, act, precision, mask)
        errs = check_against_oracle(x, w, b, da, act, prec, a, kept, dw, db, dx, seed)
        print(f"{precision} {act.name} {shape} mask={mask}: max |err| {errs}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tc_kernels_rerun_bit_for_bit_and_split_k(precision):
    seed, prec = new_seed(), rk.precision_id(precision)
    x, w, b, da = make_inputs(600, 20, 40, prec, seed)
    act = Activation("gelu")
    first = _run(x, w, b, da, act, precision, split_k=3)
    again = _run(x, w, b, da, act, precision, split_k=3)
    for u, v in zip(first, again, strict=True):
        np.testing.assert_array_equal(u, v, err_msg=f"rerun differs (seed {seed})")
    check_against_oracle(x, w, b, da, act, prec, *first, seed)
