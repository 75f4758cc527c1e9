"""Offline compile check of the CUDA C kernels: NVRTC, no GPU, no driver, no CuPy.

:func:`offline_check` compiles every instantiation of ``cuda_fused.kernel_specs()`` with NVRTC
for each architecture, with the options CuPy uses at run time plus ``-Xptxas -v``, and parses
ptxas' report: registers, shared memory, stack frame and spills per kernel. A hot kernel (on
the default path) must have neither spills nor a stack frame.

Which NVRTC. Users' NVRTC versions vary (PyTorch cu130 pins 13.0, the newest wheel is 13.5) and
ptxas' register allocation changes between them, so the check can run under any NVRTC library,
loaded by path through ctypes:

    --nvrtc PATH, or GPUBP_NVRTC=PATH    a libnvrtc.so.* (nvrtc64_*.dll) file, or a folder holding
                                         one, e.g. a ``pip install --target DIR nvidia-cuda-nvrtc==X``
    neither                              the library cuda-pathfinder finds (as cuda-bindings and
                                         CuPy do): the nvidia-cuda-nvrtc wheel, conda, the system

Where none can be loaded, :class:`NvrtcNotFoundError` says once what is missing and how to
install it. Importing this module loads nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gpubp.backends.cuda_fused import ALL_SOURCES, KernelSpec, compile_options, kernel_specs, module_source

__all__ = [
    "ENV_VAR",
    "INSTALL_HINT",
    "SUPPORTED",
    "DEFAULT_ARCHS",
    "CUPY_IMPLIED_OPTIONS",
    "NvrtcNotFoundError",
    "Nvrtc",
    "load",
    "nvrtc_version",
    "describe",
    "cupy_nvrtc",
    "CompileResult",
    "nvrtc_compile",
    "parse_ptxas",
    "KernelReport",
    "offline_check",
    "problems",
]

ENV_VAR = "GPUBP_NVRTC"
#: The NVRTC versions the kernels are checked under (pyproject.toml, extra cuda13: nvidia-cuda-nvrtc).
SUPPORTED = ((13, 0), (14, 0))  # [13.0, 14)
INSTALL_HINT = (
    "install it with pip install 'gpubp[cuda13]' (it brings the nvidia-cuda-nvrtc wheel), "
    f"or point --nvrtc or {ENV_VAR} at a libnvrtc.so.* (or a folder holding one)"
)
DEFAULT_ARCHS = ("sm_80", "sm_90")
# What CuPy's NVRTC path appends (cupy/cuda/compiler.py), repeated offline so the code is the same.
CUPY_IMPLIED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
_ARCH = re.compile(r"sm_\d+[a-z]?")


class NvrtcNotFoundError(RuntimeError):
    """No NVRTC library could be loaded: the message names what was looked for and the fix."""


# --- the library ----------------------------------------------------------------------------------


def _library_in(folder: Path) -> Path | None:
    """The NVRTC library inside ``folder`` (searched recursively), newest soname first."""
    pattern = "nvrtc64_*.dll" if sys.platform == "win32" else "libnvrtc.so*"
    hits = [
        p
        for p in folder.rglob(pattern)
        if p.is_file() and "builtins" not in p.name and ".alt." not in p.name and "_alt" not in p.name
    ]
    hits.sort(key=lambda p: (len(p.name), p.name), reverse=True)  # libnvrtc.so.13 before libnvrtc.so
    return hits[0] if hits else None


def locate(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(absolute path of the NVRTC library, how it was chosen); :class:`NvrtcNotFoundError` if none.

    ``path`` (else $GPUBP_NVRTC) names a library file or a folder holding one; without either,
    cuda-pathfinder's search decides.
    """
    how = "--nvrtc"
    if path is None and os.environ.get(ENV_VAR):
        path, how = os.environ[ENV_VAR], f"${ENV_VAR}"
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            lib = _library_in(p)
            if lib is None:
                raise NvrtcNotFoundError(f"NVRTC was not found: no libnvrtc.so* under {p} ({how}); {INSTALL_HINT}")
            return str(lib.resolve()), f"{how} {p}"
        if not p.is_file():
            raise NvrtcNotFoundError(f"NVRTC was not found: {p} does not exist ({how}); {INSTALL_HINT}")
        return str(p.resolve()), how
    try:
        from cuda import pathfinder
    except ImportError:
        raise NvrtcNotFoundError(
            f"NVRTC was not found: cuda-pathfinder, which finds it, is not installed; {INSTALL_HINT}"
        ) from None
    try:
        lib = pathfinder.load_nvidia_dynamic_lib("nvrtc")
    except Exception as e:  # DynamicLibNotFoundError, or whatever a broken install raises
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NvrtcNotFoundError(f"NVRTC was not found ({reason}); {INSTALL_HINT}") from None
    return str(lib.abs_path), f"cuda-pathfinder ({lib.found_via})"


