"""Numba CUDA kernels for the CUDA backend: activations, bias gradient, losses.

The NumPy reference (``numpy_ref`` and ``gpubp.activations``) is the spec; every
kernel here computes the same maths, in the dtype of its inputs (float32 or
float64), and is checked against it by ``tests/test_numba_cuda.py``. The
per-element maths is not written here: it is :mod:`gpubp.backends.scalar_math`,
compiled once more for the device, and the kernels are the loops around it.

Modules (each kernel beside its launcher; the launch machinery apart):
    launch         what both Numba kernel packages share: the device build of the scalar
                   maths (with the FMA-free product), the one counted launch path, streams,
                   the grid-stride kernel factory, the launchers' checks and work buffers;
                   ``numba_cuda_optim`` builds its kernels with them
    reduce         the fixed-order block trees (LANES) and stage 2 of every loss value
    activations    forward, dense epilogue, backward (elementwise)
    bias_gradient  db = dz.sum(axis=0): two-stage column sums
    precision      mixed precision: the spec's roundings on bit patterns (16-bit values as uint16),
                   the 16-bit epilogue and activation backward of the native mixed path
    losses         one chunked kernel per element-wise loss row (its scalar term: MSE,
                   BCEWithLogits, ...), CrossEntropy (labels / probabilities); ``loss``
                   launches any row
This package re-exports every name other code uses, and lists the compile targets
(:func:`ptx_targets`).

This package is imported only by the CUDA backends and the tests, never by
``import gpubp``. Without a GPU the kernels run under the Numba CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported); :func:`ptx_targets`
lists every kernel with its signatures so that a PTX compile check needs no GPU.

Determinism. Nothing here uses atomics. Every sum is taken in an order fixed by
the shapes and by the module constants (``LANES``, ``CHUNK``, ``BG_*``), never by the
launch configuration (threads per block, number of blocks) nor by scheduling: the same
inputs give the same bits, however a launcher is called.

Streams and arrays. Launchers accept any array the kernels accept: NumPy arrays
under the simulator, and on a GPU Numba device arrays or CuPy arrays, which are
handed to Numba as they are (no per-launch wrapping). Kernels are queued on
``stream`` (0 for the default stream, a Numba stream, a CuPy stream or a raw
handle); launchers only compute a launch configuration and queue kernels, they
never wait for the device. The launch shape (``threads``, ``max_blocks``) is a
parameter of every launcher and never changes a result. Scratch buffers
(``work=``) can be passed in; when omitted one is allocated like the input array.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gpubp.backends import numba_compat

numba_compat.check_numba_cuda()  # the floor, with the fix named, before any module here imports numba.cuda

from numba import float32, float64, int64, types  # noqa: E402

from gpubp.backends.numba_cuda import precision as precision_kernels  # noqa: E402
from gpubp.backends.numba_cuda.activations import (  # noqa: F401, E402
    _act_args,
    activation_backward,
    activation_backward_kernel,
    activation_forward,
    activation_forward_kernel,
    bias_activation_forward,
    bias_activation_forward_kernel,
)
from gpubp.backends.numba_cuda.bias_gradient import (  # noqa: F401, E402
    BG_LANES,
    BG_MAX_CHUNKS,
    BG_MIN_ROWS_PER_LANE,
    BG_TILE,
    FINISH_THREADS,
    bias_grad,
    bias_grad_chunks,
    bias_grad_finish_kernel,
    bias_grad_partials_kernel,
    bias_grad_rows_per_chunk,
    bias_grad_work_size,
)
from gpubp.backends.numba_cuda.launch import (  # noqa: F401, E402
    ELEMENTWISE_THREADS,
    MAX_BLOCKS,
    SIMULATOR,
    Launches,
    dm,
    elementwise,
    launch_count,
    launch_stream,
)
from gpubp.backends.numba_cuda.losses import (  # noqa: F401, E402
    CHUNK,
    cross_entropy,
    cross_entropy_labels_kernel,
    cross_entropy_labels_weighted_kernel,
    cross_entropy_probs_kernel,
    cross_entropy_probs_weighted_kernel,
    elementwise_kernel,
    elementwise_loss,
    loss,
    loss_work_size,
)
from gpubp.backends.numba_cuda.reduce import LANES, reduce_partials_kernel  # noqa: F401, E402


def ptx_targets(loss_rules: Iterable[Any] = ()) -> list[tuple[str, Callable, tuple]]:
    """Every kernel's Python function with each argument signature the launchers use, with the
    element-wise loss kernel of each element-wise row of ``loss_rules`` (gpubp.tools.numba_ptx
    passes every registered loss row: the backends import nothing from the rows above them).

    For compile checks: ``numba.cuda.compile_ptx(func, sig, cc=...)`` on each entry.
    """
    elementwise_rules = [rule for rule in loss_rules if rule.family == "elementwise"]
    targets: list[tuple[str, Callable, tuple]] = []

    def add(name: str, kernel: Any, sig: tuple) -> None:
        targets.append((name, kernel.py_func, sig))

    for ft in (float32, float64):
        tag = str(ft)
        v = ft[::1]
        m = ft[:, ::1]
        add(f"activation_forward_kernel[{tag}]", activation_forward_kernel, (int64, types.Tuple((v, v, int64, ft, ft))))
        add(
            f"bias_activation_forward_kernel[{tag}]",
            bias_activation_forward_kernel,
            (int64, types.Tuple((v, v, v, int64, ft, ft, types.boolean))),
        )
        add(
            f"activation_backward_kernel[{tag}]",
            activation_backward_kernel,
            (int64, types.Tuple((v, v, v, int64, ft, ft))),
        )
        add(f"bias_grad_partials_kernel[{tag}]", bias_grad_partials_kernel, (m, int64, float64[:, ::1]))
        add(f"bias_grad_finish_kernel[{tag}]", bias_grad_finish_kernel, (float64[:, ::1], v))
        add(f"cross_entropy_labels_kernel[{tag}]", cross_entropy_labels_kernel, (m, int64[::1], ft, m, float64[::1]))
        add(f"cross_entropy_probs_kernel[{tag}]", cross_entropy_probs_kernel, (m, m, ft, m, float64[::1]))
        w = float64[::1]
        for rule in elementwise_rules:  # the one generic kernel around each element-wise loss row's term
            add(f"{rule.name}_kernel[{tag}]", elementwise_kernel(rule), (v, v, ft, v, float64[::1]))
            add(f"{rule.name}_weighted_kernel[{tag}]", elementwise_kernel(rule, True),
                (v, v, float64, w, int64, v, float64[::1]))
        add(
            f"cross_entropy_labels_weighted_kernel[{tag}]",
            cross_entropy_labels_weighted_kernel,
            (m, int64[::1], float64, w, m, float64[::1]),
        )
        add(
            f"cross_entropy_probs_weighted_kernel[{tag}]",
            cross_entropy_probs_weighted_kernel,
            (m, m, float64, w, m, float64[::1]),
        )
    add("reduce_partials_kernel", reduce_partials_kernel, (float64[::1], int64, float64, float64[::1]))
    targets.extend(precision_kernels.ptx_targets())  # the mixed-precision conversions and epilogues
    return targets
