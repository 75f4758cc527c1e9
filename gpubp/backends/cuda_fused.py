"""The fused dense-layer CUDA C kernels of ``kernels/``: the list of kernels, the loader, the launchers.

The kernels (``dense_forward.cu``, ``dense_backward.cu``, their headers) are C++ templates
over the activation id, the saved kind and the vector path; this module lists every
instantiation once (:func:`kernel_specs`), which both the run-time loader and the offline
compile check (``gpubp.tools.nvrtc_check``) use.

Run time (needs CuPy and a GPU). ``cupy.RawModule(code=..., options=..., name_expressions=...)``
per (device, file, version, activation): a process compiles only the activations it uses,
and CuPy's on-disk kernel cache (``~/.cupy/kernel_cache``) makes a second process pay no
compile time. CuPy keys that cache on the source text and the options, not on included
headers, so the source handed to CuPy ends with a hash of the headers. Launchers
(:func:`dense_forward`, :func:`dense_backward`) mirror ``numpy_ref`` and check dtypes,
shapes and devices before any device call (TypeError / ValueError naming the argument);
non-contiguous inputs are copied to C order (RawKernel ignores strides); outputs must be
C-contiguous. They queue kernels on CuPy's current stream and never synchronise.

Tooling lives apart, in ``gpubp.tools``: the NVRTC offline check and ptxas report
(``nvrtc_check``), the CPU emulation of the kernels for tests (``host_emulation``), the float64
references and error bounds (``oracles``; the bounds themselves are ``gpubp.accuracy``'s).

Import cost: nothing here imports CuPy at module level.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubp._resources import kernel_dir
from gpubp.activations import TABLE, Activation
from gpubp.activations import get as get_activation

Array = Any

FORWARD_FILE = "dense_forward.cu"
BACKWARD_FILE = "dense_backward.cu"
HEADERS = ("activations.cuh", "gemm_tile.cuh")
SOURCES = (FORWARD_FILE, BACKWARD_FILE)

# Constants shared with the C headers, one table: saved kinds (activations.cuh: SavedKind), tile
# geometry (gemm_tile.cuh, dense_forward.cu); activation ids come from gpubp.activations.TABLE.
# tests/test_cuda_fused_offline.py reads the headers and checks every value against these.
# Saved kinds.
SAVED_NONE, SAVED_Z, SAVED_A, SAVED_MASK = 0, 1, 2, 3
SAVED_NAMES = {SAVED_NONE: "none", SAVED_Z: "z", SAVED_A: "a", SAVED_MASK: "mask"}
MASK_ACTIVATIONS = ("relu", "leaky_relu")  # f' depends on z > 0 alone: a bit per element is enough

VERSIONS = (1, 2)
DEFAULT_VERSION = 2

# Tile geometry (must match the kernels).
V1_TILE, V1_BLOCK = 32, (32, 8, 1)
V2_TILE, V2_BK, V2_BLOCK = 128, 8, (256, 1, 1)
REDUCE_THREADS = 256
MAX_GRID_YZ = 65535
INT32_MAX = 2**31 - 1

# Split-K for the v2 dW kernel. S depends on the shape alone (never on the device), so the same
# shape gives the same summation order, hence the same bits, on any GPU.
SPLIT_TARGET_BLOCKS = 264  # about 2 blocks per SM of a 132-SM H100
SPLIT_MIN_ROWS = 256  # no chunk of the batch shorter than this
SPLIT_MAX = 64

COMPILE_OPTIONS = ("-std=c++17",)  # plus -I<kernel_dir>; CuPy adds -arch and its implied options
MIN_CC_V2 = 80  # v2 copies with cp.async (Ampere and later)


# --- the list of kernels --------------------------------------------------------------------------


def forward_modes(act: str) -> tuple[int, ...]:
    """Saved kinds a forward kernel of activation ``act`` is instantiated for."""
    saves = TABLE[act].saves
    if saves != "z":
        return (SAVED_NONE,)  # identity; sigmoid / tanh save a, which is written anyway
    return (SAVED_NONE, SAVED_Z, SAVED_MASK) if act in MASK_ACTIVATIONS else (SAVED_NONE, SAVED_Z)


def backward_sources(act: str) -> tuple[int, ...]:
    """Saved kinds a backward kernel of activation ``act`` can read."""
    saves = TABLE[act].saves
    if saves == "":
        return (SAVED_NONE,)
    if saves == "a":
        return (SAVED_A,)
    return (SAVED_Z, SAVED_MASK) if act in MASK_ACTIVATIONS else (SAVED_Z,)


@dataclass(frozen=True)
class KernelSpec:
    """One instantiation: ``name`` is the C++ name expression given to NVRTC / CuPy."""

    file: str
    kernel: str  # template name, e.g. "dense_forward_v2"
    version: int
    act: int | None  # activation id; None for activation-free kernels
    mode: int | None  # saved kind: what forward writes / what backward reads
    vec: bool | None  # 16-byte path (v2 only)
    hot: bool  # on the training / inference path by default: no spill, no stack allowed

    @property
    def name(self) -> str:
        args = [] if self.act is None else [str(self.act), str(self.mode)]
        if self.vec is not None:
            args.append("true" if self.vec else "false")
        return f"gpubp::{self.kernel}<{', '.join(args)}>" if args else f"gpubp::{self.kernel}"

    @property
    def label(self) -> str:
        """A short human-readable label, e.g. ``dense_forward_v2 relu save=mask vec``."""
        if self.act is None:
            return self.kernel
        act_name = next(n for n, s in TABLE.items() if s.id == self.act)
        role = "save" if self.file == FORWARD_FILE else "from"
        vec = "" if self.vec is None else (" vec" if self.vec else " scalar")
        return f"{self.kernel} {act_name} {role}={SAVED_NAMES[self.mode]}{vec}"


@functools.lru_cache(maxsize=1)
def kernel_specs() -> tuple[KernelSpec, ...]:
    """Every kernel instantiation of kernels/*.cu, in a fixed order."""
    specs: list[KernelSpec] = []
    for act, spec in TABLE.items():
        for mode in forward_modes(act):
            specs.append(KernelSpec(FORWARD_FILE, "dense_forward_v1", 1, spec.id, mode, None, False))
            for vec in (True, False):
                specs.append(KernelSpec(FORWARD_FILE, "dense_forward_v2", 2, spec.id, mode, vec, True))
        for src in backward_sources(act):
            for kernel in ("dense_dx", "dense_dw"):
                specs.append(KernelSpec(BACKWARD_FILE, f"{kernel}_v1", 1, spec.id, src, None, False))
                for vec in (True, False):
                    specs.append(KernelSpec(BACKWARD_FILE, f"{kernel}_v2", 2, spec.id, src, vec, True))
    specs.append(KernelSpec(BACKWARD_FILE, "splitk_reduce", 2, None, None, None, True))
    return tuple(specs)


@functools.lru_cache(maxsize=1)
def _spec_index() -> dict[tuple, KernelSpec]:
    return {(s.kernel, s.act, s.mode, s.vec): s for s in kernel_specs()}


def _module_specs(file: str, version: int, act_id: int) -> list[KernelSpec]:
    """The instantiations of one run-time module: one file, one version, one activation."""
    return [
        s
        for s in kernel_specs()
        if s.file == file and s.version == version and (s.act == act_id or (s.act is None and version == 2))
    ]


def _find_spec(kernel: str, act_id: int | None, mode: int | None, vec: bool | None) -> KernelSpec:
    spec = _spec_index().get((kernel, act_id, mode, vec))
    if spec is not None:
        return spec
    raise ValueError(f"no kernel {kernel} for activation id {act_id}, saved kind {mode}, vec {vec}")


# --- sources and options ----------------------------------------------------------------------------


def headers_digest() -> str:
    """sha256 over the headers the .cu files include (CuPy's cache key does not see them)."""
    h = hashlib.sha256()
    for name in HEADERS:
        h.update(name.encode())
        h.update((kernel_dir() / name).read_bytes())
    return h.hexdigest()


def module_source(file: str) -> str:
    """The text of kernels/<file>, ending with the headers' digest (part of CuPy's cache key)."""
    text = (kernel_dir() / file).read_text()
    return f"{text}\n// gpubp headers sha256 {headers_digest()}\n"


def compile_options() -> tuple[str, ...]:
    """Options for CuPy's RawModule (CuPy adds the architecture and CUPY_IMPLIED_OPTIONS)."""
    return (*COMPILE_OPTIONS, f"-I{kernel_dir()}")


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


def _act_params(act: Activation) -> tuple[np.float32, np.float32]:
    """(p0, p1) of kernels/activations.cuh for ``act``."""
    p = act.params
    if act.name == "leaky_relu":
        return np.float32(p["slope"]), np.float32(0.0)
    if act.name == "elu":
        return np.float32(p["alpha"]), np.float32(0.0)
    if act.name == "softplus":
        return np.float32(p["beta"]), np.float32(p["threshold"])
    return np.float32(0.0), np.float32(0.0)


def mask_words(n_out: int) -> int:
    """uint32 words per row of the relu / leaky_relu mask."""
    return (n_out + 31) // 32


def split_plan(n_batch: int, n_in: int, n_out: int, split_k: int | None = None) -> tuple[int, int]:
    """(S, chunk) for the v2 dW kernel: the batch is cut into S chunks of ``chunk`` rows (last shorter).

    A function of the shape (and of ``split_k`` when given) alone, so the summation order is fixed.
    """
    if n_batch <= 0:
        return 1, V2_BK
    if split_k is None:
        tiles = math.ceil(n_in / V2_TILE) * math.ceil(n_out / V2_TILE)
        s = 1
        if tiles < SPLIT_TARGET_BLOCKS:
            s = min(math.ceil(SPLIT_TARGET_BLOCKS / tiles), max(1, n_batch // SPLIT_MIN_ROWS), SPLIT_MAX)
    else:
        if isinstance(split_k, bool) or not isinstance(split_k, (int, np.integer)) or not 1 <= split_k <= MAX_GRID_YZ:
            raise ValueError(f"split_k: expected an integer in [1, {MAX_GRID_YZ}] or None, got {split_k!r}")
        s = int(split_k)
    chunk = math.ceil(math.ceil(n_batch / s) / V2_BK) * V2_BK
    return math.ceil(n_batch / chunk), chunk


def _grid_check(name: str, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    if grid[0] > INT32_MAX or grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"{name}: shape too large for one launch (grid {grid})")
    return grid


def _address(arr: Any) -> int:
    """Data pointer of a CuPy array (``.data.ptr``) or of a NumPy array (host emulation in tests)."""
    try:
        return int(arr.data.ptr)
    except AttributeError:
        return int(arr.__array_interface__["data"][0])


def _aligned(*arrays: Any) -> bool:
    return all(a is None or _address(a) % 16 == 0 for a in arrays)


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
# queue_forward / queue_backward choose the kernels, grids and arguments for arrays that are
# already checked, C-contiguous and allocated; ``launch(spec, grid, block, args)`` runs one
# kernel. dense_forward / dense_backward wrap them for CuPy; the tests drive the same functions
# with NumPy arrays and a CPU emulation of the kernels (kernels/host_emulation.h).

LaunchFn = Callable[[KernelSpec, tuple, tuple, tuple], None]


def forward_mode(act: Activation, training: bool, mask: bool = True) -> int:
    """What the forward kernel writes besides a."""
    if not training or act.saves != "z":
        return SAVED_NONE
    return SAVED_MASK if (mask and act.name in MASK_ACTIVATIONS) else SAVED_Z


def queue_forward(
    x: Array,
    w: Array,
    b: Array,
    a: Array,
    z: Array | None,
    m: Array | None,
    act: Activation,
    mode: int,
    version: int,
    launch: LaunchFn,
) -> None:
    """Queue a = f(x @ W + b) (and z or the mask m as ``mode`` says); x (N, in), w (in, out), b (out,)."""
    n, n_in = x.shape
    n_out = w.shape[1]
    if n == 0:
        return
    p0, p1 = _act_params(act)
    ints = (np.int32(n), np.int32(n_in), np.int32(n_out))
    args = (x, w, b, a, a if z is None else z, a if m is None else m, *ints, p0, p1)  # unused pointers: a
    if version == 1:
        grid = _grid_check("x/w", (math.ceil(n / V1_TILE), math.ceil(n_out / V1_TILE), 1))
        launch(_find_spec("dense_forward_v1", act.id, mode, None), grid, V1_BLOCK, args)
    else:
        vec = n_in % 4 == 0 and n_out % 4 == 0 and _aligned(x, w, b, a, z)
        grid = _grid_check("x/w", (math.ceil(n / V2_TILE), math.ceil(n_out / V2_TILE), 1))
        launch(_find_spec("dense_forward_v2", act.id, mode, vec), grid, V2_BLOCK, args)


def queue_backward(
    x: Array,
    da: Array,
    kept: Array | None,
    w: Array,
    dw: Array,
    db: Array,
    dx: Array | None,
    act: Activation,
    src: int,
    version: int,
    split_k: int | None,
    launch: LaunchFn,
    empty: Callable[[int], Array],
) -> None:
    """Queue dW, db (and dx when given) for checked arrays; ``empty(n)`` allocates n float32 (split-K)."""
    n, n_in = x.shape
    n_out = da.shape[1]
    p0, p1 = _act_params(act)
    sv = kept if src in (SAVED_Z, SAVED_A) else da  # z / a pointer (da when unused)
    mk = kept if src == SAVED_MASK else da  # mask pointer (da when unused)
    ints = (np.int32(n), np.int32(n_in), np.int32(n_out))
    if version == 1:
        grid = _grid_check("w", (math.ceil(n_in / V1_TILE), math.ceil(n_out / V1_TILE), 1))
        launch(_find_spec("dense_dw_v1", act.id, src, None), grid, V1_BLOCK, (x, da, sv, mk, dw, db, *ints, p0, p1))
        if dx is not None:
            grid = _grid_check("x", (math.ceil(n / V1_TILE), math.ceil(n_in / V1_TILE), 1))
            launch(_find_spec("dense_dx_v1", act.id, src, None), grid, V1_BLOCK, (da, sv, mk, w, dx, *ints, p0, p1))
        return
    s, chunk = split_plan(n, n_in, n_out, split_k)
    floats_kept = kept if src in (SAVED_Z, SAVED_A) else None
    vec = n_in % 4 == 0 and n_out % 4 == 0 and _aligned(x, da, floats_kept, w, dw, dx)
    # one extra column of blocks computes db (kernels/dense_backward.cu)
    grid = _grid_check("w", (math.ceil(n_in / V2_TILE) + 1, math.ceil(n_out / V2_TILE), s))
    dw_spec = _find_spec("dense_dw_v2", act.id, src, vec)
    if s == 1:
        launch(dw_spec, grid, V2_BLOCK, (x, da, sv, mk, dw, db, np.int64(0), np.int32(chunk), *ints, p0, p1))
    else:
        len_w = n_in * n_out
        stride = len_w + n_out  # workspace slice: partial dW, then partial db
        ws = empty(s * stride)
        launch(
            dw_spec, grid, V2_BLOCK, (x, da, sv, mk, ws, ws[len_w:], np.int64(stride), np.int32(chunk), *ints, p0, p1)
        )
        blocks = min(math.ceil(stride / REDUCE_THREADS), 65535)
        launch(
            _find_spec("splitk_reduce", None, None, None),
            (blocks, 1, 1),
            (REDUCE_THREADS, 1, 1),
            (ws, np.int32(s), np.int64(stride), np.int64(len_w), dw, db),
        )
    if dx is not None:
        grid = _grid_check("x", (math.ceil(n / V2_TILE), math.ceil(n_in / V2_TILE), 1))
        launch(_find_spec("dense_dx_v2", act.id, src, vec), grid, V2_BLOCK, (da, sv, mk, w, dx, *ints, p0, p1))


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


def backward_source(act: Activation, kept: Any) -> int:
    """Which saved kind ``kept`` is for ``act`` (a uint32 array is the relu / leaky_relu mask)."""
    if act.saves == "":
        return SAVED_NONE
    if act.saves == "a":
        return SAVED_A
    if kept is not None and hasattr(kept, "dtype") and np.dtype(kept.dtype) == np.uint32:
        if act.name not in MASK_ACTIVATIONS:
            raise TypeError(f"saved: a uint32 mask is only valid for relu / leaky_relu, not {act.name}")
        return SAVED_MASK
    return SAVED_Z


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
            raise ValueError(f"saved mask: {n * mask_words(n_out)} words exceed {INT32_MAX}; save z instead (mask=False)")
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
