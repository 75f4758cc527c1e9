"""Stage 0 of bench/gpu_check.sh: the environment, and the three smallest things that must work on a GPU.

    PYTHONPATH=. python3 bench/gpu_smoke.py [--rehearse]

Prints the versions that decide whether gpubp runs (Python, NumPy, Numba, numba-cuda, CuPy, PyTorch,
the CUDA runtime and driver, the NVRTC that CuPy compiles with and the one the offline check uses,
where Numba found NVVM, libdevice and NVRTC), then runs:

  numba-ptx        the first kernel of each Numba kernel module compiled to PTX for sm_90, in a
                   process of its own with the simulator off (also in a rehearsal).
  numba-on-cupy    one Numba CUDA kernel (y = a x + y) on CuPy arrays, launched on a non-blocking
                   CuPy stream (numba.cuda.external_stream), against NumPy: exact in float32.
  fused-rawmodule  one fused CUDA C kernel (kernels/dense_forward.cu through CuPy RawModule / NVRTC)
                   via gpubp.backends.cuda_fused.dense_forward, float32, on an odd shape, output
                   poisoned with NaN, against the float64 reference numpy_ref.dense_forward;
                   allowed error: gpubp.accuracy.dot_error_bound of the K+1-term sum (relu moves no
                   value further than z moved).
  step-launches    kernel launches and host time per training step of a 64-256-256-10 relu MLP
                   (batch 128, Adam, cross-entropy; 8-16-16-10, batch 8 in the simulator), from the
                   CUDA backend's launch_count(): the eager step (graph=False), then the recorded
                   one (graph=True: a CUDA graph; a warning that it ran eagerly is quoted).

Each check prints one line "check NAME: ok|FAIL|skipped: details"; the last line counts them.
Exit status 1 when a check fails. With --rehearse (a machine without a GPU) the Numba kernel runs
in the Numba CUDA simulator on host arrays and the CUDA C check is skipped, said so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

DISTS = (
    "numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch", "cuda-bindings", "cuda-python",
    "cuda-core", "cuda-pathfinder", "nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime",
    "nvidia-nvjitlink", "pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "safetensors", "tqdm",
    "matplotlib",
)


def _dist(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _try(label: str, fn) -> None:
    """Print ``label: fn()``, or the exception it raised; an environment report never stops here."""
    try:
        print(f"{label:<28} {fn()}")
    except Exception as e:  # noqa: BLE001 - report whatever the environment throws
        print(f"{label:<28} unavailable: {type(e).__name__}: {e}")


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10} ({v})"


def versions() -> None:
    print("== versions")
    print(f"{'python':<28} {platform.python_version()} ({sys.executable})")
    for d in DISTS:
        print(f"{d:<28} {_dist(d)}")
    import cupy

    _try("cupy CUDA runtime", lambda: _cuda_version(cupy.cuda.runtime.runtimeGetVersion()))
    _try("cupy CUDA driver", lambda: _cuda_version(cupy.cuda.runtime.driverGetVersion()))
    _try("cupy NVRTC (run time)", lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    from gpubp.tools import nvrtc_check

    _try("NVRTC (offline check)", nvrtc_check.describe)
    _try("CUDA_PATH / CUDA_HOME", lambda: f"{os.environ.get('CUDA_PATH', '-')} / {os.environ.get('CUDA_HOME', '-')}")
    try:
        import torch

        print(f"{'torch CUDA':<28} {torch.version.cuda}, available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            print(f"{'torch device 0':<28} {torch.cuda.get_device_name(0)}, cc {torch.cuda.get_device_capability(0)}")
    except Exception as e:  # noqa: BLE001
        print(f"{'torch':<28} unavailable: {type(e).__name__}: {e}")


def numba_report() -> None:
    print("== numba")
    from numba import cuda

    print(f"{'NUMBA_ENABLE_CUDASIM':<28} {os.environ.get('NUMBA_ENABLE_CUDASIM', '-')}")
    _try("numba.cuda.is_available()", cuda.is_available)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("(simulator: Numba compiles nothing, NVVM is not looked for)")
        return
    # libNVVM found the way gpubp finds it (Numba's own search misses a toolkit-only libNVVM
    # when CUDA_HOME is unset): before anything below asks Numba for it.
    _try("NVVM (gpubp's search)", lambda: "{0.path} (via {0.via})".format(_ensure_nvvm()))
    _try("numba driver version", lambda: cuda.cudadrv.driver.driver.get_version())
    try:
        from numba.cuda.cuda_paths import get_cuda_paths

        for key, val in get_cuda_paths().items():
            print(f"{'found ' + key:<28} {val}")
    except Exception as e:  # noqa: BLE001
        print(f"{'numba cuda paths':<28} unavailable: {type(e).__name__}: {e}")
    try:
        from numba.cuda.cudadrv import nvvm

        print(f"{'NVVM version':<28} {nvvm.NVVM().get_version()}")
    except Exception as e:  # noqa: BLE001
        print(f"{'NVVM':<28} unavailable: {type(e).__name__}: {e}")


def _loaded(fragment: str) -> list[str]:
    """Shared libraries whose path contains ``fragment`` mapped into this process (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in maps.splitlines() if fragment in line and "/" in line})


