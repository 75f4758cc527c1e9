"""Compile gpubp's Numba CUDA kernels to PTX without a GPU: an import- or compile-time break shows here.

    python -m gpubp.tools.numba_ptx [--cc 80,90] [--first] [--quiet]

Every kernel listed by ``numba_cuda.ptx_targets``, ``numba_cuda_optim.ptx_targets`` and
``cuda_update.ptx_targets``
(each with the argument signatures its launchers use) goes through
``numba.cuda.compile_ptx`` for each compute capability; ``--first`` compiles only the first
kernel of each module (a quick check that each module imports and compiles: the GPU check's
rehearsal). Prints one line per kernel and ``TOTAL compiled <n> of <m>``; exit status 1 on
any failure (with the traceback), 2 on bad arguments.

Checks beyond "it compiles": the optimizer kernels must hold no fused multiply-add
(``fma.`` in the PTX): their updates round each product on its own, as NumPy does. The
optimizer updates are one generic kernel (``cuda_update``) compiled around each registered
rule's scalar body, for each of the rule's example flag sets (``update_<rule><k>[dtype]``),
so a new optimizer is checked as soon as it is registered. Likewise the element-wise loss
kernels are one generic chunked kernel compiled around each registered element-wise loss row's
scalar term (``<loss>_kernel[dtype]``, ``<loss>_weighted_kernel[dtype]``): a new element-wise
loss is compiled here as soon as it is in ``gpubp.losses``.

Needs numba-cuda and libNVVM (found as ``numba_setup.ensure_nvvm`` finds it), no driver.
The simulator compiles nothing, so this module switches it off for its own process: run it
as a separate process (``python -m``), before anything imports numba.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

#: The kernel modules, whether their PTX may contain fused multiply-adds, and which rows their
#: generic kernels are built for ("loss", "update"; None: no rows).
MODULES: tuple[tuple[str, bool, str | None], ...] = (
    ("numba_cuda", True, "loss"), ("numba_cuda_optim", False, None), ("cuda_update", False, "update"))


def rows(kind: str) -> list[Any]:
    """The registered rows of ``kind``: every loss row ("loss"), every optimizer's update rule,
    once each ("update"). The backends import no rows (they sit below them): this tool hands them in."""
    if kind == "loss":
        from gpubp.losses import RULES

        return list(RULES.values())
    from gpubp.optim import OPTIMIZERS

    return list({cls.rule.name: cls.rule for cls in OPTIMIZERS.values()}.values())


def targets(first: bool = False) -> list[tuple[str, str, Callable, tuple, bool]]:
    """(module, kernel name, Python function, signature, FMA allowed) for every kernel to compile."""
    import importlib

    if importlib.import_module("gpubp.backends.numba_cuda").SIMULATOR:
        raise RuntimeError("the Numba CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): it compiles nothing")
    out = []
    for mod_name, fma_ok, kind in MODULES:
        mod = importlib.import_module(f"gpubp.backends.{mod_name}")
        listed = mod.ptx_targets() if kind is None else mod.ptx_targets(rows(kind))
        for name, fn, sig in listed[:1] if first else listed:
            out.append((mod_name, name, fn, sig, fma_ok))
    return out


def compile_all(ccs: Sequence[tuple[int, int]], first: bool = False, quiet: bool = False) -> tuple[int, int]:
    """Compile the targets for each cc; (compiled, attempted). Failures are printed, not raised."""
    from numba import cuda

    todo = targets(first)
    done = tried = 0
    for mod_name, name, fn, sig, fma_ok in todo:
        for cc in ccs:
            tried += 1
            t0 = time.perf_counter()
            try:
                ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
            except Exception:  # noqa: BLE001 - every failure is reported with its traceback
                print(f"FAIL {mod_name}.{name} sm_{cc[0]}{cc[1]}:\n{traceback.format_exc()}", flush=True)
                continue
            problem = ""
            if ".entry" not in ptx:
                problem = "no .entry in the PTX"
            elif not fma_ok and "fma." in ptx:
                problem = "fused multiply-add in the PTX (updates must round each product)"
            if problem:
                print(f"FAIL {mod_name}.{name} sm_{cc[0]}{cc[1]}: {problem}", flush=True)
                continue
            done += 1
            if not quiet:
                print(f"ok   {mod_name}.{name} sm_{cc[0]}{cc[1]}: {len(ptx)} chars of PTX, "
                      f"{time.perf_counter() - t0:.2f} s", flush=True)
    return done, tried


def _ccs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        part = part.strip().removeprefix("sm_")
        if not part.isdigit() or len(part) < 2:
            raise argparse.ArgumentTypeError(f"--cc: expected compute capabilities such as 80,90, got {text!r}")
        out.append((int(part[:-1]), int(part[-1])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpubp.tools.numba_ptx", description=__doc__.splitlines()[0])
    p.add_argument("--cc", type=_ccs, default=[(8, 0), (9, 0)], help="compute capabilities (default 80,90)")
    p.add_argument("--first", action="store_true", help="only the first kernel of each module")
    p.add_argument("--quiet", action="store_true", help="print failures and the total only")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        done, tried = compile_all(args.cc, first=args.first, quiet=args.quiet)
    except Exception:  # noqa: BLE001 - an import-time break (numba-cuda vs NumPy, libNVVM missing)
        print(f"FAIL before compiling:\n{traceback.format_exc()}", flush=True)
        done, tried = 0, -1
    print(f"TOTAL compiled {done} of {max(tried, 0)} ({time.perf_counter() - t0:.1f} s)")
    return 0 if tried > 0 and done == tried else 1


def _run_as_script(argv: Sequence[Any]) -> int:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # read when numba is first imported (below, in compile_all)
    if "numba" in sys.modules:
        print("numba_ptx: numba was imported before the simulator could be switched off", file=sys.stderr)
    return main(list(argv))


if __name__ == "__main__":
    sys.exit(_run_as_script(sys.argv[1:]))
