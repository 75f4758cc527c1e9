"""The CUDA C kernels on the CPU: kernels/*.cu built by g++ with kernels/host_emulation.h.

Each CUDA thread is a std::thread, barriers stand in for __syncthreads and warp shuffles, and
cp.async copies complete at once (one legal schedule). :class:`Emulator` builds every
instantiation of ``cuda_fused.kernel_specs()`` into one shared library and launches them with
the signature of ``cuda_fused.LaunchFn``, so the tests drive the GPU's own launch code
(``queue_forward`` / ``queue_backward``) with NumPy arrays. It checks indexing, edge tiles,
the vector and scalar paths, masks, split-K and summation order; not what only hardware shows
(the device libm's last bits, memory ordering, speed).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from gpubp._resources import kernel_dir
from gpubp.backends.cuda_fused import ALL_SOURCES, SOURCES, KernelSpec, kernel_specs

__all__ = ["Emulator", "compiler"]

CXX_FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas")


def compiler() -> str | None:
    """The C++ compiler the emulation builds with (g++), or None where there is none."""
    return shutil.which("g++")


class Emulator:
    """kernels/*.cu compiled by g++ into ``build_dir``; :meth:`launch` runs one kernel on the CPU.

    ``specs``: the instantiations to build (default: those of the SIMT kernels, dense_forward.cu and
    dense_backward.cu); the files they live in are included. The tensor-core tests build the
    few they run (each instantiation costs g++ time).
    """

    def __init__(self, build_dir: str | Path, specs: tuple[KernelSpec, ...] | list[KernelSpec] | None = None):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("the host emulation of the CUDA C kernels needs g++ (C++20)")
        build_dir = Path(build_dir)
        specs = tuple(s for s in kernel_specs() if s.file in SOURCES) if specs is None else tuple(specs)
        self.index = {s: i for i, s in enumerate(specs)}
        files = [f for f in ALL_SOURCES if any(s.file == f for s in specs)]
        lines = [
            '#include "host_emulation.h"',
            *[f'#include "{f}"' for f in files],
            "static const emu::Runner runners[] = {",
            *[f"    emu::make_runner(&{s.name})," for s in specs],
            "};",
            'extern "C" void gpubp_emu_run(int i, unsigned gx, unsigned gy, unsigned gz,',
            "                              unsigned bx, unsigned by, unsigned bz, void** args) {",
            "    runners[i](dim3{gx, gy, gz}, dim3{bx, by, bz}, args);",
            "}",
        ]
        src, lib = build_dir / "emu.cpp", build_dir / "libgpubp_emu.so"
        src.write_text("\n".join(lines) + "\n")
        cmd = [cxx, *CXX_FLAGS, f"-I{kernel_dir()}", "-o", str(lib), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed to build the host emulation:\n{proc.stderr[-6000:]}")
        self.lib = ctypes.CDLL(str(lib))
        self.launched: list[KernelSpec] = []  # every kernel launched, in order (tests read it)

    def launch(self, spec: KernelSpec, grid: tuple, block: tuple, args: tuple) -> None:
        held = []
        for a in args:
            if isinstance(a, np.ndarray):
                held.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                held.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.int64):
                held.append(ctypes.c_int64(int(a)))
            elif isinstance(a, np.float32):
                held.append(ctypes.c_float(float(a)))
            else:
                raise TypeError(f"kernel argument of type {type(a).__name__}: expected an array or a NumPy scalar")
        argv = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
        dims = [ctypes.c_uint(int(v)) for v in (*grid, *block)]
        self.launched.append(spec)
        self.lib.gpubp_emu_run(ctypes.c_int(self.index[spec]), *dims, argv)