def _ensure_nvvm():
    from gpubp.backends import numba_setup

    return numba_setup.ensure_nvvm()


cuda = None  # numba.cuda, imported by check_numba_on_cupy once the simulator choice is made


def _axpy(y, a, x):
    """y = a x + y over a 1-D grid-stride loop (``cuda`` is a module-level name: the simulator swaps it)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        y[i] = a * x[i] + y[i]


def check_numba_on_cupy(rehearse: bool) -> tuple[str, str]:
    global cuda
    from numba import cuda

    axpy = cuda.jit(_axpy)
    n, a = 100_003, np.float32(2.5)
    rng = np.random.default_rng(int(time.time_ns() % 2**32))
    x_h = rng.standard_normal(n).astype(np.float32)
    y_h = rng.standard_normal(n).astype(np.float32)
    want = a * x_h + y_h  # float32 on both sides: one fmaf or mul+add, both exact to 1 ulp
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        if not rehearse:
            return "FAIL", "Numba runs in the simulator (NUMBA_ENABLE_CUDASIM=1) on a GPU run"
        n_sim = 4099  # the simulator runs a thread per Python thread: keep it small
        y = y_h[:n_sim].copy()
        axpy[8, 64](y, a, x_h[:n_sim])
        err = float(np.max(np.abs(y - want[:n_sim])))
        ok = np.allclose(y, want[:n_sim], rtol=2e-7, atol=2e-7 * np.abs(want[:n_sim]).max())
        return ("ok" if ok else "FAIL"), f"simulator, host arrays (rehearsal), n={n_sim}, max |err| {err:.2e}"
    import cupy as cp

    _ensure_nvvm()  # as the CUDA backend does before its first compile
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.asarray(x_h)
        y = cp.asarray(y_h)
    t0 = time.perf_counter()
    nb_stream = cuda.external_stream(stream.ptr)
    axpy[264, 256, nb_stream](y, a, x)  # compiles through NVVM on the first launch
    stream.synchronize()
    took = time.perf_counter() - t0
    got = cp.asnumpy(y)
    err = float(np.max(np.abs(got - want)))
    ok = np.all(np.isfinite(got)) and np.allclose(got, want, rtol=2e-7, atol=2e-7 * np.abs(want).max())
    return ("ok" if ok else "FAIL"), f"n={n}, stream {stream.ptr:#x}, compile+run {took:.2f} s, max |err| {err:.2e}"


def check_numba_ptx(rehearse: bool) -> tuple[str, str]:
    """The first kernel of each Numba kernel module compiled to PTX for sm_90 in a process of its own
    with the simulator off (python -m gpubp.tools.numba_ptx --first): an import- or compile-time break
    of numba-cuda (NumPy 2.5's missing row_stack, say) shows here even in a rehearsal without a GPU."""
    import subprocess

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "gpubp.tools.numba_ptx", "--cc", "90", "--first"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok", "FAIL", "TOTAL"))]
    if r.returncode != 0:
        return "FAIL", f"exit {r.returncode} after {took:.1f} s\n{r.stdout[-3000:]}{r.stderr[-2000:]}"
    return "ok", f"{took:.1f} s with imports; " + "; ".join(lines)


def check_fused_rawmodule(rehearse: bool) -> tuple[str, str]:
    from gpubp.device import cuda_status

    n_gpu, why = cuda_status()
    if n_gpu == 0:
        if rehearse:
            return "skipped", f"rehearsal: no GPU ({why})"
        return "FAIL", f"no GPU: {why}"
    import cupy as cp

    from gpubp.accuracy import dot_error_bound
    from gpubp.activations import Activation
    from gpubp.backends import cuda_fused, numpy_ref

    seed = int(time.time_ns() % 2**32)
    rng = np.random.default_rng(seed)
    n, k, m = 257, 129, 65  # tile-unfriendly on every side
    act = Activation("relu")
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = (rng.standard_normal((k, m)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    out = cp.full((n, m), cp.nan, dtype=cp.float32)  # poison: an unwritten element fails
    t0 = time.perf_counter()
    a, _ = cuda_fused.dense_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), act, False, out=out)
    cp.cuda.Device().synchronize()
    took = time.perf_counter() - t0
    got = cp.asnumpy(a).astype(np.float64)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    want, _ = numpy_ref.dense_forward(x64, w64, b64, act, False)
    bound = dot_error_bound(np.abs(x64) @ np.abs(w64) + np.abs(b64), k + 1)
    err = np.abs(got - want)
    worst = float(np.max(err / (bound + 1e-30)))
    ok = bool(np.all(np.isfinite(got))) and bool(np.all(err <= bound))
    nvrtc = ", ".join(_loaded("libnvrtc")) or "not seen in /proc/self/maps"
    return ("ok" if ok else "FAIL"), (
        f"relu {n}x{k}x{m}, seed {seed}, compile+run {took:.2f} s, max |err| {float(err.max()):.2e}, "
        f"worst err/bound {worst:.3f}; NVRTC loaded: {nvrtc}"
    )


def check_step_launches(rehearse: bool) -> tuple[str, str]:
    """Kernel launches and host time of one Adam step of a 3-layer MLP (the figure gpubp bench reports)."""
    import gpubp as gp
    from gpubp.device import cuda_status

    n_gpu, why = cuda_status()
    if n_gpu == 0 and not rehearse:
        return "FAIL", f"no GPU: {why}"
    device = "cuda" if n_gpu else "cudasim"
    # the simulator runs every thread in Python: a tiny model, two steps
    d, h, batch, steps = (64, 256, 128, 8) if n_gpu else (8, 16, 8, 2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((steps * batch, d)).astype(np.float32), rng.integers(0, 10, steps * batch)
    model = gp.Sequential(gp.Dense(d, h, "relu"), gp.Dense(h, h, "relu"), gp.Dense(h, 10),
                          device=device, dtype="float32", seed=0)
    opt = gp.optim.Adam(model.parameters(), lr=1e-3)
    b = model.arena.backend
    fit = dict(loss="cross_entropy", optimizer=opt, epochs=1, batch_size=batch, shuffle=False, verbose=0)
    figures = {}
    for graph in (False, True):  # the eager step launch by launch, then the recorded one (a CUDA graph)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, graph=graph, **fit)  # compile and warm up (graph: record)
            before, t0 = b.launch_count(), time.perf_counter()
            model.fit(x, y, graph=graph, **fit)  # (a new fit records its first step again)
        took = (time.perf_counter() - t0) / steps
        eager = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
        figures[graph] = ((b.launch_count() - before) / steps, took, eager)
    (n_e, t_e, _), (n_g, t_g, why) = figures[False], figures[True]
    return "ok", (f"{device}, {d}-{h}-{h}-10 relu, batch {batch}, Adam: eager {n_e:g} launches per step, "
                  f"{t_e * 1e6:.0f} us per step (host wall time); graph=True {n_g:g} kernel launches counted per "
                  f"step, {t_g * 1e6:.0f} us per step" + (f" [{why[0]}]" if why else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rehearse", action="store_true", help="no GPU here: simulator for Numba, skip the CUDA C check")
    args = p.parse_args(argv)
    from gpubp.device import cuda_status

    n_gpu, why = cuda_status()
    print(f"{'GPUs (CuPy)':<28} {n_gpu}{'' if n_gpu else ': ' + why}")
    if n_gpu == 0 and args.rehearse:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba is imported
    versions()
    numba_report()
    print("== checks")
    counts = {"ok": 0, "FAIL": 0, "skipped": 0}
    checks = (("numba-ptx", check_numba_ptx), ("numba-on-cupy", check_numba_on_cupy),
              ("fused-rawmodule", check_fused_rawmodule),
              ("step-launches", check_step_launches))
    for name, fn in checks:
        try:
            status, detail = fn(args.rehearse)
        except Exception as e:  # noqa: BLE001 - a check that raises has failed; say where
            status, detail = "FAIL", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        counts[status] += 1
        print(f"check {name}: {status}: {detail}", flush=True)
    print(f"smoke: {counts['ok']} ok, {counts['FAIL']} failed, {counts['skipped']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