class Nvrtc:
    """The NVRTC C API of one library file, through ctypes (calls release the GIL)."""

    def __init__(self, path: str, how: str = ""):
        self.path, self.how = path, how
        # NVRTC opens its builtins library (libnvrtc-builtins.so.X.Y) by name at the first compile,
        # through the loader's search path, which need not hold this NVRTC's folder: load the one
        # beside it first (by its versioned name, so another NVRTC's builtins never stand in).
        for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so.*")):
            if ".alt." not in builtins.name:
                try:
                    ctypes.CDLL(str(builtins))
                except OSError:
                    pass  # the compile will then say what is missing
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise NvrtcNotFoundError(f"NVRTC at {path} would not load ({e}); {INSTALL_HINT}") from None
        L, P, C = self.lib, ctypes.c_void_p, ctypes.c_char_p
        sig = {
            "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
            "nvrtcCreateProgram": [ctypes.POINTER(P), C, C, ctypes.c_int, P, P],
            "nvrtcDestroyProgram": [ctypes.POINTER(P)],
            "nvrtcAddNameExpression": [P, C],
            "nvrtcCompileProgram": [P, ctypes.c_int, ctypes.POINTER(C)],
            "nvrtcGetProgramLogSize": [P, ctypes.POINTER(ctypes.c_size_t)],
            "nvrtcGetProgramLog": [P, C],
            "nvrtcGetLoweredName": [P, C, ctypes.POINTER(C)],
            "nvrtcGetCUBINSize": [P, ctypes.POINTER(ctypes.c_size_t)],
            "nvrtcGetCUBIN": [P, C],
        }
        try:
            for name, args in sig.items():
                fn = getattr(L, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            L.nvrtcGetErrorString.argtypes, L.nvrtcGetErrorString.restype = [ctypes.c_int], C
        except AttributeError as e:
            raise NvrtcNotFoundError(f"{path} is not an NVRTC library ({e}); {INSTALL_HINT}") from None

    def check(self, err: int, what: str) -> None:
        if err != 0:
            msg = self.lib.nvrtcGetErrorString(err)
            raise RuntimeError(f"NVRTC {what}: {msg.decode() if msg else err}")

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        return major.value, minor.value


@functools.lru_cache(maxsize=8)
def _load(path: str, how: str) -> Nvrtc:
    return Nvrtc(path, how)


def load(path: str | os.PathLike | None = None) -> Nvrtc:
    """The NVRTC library ``path`` names (see :func:`locate`), loaded once per process."""
    return _load(*locate(path))


def nvrtc_version(path: str | os.PathLike | None = None) -> tuple[int, int]:
    return load(path).version()


def describe(path: str | os.PathLike | None = None) -> str:
    """'13.5 at /…/libnvrtc.so.13 (via …)', or 'not found: …' (never raises), for ``gpubp info``."""
    try:
        lib = load(path)
        major, minor = lib.version()
    except Exception as e:  # NvrtcNotFoundError, or a library that fails its first call
        return f"not found: {e}"
    lo, hi = SUPPORTED
    note = "" if lo <= (major, minor) < hi else f"; outside the checked range {lo[0]}.{lo[1]} to <{hi[0]}"
    return f"{major}.{minor} at {lib.path} (via {lib.how}{note})"


def _loaded_path(stem: str) -> str | None:
    """Where a shared library whose name starts with ``stem`` is mapped in this process (Linux), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip().split(" ")[-1]
                if Path(path).name.startswith(stem) and "builtins" not in path:
                    return path
    except OSError:
        pass
    return None


def cupy_nvrtc() -> str:
    """The NVRTC CuPy compiles the run-time kernels with: '13.5 at /…/libnvrtc.so.13', or why none."""
    try:
        from cupy_backends.cuda.libs import nvrtc as cupy_nvrtc_lib

        major, minor = cupy_nvrtc_lib.getVersion()
    except Exception as e:  # no CuPy, or CuPy without its NVRTC
        return f"not found: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    where = _loaded_path("libnvrtc.so") or _loaded_path("nvrtc64_")
    return f"{major}.{minor}" + (f" at {where}" if where else "")


# --- compiling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileResult:
    ok: bool
    log: str
    lowered: dict[str, str]  # name expression -> mangled name
    cubin: bytes
    seconds: float


def nvrtc_compile(
    file: str, names: list[str], arch: str, extra_options: tuple[str, ...] = (), nvrtc: Nvrtc | None = None
) -> CompileResult:
    """Compile kernels/<file> with NVRTC for ``arch`` (e.g. "sm_90"), instantiating ``names``.

    The options are those CuPy uses at run time plus ``-Xptxas -v``, so the report describes the
    code a GPU will run. Needs no driver.
    """
    if not _ARCH.fullmatch(arch):
        raise ValueError(f"arch: expected a name such as 'sm_80' or 'sm_90', got {arch!r}")
    nv = nvrtc or load()
    L = nv.lib
    prog = ctypes.c_void_p()
    nv.check(
        L.nvrtcCreateProgram(ctypes.byref(prog), module_source(file).encode(), file.encode(), 0, None, None),
        "create program",
    )
    try:
        for n in names:
            nv.check(L.nvrtcAddNameExpression(prog, n.encode()), f"add name {n}")
        opts = [f"--gpu-architecture={arch}", *compile_options(), *CUPY_IMPLIED_OPTIONS, "-Xptxas", "-v", *extra_options]
        argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        t0 = time.perf_counter()
        err = L.nvrtcCompileProgram(prog, len(opts), argv)
        seconds = time.perf_counter() - t0
        size = ctypes.c_size_t()
        nv.check(L.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
        buf = ctypes.create_string_buffer(size.value + 1)
        nv.check(L.nvrtcGetProgramLog(prog, buf), "log")
        log = buf.value.decode(errors="replace").rstrip()
        if err != 0:
            return CompileResult(False, log, {}, b"", seconds)
        lowered = {}
        for n in names:
            low = ctypes.c_char_p()
            nv.check(L.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(low)), f"lowered name of {n}")
            lowered[n] = low.value.decode()
        nv.check(L.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        nv.check(L.nvrtcGetCUBIN(prog, cubin), "cubin")
        return CompileResult(True, log, lowered, cubin.raw, seconds)
    finally:
        L.nvrtcDestroyProgram(ctypes.byref(prog))


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_RE_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per mangled entry name: registers, shared_bytes, stack_bytes, spill_stores, spill_loads."""
    out: dict[str, dict[str, int]] = {}
    matches = list(_RE_ENTRY.finditer(log))
    for i, m in enumerate(matches):
        chunk = log[m.end() : matches[i + 1].start() if i + 1 < len(matches) else len(log)]
        stack, regs, smem = _RE_STACK.search(chunk), _RE_REGS.search(chunk), _RE_SMEM.search(chunk)
        out[m.group(1)] = {
            "registers": int(regs.group(1)) if regs else -1,
            "shared_bytes": int(smem.group(1)) if smem else 0,
            "stack_bytes": int(stack.group(1)) if stack else -1,
            "spill_stores": int(stack.group(2)) if stack else -1,
            "spill_loads": int(stack.group(3)) if stack else -1,
        }
    return out


# --- the check ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelReport:
    """ptxas' resource report for one kernel on one architecture (or the compile error)."""

    arch: str
    spec: KernelSpec
    lowered: str = ""
    registers: int = -1
    shared_bytes: int = -1
    stack_bytes: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    program_seconds: float = 0.0  # compile time of the whole file for this architecture
    error: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def problems(self) -> list[str]:
        """What makes this kernel fail the check: a compile error, or spills / stack in a hot kernel."""
        if self.error:
            return [f"{self.arch} {self.name}: {self.error}"]
        out = []
        if self.registers < 0:
            out.append(f"{self.arch} {self.name}: no ptxas report")
        if self.spec.hot and (self.spill_stores > 0 or self.spill_loads > 0):
            out.append(f"{self.arch} {self.name}: spills {self.spill_stores} B stored, {self.spill_loads} B loaded")
        if self.spec.hot and self.stack_bytes > 0:
            out.append(f"{self.arch} {self.name}: {self.stack_bytes} B stack frame (local memory)")
        return out


def check_program(file: str, arch: str, specs: list[KernelSpec], nvrtc: Nvrtc | None = None) -> list[KernelReport]:
    """One NVRTC program (one file, one architecture) holding ``specs``: a report per kernel."""
    names = [s.name for s in specs]
    try:
        res = nvrtc_compile(file, names, arch, nvrtc=nvrtc)
    except NvrtcNotFoundError:
        raise
    except RuntimeError as e:
        return [KernelReport(arch, s, error=str(e)) for s in specs]
    if not res.ok:
        first = "; ".join(line for line in res.log.splitlines() if "error" in line)[:2000] or res.log[:2000]
        return [KernelReport(arch, s, program_seconds=res.seconds, error=f"compile error: {first}") for s in specs]
    stats = parse_ptxas(res.log)
    reports = []
    for s in specs:
        low = res.lowered[s.name]
        st = stats.get(low)
        if st is None:
            reports.append(
                KernelReport(arch, s, low, program_seconds=res.seconds, error="missing from the ptxas report")
            )
        else:
            reports.append(KernelReport(arch, s, low, program_seconds=res.seconds, **st))
    return reports


def offline_check(
    archs: tuple[str, ...] | list[str] = DEFAULT_ARCHS,
    jobs: int | None = None,
    specs: tuple[KernelSpec, ...] | list[KernelSpec] | None = None,
    nvrtc: str | os.PathLike | None = None,
) -> list[KernelReport]:
    """Compile every kernel instantiation (or ``specs``) for every architecture with NVRTC.

    One report per kernel and architecture. One NVRTC program per (file, architecture), as CuPy
    would build a module; programs run on ``jobs`` threads (NVRTC releases the GIL). ``nvrtc``:
    the library to compile with (see :func:`locate`). Needs neither a GPU nor a driver nor CuPy.
    Compile errors come back as reports with ``error`` set (see :attr:`KernelReport.problems`);
    a missing NVRTC raises :class:`NvrtcNotFoundError` before anything is compiled.
    """
    archs = list(archs)
    if not archs:
        raise ValueError("archs: expected at least one architecture, e.g. ['sm_80', 'sm_90']")
    for a in archs:
        if not isinstance(a, str) or not _ARCH.fullmatch(a):
            raise ValueError(f"archs: expected names such as 'sm_80' or 'sm_90', got {a!r}")
    lib = load(nvrtc)
    lib.version()  # a library that loads but cannot answer fails here, once
    specs = kernel_specs() if specs is None else tuple(specs)
    tasks = [(f, a, [s for s in specs if s.file == f]) for a in archs for f in ALL_SOURCES]
    tasks = [t for t in tasks if t[2]]
    jobs = jobs or min(len(tasks), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        results = list(ex.map(lambda t: check_program(*t, nvrtc=lib), tasks))
    return [r for group in results for r in group]


def problems(reports: list[KernelReport]) -> list[str]:
    return [p for r in reports for p in r.problems]
