"""The fused dense-layer CUDA C kernels of ``kernels/``: the list of kernels, the loader, the launchers.

The kernels (``dense_forward.cu``, ``dense_backward.cu``, their headers) are C++ templates
over the activation id, the saved kind and the vector path. The package keeps what is fixed
apart from what touches the device:

    table    the constants shared with the C headers (one table, compared with them by a test),
             every instantiation once (:func:`kernel_specs`), the sources and compile options;
             used by the run-time loader and the offline compile check alike
    plans    which kernels, grids and arguments a forward or backward call queues
             (:func:`queue_forward`, :func:`queue_backward`, the split-K :func:`split_plan`),
             for any launch function: CuPy's on a GPU, the host emulation in the tests
    launch   run time (needs CuPy and a GPU): RawModules per device, argument checks,
             :func:`dense_forward` / :func:`dense_backward`, :func:`launch_count`
    plans_tc, launch_tc   the same for the tensor-core kernels (kernels/*_tc.cu), keyed by
             precision (tf32, bf16-mixed, fp16-mixed): :func:`queue_forward_tc`,
             :func:`queue_backward_tc`, :func:`dense_forward_tc`, :func:`dense_backward_tc`

Every name is re-exported here: ``from gpubp.backends import cuda_fused`` is the way in.

Tooling lives apart, in ``gpubp.tools``: the NVRTC offline check and ptxas report
(``nvrtc_check``), the CPU emulation of the kernels for tests (``host_emulation``), the float64
references and error bounds (``oracles``; the bounds themselves are ``gpubp.accuracy``'s).

Import cost: nothing here imports CuPy at module level.
"""

from __future__ import annotations

from gpubp.backends.cuda_fused.launch import (  # noqa: F401  (the package's names)
    _cupy_launcher,
    check_backward_args,
    check_forward_args,
    clear_modules,
    dense_backward,
    dense_forward,
    get_kernel,
    launch_count,
)
from gpubp.backends.cuda_fused.launch_tc import (  # noqa: F401
    check_backward_tc_args,
    check_forward_tc_args,
    dense_backward_tc,
    dense_forward_tc,
)
from gpubp.backends.cuda_fused.plans import (  # noqa: F401
    Array,
    LaunchFn,
    backward_source,
    forward_mode,
    mask_words,
    queue_backward,
    queue_forward,
    split_plan,
)
from gpubp.backends.cuda_fused.plans_tc import (  # noqa: F401
    precision_id,
    queue_backward_tc,
    queue_forward_tc,
    split_plan_tc,
    storage_ok,
)
from gpubp.backends.cuda_fused.table import (  # noqa: F401
    ALL_SOURCES,
    BACKWARD_FILE,
    BACKWARD_TC_FILE,
    COMPILE_OPTIONS,
    DEFAULT_VERSION,
    FORWARD_FILE,
    FORWARD_TC_FILE,
    HEADERS,
    INT32_MAX,
    MASK_ACTIVATIONS,
    MAX_GRID_YZ,
    MIN_CC_TC,
    MIN_CC_V2,
    PRECISION_NAMES,
    PRECISIONS,
    REDUCE_THREADS,
    SAVED_A,
    SAVED_MASK,
    SAVED_NAMES,
    SAVED_NONE,
    SAVED_Z,
    SOURCES,
    SPLIT_MAX,
    SPLIT_MIN_ROWS,
    SPLIT_TARGET_BLOCKS,
    TC_BK,
    TC_BLOCK,
    TC_SOURCES,
    TC_TILE,
    TC_VERSION,
    V1_BLOCK,
    V1_TILE,
    V2_BK,
    V2_BLOCK,
    V2_TILE,
    VERSIONS,
    KernelSpec,
    backward_sources,
    compile_options,
    forward_modes,
    headers_digest,
    kernel_specs,
    module_source,
)
