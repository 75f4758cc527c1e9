"""Run time of the fused kernels: CuPy RawModule loading, argument checks, the launchers.

``cupy.RawModule(code=..., options=..., name_expressions=...)`` per (device, file, version,
activation): a process compiles only the activations it uses, and CuPy's on-disk kernel cache
(``~/.cupy/kernel_cache``) makes a second process pay no compile time. CuPy keys that cache on
the source text and the options, not on included headers, so the source handed to CuPy ends
with a hash of the headers (``table.module_source``). Launchers (:func:`dense_forward`,
:func:`dense_backward`) mirror ``numpy_ref`` and check dtypes, shapes and devices before any
device call (TypeError / ValueError naming the argument); non-contiguous inputs are copied to C
order (RawKernel ignores strides); outputs must be C-contiguous. They queue kernels on CuPy's
current stream and never synchronise; :func:`launch_count` counts what they queue.

Import cost: nothing here imports CuPy at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpubp.activations import Activation
from gpubp.activations import get as get_activation
from gpubp.backends.cuda_fused.plans import (
    Array,
    LaunchFn,
    backward_source,
    forward_mode,
    mask_words,
    queue_backward,
    queue_forward,
    split_plan,
)
from gpubp.backends.cuda_fused.table import (
    DEFAULT_VERSION,
    INT32_MAX,
    MIN_CC_V2,
    SAVED_A,
    SAVED_MASK,
    SAVED_NONE,
    SAVED_Z,
    VERSIONS,
    KernelSpec,
    _module_specs,
    compile_options,
    module_source,
)

# --- run time: modules per device ---------------------------------------------------------------------

_MODULES: dict[tuple, Any] = {}
_KERNELS: dict[tuple, Any] = {}


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("the CUDA C kernels need CuPy (pip install 'gpubp[cuda13]' or 'gpubp[cuda12]')") from e
    return cupy


def _module(file: str, version: int, act_id: int) -> Any:
    """The RawModule of (current device, file, version, activation), built once per process."""
    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    key = (dev, file, version, act_id, compile_options())
    mod = _MODULES.get(key)
    if mod is None:
        cc = int(cp.cuda.Device(dev).compute_capability)
        if version == 2 and cc < MIN_CC_V2:
            raise RuntimeError(
                f"the v2 dense kernels need compute capability {MIN_CC_V2 // 10}.{MIN_CC_V2 % 10} or newer "
                f"(cp.async); GPU {dev} has {cc // 10}.{cc % 10}: use version=1"
            )
        names = [s.name for s in _module_specs(file, version, act_id)]
        mod = cp.RawModule(code=module_source(file), options=compile_options(), name_expressions=names)
        _MODULES[key] = mod
    return mod


def get_kernel(spec: KernelSpec, act_id: int) -> Any:
    """The CuPy RawKernel of ``spec`` on the current device (compiled, or loaded from CuPy's cache).

    ``act_id`` names the module to take it from (activation-free kernels live in every
    activation's v2 backward module).
    """
    key = (_cupy().cuda.runtime.getDevice(), spec, act_id)
    kern = _KERNELS.get(key)
    if kern is None:
        kern = _module(spec.file, spec.version, act_id).get_function(spec.name)
        _KERNELS[key] = kern
    return kern


def clear_modules() -> None:
    """Forget the modules built in this process (CuPy's on-disk cache stays)."""
    _MODULES.clear()
    _KERNELS.clear()


# --- argument checks (no device calls) -----------------------------------------------------------------


def _check_array(name: str, arr: Any, ndim: int, dtype: Any = np.float32) -> tuple[int, ...]:
    """dtype and rank of ``arr``, checked by duck typing: works on NumPy and CuPy arrays alike."""
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        raise TypeError(f"{name}: expected a CuPy array, got {type(arr).__name__}")
    if np.dtype(arr.dtype) != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {np.dtype(arr.dtype).name}")
    if len(arr.shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple(arr.shape)}")
    for d in arr.shape:
        if d > INT32_MAX:
            raise ValueError(f"{name}: dimension {d} exceeds {INT32_MAX}")
    return tuple(int(d) for d in arr.shape)


def _check_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...], what: str) -> None:
    if shape != want:
        raise ValueError(f"{name}: expected shape {want} ({what}), got {shape}")


def _check_version(version: int) -> int:
    if isinstance(version, bool) or version not in VERSIONS:
        raise ValueError(f"version: expected one of {VERSIONS}, got {version!r}")
    return int(version)


def _as_cupy(name: str, arr: Any) -> Any:
    """``arr`` as a CuPy array on the current device (a zero-copy view of another library's device array)."""
    if isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a CuPy array on the GPU, got a NumPy array (use cupy.asarray)")
    cp = _cupy()
    if not isinstance(arr, cp.ndarray):
        if not hasattr(arr, "__cuda_array_interface__"):
            raise TypeError(f"{name}: expected a CuPy array, got {type(arr).__name__}")
        arr = cp.asarray(arr)
    _same_device(name, arr)
    return arr


def _device_input(name: str, arr: Any) -> Any:
    """An input as a C-contiguous CuPy array on the current device (copies only when not C-contiguous)."""
    arr = _as_cupy(name, arr)
    return arr if arr.flags.c_contiguous else _cupy().ascontiguousarray(arr)


def _device_output(name: str, arr: Any) -> Any:
    """An output must be a C-contiguous CuPy array on the current device: it is written in place."""
    arr = _as_cupy(name, arr)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (it is written in place)")
    return arr


def _same_device(name: str, arr: Any) -> None:
    cp = _cupy()
    dev = cp.cuda.Device().id
    if arr.device.id != dev:
        raise ValueError(f"{name}: lives on GPU {arr.device.id}, but the current device is GPU {dev}")


# --- launchers -------------------------------------------------------------------------------------------

_launches = 0  # CUDA C kernels queued on a GPU by this process (see launch_count)


def launch_count() -> int:
    """Fused CUDA C kernels queued on a GPU so far by this process (dense_forward / dense_backward;
    the host emulation's calls are not counted). ``CudaBackend.launch_count`` adds it in."""
    return _launches


def _cupy_launcher(act: Activation) -> LaunchFn:
    def launch(spec: KernelSpec, grid: tuple, block: tuple, args: tuple) -> None:
        global _launches
        get_kernel(spec, act.id)(grid, block, args)
        _launches += 1

    return launch


def check_forward_args(x: Array, w: Array, b: Array, act: Any, version: int = DEFAULT_VERSION) -> tuple:
    """Validate :func:`dense_forward`'s arguments without touching a device: (act, N, in, out)."""
    act = get_activation(act)
    _check_version(version)
    n, n_in = _check_array("x", x, 2)
    w_shape = _check_array("w", w, 2)
    (n_out,) = _check_array("b", b, 1)
    _check_shape("w", w_shape, (n_in, w_shape[1]), "(in, out) with in = x.shape[1]")
    _check_shape("b", (n_out,), (w_shape[1],), "(out,) with out = w.shape[1]")
    if n_in == 0 or n_out == 0:
        raise ValueError(f"w: in and out must be >= 1, got shape {w_shape}")
    return act, n, n_in, n_out


def _out_array(name: str, arr: Any, shape: tuple[int, ...], dtype: Any, alloc: Callable[[], Array]) -> Array:
    """A caller's output array, checked (dtype, shape, C order, device), or a new one."""
    if arr is None:
        return alloc()
    _check_shape(name, _check_array(name, arr, len(shape), dtype), shape, "the result's shape")
    return _device_output(name, arr)


def dense_forward(
    x: Array,
    w: Array,
    b: Array,
    act: Any = None,
    training: bool = False,
    *,
    mask: bool = True,
    version: int = DEFAULT_VERSION,
    out: Array | None = None,
    out_z: Array | None = None,
    out_mask: Array | None = None,
) -> tuple[Array, tuple]:
    """a = f(x @ W + b) on the GPU, float32; the CUDA twin of ``numpy_ref.dense_forward``.

    x (N, in), w (in, out), b (out,) -> a (N, out). Returns ``(a, saved)``: ``saved`` is ``()``
    when not training, else ``(x, kept)`` with kept = z (float32 (N, out)), the relu /
    leaky_relu mask (uint32 (N, ceil(out / 32)), when ``mask``), a (sigmoid, tanh), or None
    (identity). Inference writes a alone. ``out`` / ``out_z`` / ``out_mask``: arrays to write
    a / z / the mask into instead of new ones (z and the mask only where this call saves them).
    """
    act, n, n_in, n_out = check_forward_args(x, w, b, act, version)
    mode = forward_mode(act, training, mask)
    if out_z is not None and mode != SAVED_Z:
        raise ValueError(f"out_z: this call saves no z (activation {act.name}, training={training}, mask={mask})")
    if out_mask is not None and mode != SAVED_MASK:
        raise ValueError(f"out_mask: this call saves no mask (activation {act.name}, training={training}, mask={mask})")
    x, w, b = _device_input("x", x), _device_input("w", w), _device_input("b", b)
    cp = _cupy()
    a = _out_array("out", out, (n, n_out), np.float32, lambda: cp.empty((n, n_out), dtype=cp.float32))
    z = m = None
    if mode == SAVED_Z:
        z = _out_array("out_z", out_z, (n, n_out), np.float32, lambda: cp.empty((n, n_out), dtype=cp.float32))
    if mode == SAVED_MASK:
        shape = (n, mask_words(n_out))
        m = _out_array("out_mask", out_mask, shape, np.uint32, lambda: cp.empty(shape, dtype=cp.uint32))
    queue_forward(x, w, b, a, z, m, act, mode, version, _cupy_launcher(act))
    if not training:
        return a, ()
    kept = {SAVED_Z: z, SAVED_MASK: m}.get(mode)
    if kept is None and act.saves == "a":
        kept = a
    return a, (x, kept)


def check_backward_args(
    da: Array,
    saved: tuple,
    w: Array,
    act: Any,
    dw: Array,
    db: Array,
    version: int = DEFAULT_VERSION,
    split_k: int | None = None,
) -> tuple:
    """Validate :func:`dense_backward`'s arguments without touching a device: (act, src, N, in, out)."""
    act = get_activation(act)
    _check_version(version)
    if not isinstance(saved, tuple) or len(saved) != 2:
        raise ValueError("saved: expected (x, kept) as returned by dense_forward(..., training=True)")
    x, kept = saved
    n, n_out = _check_array("da", da, 2)
    n_in, w_out = _check_array("w", w, 2)
    _check_shape("w", (n_in, w_out), (n_in, n_out), "(in, out) with out = da.shape[1]")
    _check_shape("saved x", _check_array("saved x", x, 2), (n, n_in), "(N, in)")
    src = backward_source(act, kept)
    if src == SAVED_MASK:
        _check_shape(
            "saved mask", _check_array("saved mask", kept, 2, np.uint32), (n, mask_words(n_out)), "(N, ceil(out/32))"
        )
        if n * mask_words(n_out) > INT32_MAX:  # the backward kernels index mask words with 32-bit ints
            raise ValueError(
                f"saved mask: {n * mask_words(n_out)} words exceed {INT32_MAX}; save z instead (mask=False)"
            )
    elif src in (SAVED_Z, SAVED_A):
        if kept is None:
            raise ValueError(f"saved: activation {act.name} needs {act.saves} from the forward pass, got None")
        _check_shape(f"saved {act.saves}", _check_array(f"saved {act.saves}", kept, 2), (n, n_out), "(N, out)")
    _check_shape("dw", _check_array("dw", dw, 2), (n_in, n_out), "(in, out)")
    _check_shape("db", _check_array("db", db, 1), (n_out,), "(out,)")
    if n_in == 0 or n_out == 0:
        raise ValueError(f"w: in and out must be >= 1, got shape {(n_in, n_out)}")
    if version == 1 and split_k not in (None, 1):
        raise ValueError(f"split_k: version 1 does not split dW, got {split_k!r}")
    split_plan(n, n_in, n_out, split_k)  # validates split_k
    return act, src, n, n_in, n_out


def dense_backward(
    da: Array,
    saved: tuple,
    w: Array,
    act: Any,
    dw: Array,
    db: Array,
    need_dx: bool,
    *,
    version: int = DEFAULT_VERSION,
    split_k: int | None = None,
    out_dx: Array | None = None,
) -> Array | None:
    """Backward of :func:`dense_forward` on the GPU; the CUDA twin of ``numpy_ref.dense_backward``.

        dz = da * f'(.)      formed inside the GEMM loads, never stored
        dW = x^T @ dz        written into ``dw`` (=), (in, out)
        db = sum_rows dz     written into ``db``, (out,)
        dx = dz @ W^T        returned when ``need_dx`` (False for a first layer), else None;
                             written into ``out_dx`` when given

    Deterministic: no atomics; ``split_k`` (v2) fixes the batch split of dW, by default a
    function of the shape (:func:`split_plan`).
    """
    act, src, n, n_in, n_out = check_backward_args(da, saved, w, act, dw, db, version, split_k)
    if out_dx is not None and not need_dx:
        raise ValueError("out_dx: given, but need_dx is False")
    x, kept = saved
    da, w, x = _device_input("da", da), _device_input("w", w), _device_input("saved x", x)
    cp = _cupy()
    kept = _device_input("saved", kept) if src != SAVED_NONE else None
    dw, db = _device_output("dw", dw), _device_output("db", db)
    dx = None
    if need_dx:
        dx = _out_array("out_dx", out_dx, (n, n_in), np.float32, lambda: cp.empty((n, n_in), dtype=cp.float32))
    if n == 0:
        dw.fill(0)
        db.fill(0)
        return dx
    queue_backward(
        x,
        da,
        kept,
        w,
        dw,
        db,
        dx,
        act,
        src,
        version,
        split_k,
        _cupy_launcher(act),
        lambda size: cp.empty(size, dtype=cp.float32),
    )
    return dx
