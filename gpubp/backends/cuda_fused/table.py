"""The table shared with kernels/: constants, the list of kernel instantiations, sources, options.

The ids and constants here are the C headers' own (saved kinds: activations.cuh SavedKind; tile
geometry: gemm_tile.cuh, dense_forward.cu; activation ids: ``gpubp.activations.TABLE``);
``tests/test_cuda_fused_offline.py`` reads the headers and checks every value against these.
:func:`kernel_specs` lists every instantiation once, for the run-time loader (``.launch``) and
the offline compile check (``gpubp.tools.nvrtc_check``) alike. No CuPy, no device.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from gpubp._resources import kernel_dir
from gpubp.activations import TABLE

FORWARD_FILE = "dense_forward.cu"
BACKWARD_FILE = "dense_backward.cu"
HEADERS = ("activations.cuh", "gemm_tile.cuh", "mma.cuh", "tc_tile.cuh")
SOURCES = (FORWARD_FILE, BACKWARD_FILE)
# The tensor-core kernels (TF32, BF16 / FP16 mixed precision): their own files and numbering (tc1).
FORWARD_TC_FILE = "dense_forward_tc.cu"
BACKWARD_TC_FILE = "dense_backward_tc.cu"
TC_SOURCES = (FORWARD_TC_FILE, BACKWARD_TC_FILE)
ALL_SOURCES = SOURCES + TC_SOURCES

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

# Tensor-core kernels (mma.cuh: Precision; tc_tile.cuh / mma.cuh: tc::BM, BN, BK, THREADS).
PRECISIONS = {"tf32": 0, "bf16": 1, "fp16": 2}
PRECISION_NAMES = {v: k for k, v in PRECISIONS.items()}
TC_VERSION = 1
TC_TILE, TC_BK, TC_BLOCK = 64, 32, (128, 1, 1)
MIN_CC_TC = 80  # mma.sync .bf16 / .tf32, cvt.rn.bf16.f32, cvt.rna.tf32.f32

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
    prec: int | None = None  # tensor-core kernels: PRECISIONS value (first template argument)

    @property
    def name(self) -> str:
        args = [] if self.act is None else [str(self.act), str(self.mode)]
        if self.prec is not None:
            args.insert(0, str(self.prec))
        if self.vec is not None:
            args.append("true" if self.vec else "false")
        return f"gpubp::{self.kernel}<{', '.join(args)}>" if args else f"gpubp::{self.kernel}"

    @property
    def label(self) -> str:
        """A short human-readable label, e.g. ``dense_forward_v2 relu save=mask vec``."""
        if self.act is None:
            return self.kernel
        act_name = next(n for n, s in TABLE.items() if s.id == self.act)
        role = "save" if self.file in (FORWARD_FILE, FORWARD_TC_FILE) else "from"
        vec = "" if self.vec is None else (" vec" if self.vec else " scalar")
        prec = "" if self.prec is None else f" {PRECISION_NAMES[self.prec]}"
        return f"{self.kernel}{prec} {act_name} {role}={SAVED_NAMES[self.mode]}{vec}"


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
    for prec in PRECISIONS.values():
        for act, spec in TABLE.items():
            for mode in forward_modes(act):
                specs.append(KernelSpec(FORWARD_TC_FILE, "dense_forward_tc1", TC_VERSION, spec.id, mode, None, True, prec))
            for src in backward_sources(act):
                for kernel in ("dense_dx_tc1", "dense_dw_tc1"):
                    specs.append(KernelSpec(BACKWARD_TC_FILE, kernel, TC_VERSION, spec.id, src, None, True, prec))
    specs.append(KernelSpec(BACKWARD_TC_FILE, "splitk_reduce_tc", TC_VERSION, None, None, None, True))
    return tuple(specs)


@functools.lru_cache(maxsize=1)
def _spec_index() -> dict[tuple, KernelSpec]:
    return {(s.kernel, s.act, s.mode, s.vec, s.prec): s for s in kernel_specs()}


def _module_specs(file: str, version: int, act_id: int, prec: int | None = None) -> list[KernelSpec]:
    """The instantiations of one run-time module: one file, one version, one activation (one precision).

    The activation-free kernels (split-K reduction) go into every module of their file.
    """
    return [
        s
        for s in kernel_specs()
        if s.file == file
        and s.version == version
        and ((s.act == act_id and s.prec == prec) or (s.act is None and (version == 2 or file in TC_SOURCES)))
    ]


def _find_spec(
    kernel: str, act_id: int | None, mode: int | None, vec: bool | None, prec: int | None = None
) -> KernelSpec:
    spec = _spec_index().get((kernel, act_id, mode, vec, prec))
    if spec is not None:
        return spec
    raise ValueError(f"no kernel {kernel} for activation id {act_id}, saved kind {mode}, vec {vec}, precision {prec}")


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
